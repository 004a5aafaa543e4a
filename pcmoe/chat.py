"""Interactive terminal chat, against a loaded engine or a running `pcmoe serve`.

    pcmoe chat --model models/pcmoe-lm --budget 50%experts
    pcmoe chat --url http://127.0.0.1:8000/v1 [--api-key KEY]

Replies stream as they are generated; the conversation is kept until /reset. Commands: /exit,
/reset, /stats, /help; Ctrl-D (or Ctrl-C at the prompt) exits. The chat formatting is
pcmoe.generation's (`chat_prompt`, `turn_end_ids`), the same the server uses.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

_HELP = "commands: /exit, /reset (forget the conversation), /stats (committee statistics), /help"


# -- backends ---------------------------------------------------------------------------------


class LocalChat:
    """Replies from an engine in this process."""

    def __init__(self, engine, args):
        from pcmoe.generation import turn_end_ids

        self.engine = engine
        self.args = args
        self.stop_ids = turn_end_ids(engine.tokenizer)

    def reply(self, messages: list[dict]) -> Iterator[str]:
        from pcmoe.generation import ContextError, chat_prompt, fit_max_tokens

        prompt, stop = chat_prompt(self.engine.tokenizer, messages)
        ids = self.engine.encode(prompt)
        try:  # a long conversation gets a shorter reply, down to none
            max_tokens = fit_max_tokens(len(ids), self.engine.context, self.args.max_tokens, clamp=True)
        except ContextError:
            raise ChatError("the conversation no longer fits in the model's context; /reset to start over") from None
        steps = self.engine.generate(ids, max_new_tokens=max_tokens, temperature=self.args.temperature,
                                     top_p=self.args.top_p, stop=stop, stop_token_ids=self.stop_ids)
        with contextlib.closing(steps):  # also when the reader stops early (Ctrl-C)
            for step in steps:
                yield step.text

    def stats(self) -> dict | None:
        return self.engine.stats()

    def close(self) -> None:
        self.engine.close()


class RemoteChat:
    """Replies from a running server through the OpenAI client."""

    def __init__(self, args):
        import openai

        self.args = args
        self.client = openai.OpenAI(base_url=args.url, api_key=args.api_key or "none", max_retries=2)
        try:
            self.model = args.model_name or self.client.models.list().data[0].id
        except openai.AuthenticationError:
            raise ChatError(f"{args.url} refused the API key (401): "
                            + ("pass the server's key with --api-key or $PCMOE_API_KEY" if not args.api_key
                               else "--api-key (or $PCMOE_API_KEY) is not the server's key")) from None
        except openai.OpenAIError as e:
            raise ChatError(f"cannot reach {args.url}: {e}") from None

    def reply(self, messages: list[dict]) -> Iterator[str]:
        import openai

        try:
            stream = self.client.chat.completions.create(
                model=self.model, messages=messages, stream=True, max_tokens=self.args.max_tokens,
                temperature=self.args.temperature, top_p=self.args.top_p, user=self.args.user)
            with contextlib.closing(stream):  # closing the connection cancels the generation server-side
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content
        except openai.OpenAIError as e:
            raise ChatError(str(e)) from None

    def stats(self) -> dict | None:
        import httpx

        headers = {"Authorization": f"Bearer {self.args.api_key}"} if self.args.api_key else {}
        try:
            r = httpx.get(self.args.url.rstrip("/") + "/pcmoe/stats", headers=headers, timeout=10)
            r.raise_for_status()
        except httpx.HTTPError as e:
            raise ChatError(f"cannot read the server's statistics: {e}") from None
        return r.json()

    def close(self) -> None:
        self.client.close()


class ChatError(Exception):
    """Shown to the user as one line; the chat goes on."""


# -- the loop ---------------------------------------------------------------------------------


def run_chat(backend, system: str | None = None, stdin=None, out=None) -> int:
    from pcmoe.args import print_stats

    stdin, out = stdin or sys.stdin, out or sys.stdout
    interactive = stdin.isatty()
    history: list[dict] = []
    if system:
        history.append({"role": "system", "content": system})
    base = len(history)
    if interactive:
        print(_HELP, file=out)
    while True:
        try:
            if interactive:
                line = input("> ")
            else:
                line = stdin.readline()
                if not line:
                    raise EOFError
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            del history[base:]
            print("(conversation cleared)", file=out)
            continue
        if line == "/help":
            print(_HELP, file=out)
            continue
        if line == "/stats":
            try:
                stats = backend.stats()
            except ChatError as e:
                print(f"error: {e}", file=out)
                continue
            print_stats(stats, out=out)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {_HELP}", file=out)
            continue
        history.append({"role": "user", "content": line})
        parts: list[str] = []
        try:
            for text in backend.reply(history):
                parts.append(text)
                print(text, end="", flush=True, file=out)
        except KeyboardInterrupt:  # stop this reply, keep what came so far
            print(" [interrupted]", end="", file=out)
        except ChatError as e:
            history.pop()
            print(f"error: {e}", file=out)
            continue
        print(file=out)
        history.append({"role": "assistant", "content": "".join(parts)})


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("In the chat: /exit (or Ctrl-D) leaves, /reset forgets the conversation, /stats prints the "
                "committee statistics, /help lists these.")
    g = p.add_argument_group("chat")
    g.add_argument("--url", help="chat with a running server (e.g. http://127.0.0.1:8000/v1) instead of loading "
                                 "--model here")
    g.add_argument("--api-key", default=os.environ.get("PCMOE_API_KEY"), help="server API key "
                                                                              "(default: $PCMOE_API_KEY)")
    g.add_argument("--model-name", help="model id on the server (default: the first one it lists)")
    g.add_argument("--user", help="user id sent to the server (it keeps a warm committee per user)")
    g.add_argument("--system", help="system message that opens the conversation")
    g.add_argument("--max-tokens", type=int, default=256, help="reply length limit (default 256)")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature, 0 = greedy (default 0.7)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")


def cmd_chat(args) -> int:
    if args.url:
        try:
            backend = RemoteChat(args)
        except ChatError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        from pcmoe.args import engine_from_args

        backend = LocalChat(engine_from_args(args), args)
    try:
        return run_chat(backend, system=args.system)
    finally:
        backend.close()
