"""From a request's prompt or messages to token ids and a token limit, on one tokenizer thread.

Tokenising and chat templating run off the event loop, so a large prompt never holds up /health or
other clients. Text that cannot fit the context is refused before it is tokenised (chars_per_token).
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

from pcmoe.generation import ContextError, chat_prompt, fit_max_tokens
from pcmoe.options import OptionError, check_text
from pcmoe.server.errors import APIError, option_error
from pcmoe.server.schema import Message
from pcmoe.server.states import one_line

# Canonical composition (NFC, NFKC) merges at most 4 code points into one character (U+1F82 and the like
# have the longest canonical decompositions; Hangul syllables merge 3), and Unicode's stability policy
# keeps it so.
_MAX_COMPOSITION = 4
_SAFE_NORMALIZERS = {"NFC": _MAX_COMPOSITION, "NFKC": _MAX_COMPOSITION, "NFD": 1, "NFKD": 1, "Lowercase": 1}
_SAFE_PRE_TOKENIZERS = ("ByteLevel", "Split", "Digits", "Punctuation")


def chars_per_token(tokenizer) -> int | None:
    """At most how many characters of raw text one token covers, or None where no bound is known.

    Byte-level BPE turns every character into at least one byte and every byte into one vocabulary
    character, so a token covers at most as many characters as its vocabulary string is long; an added
    token matched in the raw text covers its own length. A canonical-composition normalizer may first
    shrink the text by up to _MAX_COMPOSITION. Any other normalizer or pre-tokenizer may drop text
    (whitespace, control characters), BPE drops bytes missing from its vocabulary, and WordPiece's [UNK]
    covers a whole word: no bound then."""
    from tokenizers.pre_tokenizers import ByteLevel

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except Exception:
        return None

    def parts(node: dict | None, key: str) -> list[dict]:
        return [] if node is None else node[key] if node.get("type") == "Sequence" else [node]

    shrink = 1
    for n in parts(spec.get("normalizer"), "normalizers"):
        if n.get("type") not in _SAFE_NORMALIZERS:
            return None
        shrink *= _SAFE_NORMALIZERS[n["type"]]
    pre = parts(spec.get("pre_tokenizer"), "pretokenizers")
    if (spec.get("model", {}).get("type") != "BPE" or not any(t.get("type") == "ByteLevel" for t in pre)
            or any(t.get("type") not in _SAFE_PRE_TOKENIZERS or t.get("behavior") == "Removed" for t in pre)):
        return None
    vocab = tokenizer.get_vocab()  # added tokens included
    if not set(ByteLevel.alphabet()) <= vocab.keys():
        return None
    return shrink * max(map(len, vocab))


def text(value: str, param: str) -> str:
    """`value` if it is Unicode text a tokenizer takes (JSON can carry lone UTF-16 surrogates, "\\ud800",
    which nothing downstream takes: tokenizer, hashing, the JSON encoder of replies), else a 400."""
    try:
        check_text(value, param)
    except OptionError as e:
        raise option_error(e) from None
    return value


class Prompts:
    """Validates and tokenises prompts for one engine; `close()` stops its tokenizer thread."""

    def __init__(self, engine, context: int | None):
        self.engine = engine
        self.context = context
        self.vocab_size = getattr(engine.config, "vocab_size", None)
        self.chars_per_token = chars_per_token(engine.tokenizer) if context else None
        self.max_chars = context * self.chars_per_token if self.chars_per_token else None
        # one thread: tokenising stays off the event loop and takes one core at most
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pcmoe-tokenize")

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _check_length(self, value: str, param: str) -> None:
        """Refuse, before tokenising it, text that has more tokens than the context whatever it says."""
        if self.max_chars is not None and len(value) > self.max_chars:
            raise APIError(400, f"the prompt has {len(value)} characters, more than the model's context of "
                                f"{self.context} tokens can hold (a token covers at most {self.chars_per_token} "
                                f"characters)", param=param, code="context_length_exceeded")

    async def completion(self, prompt) -> list[int]:
        """Token ids of a completion request's `prompt`: text, one text in a list, or token ids."""
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, "batched prompts are not supported: send one prompt per request",
                               param="prompt", code="invalid_value")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if self.engine.tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
            self._check_length(text(prompt, "prompt"), "prompt")
            return await self._off_loop(self.engine.encode, prompt)
        ids = list(prompt)
        if self.vocab_size and any(not 0 <= i < self.vocab_size for i in ids):
            raise APIError(400, f"token ids must lie in [0, {self.vocab_size})", param="prompt",
                           code="invalid_value")
        return ids

    async def chat(self, messages: list[Message]) -> tuple[list[int], list[str]]:
        """Token ids of a conversation with the assistant's turn opened, and the stop strings its
        format implies."""
        return await self._off_loop(self._chat_ids, self._conversation(messages))

    def _conversation(self, messages: list[Message]) -> list[dict]:
        if self.engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so it cannot chat", param="messages")
        conversation = []
        for i, m in enumerate(messages):
            content = m.content or ""
            if isinstance(content, list):
                if any(p.type != "text" or p.text is None for p in content):
                    raise APIError(400, "only text content parts are supported", param=f"messages[{i}].content",
                                   code="invalid_value")
                content = "".join(text(p.text, f"messages[{i}].content[{j}].text") for j, p in enumerate(content))
            else:
                text(content, f"messages[{i}].content")
            conversation.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        return conversation

    def _chat_ids(self, conversation: list[dict]) -> tuple[list[int], list[str]]:  # tokenizer thread
        try:
            prompt, stop = chat_prompt(self.engine.tokenizer, conversation)
        except Exception as e:  # the template rejects the conversation (e.g. roles out of order)
            raise APIError(400, f"the chat template rejects these messages: {one_line(e)}",
                           param="messages") from None
        self._check_length(prompt, "messages")  # the templated text: a template may trim or drop content
        return self.engine.encode(prompt), stop

    def max_tokens(self, ids: list[int], requested: int | None, default: int | None, prompt_param: str,
                   requested_param: str = "max_tokens") -> int:
        """How many tokens to generate (pcmoe.generation.fit_max_tokens): `requested`, else `default`, else
        as much as fits; a 400 naming the request's field when the prompt is empty or leaves no room."""
        try:
            return fit_max_tokens(len(ids), self.context, requested, default)
        except ContextError as e:
            param = prompt_param if e.param == "prompt" else requested_param
            raise APIError(400, str(e), param=param,
                           code="context_length_exceeded" if ids else "invalid_value") from None
