"""The terminal chat against an engine in this process (the server backend is in test_server.py)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pcmoe
from pcmoe.chat import LocalChat, run_chat
from pcmoe.generation import chat_prompt, turn_end_ids


class Recording(LocalChat):
    def __init__(self, *args):
        super().__init__(*args)
        self.conversations = []

    def reply(self, messages):
        self.conversations.append([dict(m) for m in messages])
        yield from super().reply(messages)


def test_chat_keeps_the_conversation_until_reset(tiny_lm):
    engine = pcmoe.load(tiny_lm, budget="60%experts", policy="committee", progress=False)
    args = SimpleNamespace(max_tokens=6, temperature=0.0, top_p=1.0)
    backend = Recording(engine, args)
    out = io.StringIO()
    code = run_chat(backend, system="be brief", stdin=io.StringIO("hello\nagain\n/stats\n/reset\nthird\n"), out=out)
    backend.close()
    assert code == 0
    roles = [[m["role"] for m in c] for c in backend.conversations]
    assert roles == [["system", "user"], ["system", "user", "assistant", "user"], ["system", "user"]]
    assert backend.conversations[1][2]["content"] in out.getvalue()  # the reply was shown and remembered
    assert "hit rate" in out.getvalue() and "conversation cleared" in out.getvalue()


def test_chat_prompt_uses_the_template_or_a_transcript(tiny_lm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    text, stop = chat_prompt(tok, [{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" and stop == []
    assert turn_end_ids(tok) == {tok.convert_tokens_to_ids("<|im_end|>")}
    tok.chat_template = None
    text, stop = chat_prompt(tok, [{"role": "user", "content": "hi"}])
    assert text == "user: hi\nassistant:" and "\nuser:" in stop


def test_chat_command(tiny_lm, monkeypatch, capsys):
    from pcmoe.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\nnot read\n"))
    assert main(["chat", "--model", str(tiny_lm), "--budget", "60%experts", "--max-tokens", "4", "--quiet"]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_a_conversation_past_the_context_asks_for_reset(tiny_lm):
    engine = pcmoe.load(tiny_lm, policy="full", progress=False)
    backend = Recording(engine, SimpleNamespace(max_tokens=6, temperature=0.0, top_p=1.0))
    out = io.StringIO()
    long = "hello " * 600  # more tokens than the tiny model's 512
    assert run_chat(backend, stdin=io.StringIO(f"{long}\nhi\n"), out=out) == 0
    backend.close()
    first, rest = out.getvalue().split("\n", 1)
    assert first == "error: the conversation no longer fits in the model's context; /reset to start over"
    assert backend.conversations[1] == [{"role": "user", "content": "hi"}]  # the refused turn was dropped
    assert rest.strip() and "error" not in rest  # and the next one was answered


def test_chat_help_lists_the_commands(capsys):
    from pcmoe.cli import main

    assert main(["chat", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for command in ("/exit", "/reset", "/stats"):
        assert command in out, command
