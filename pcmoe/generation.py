"""Generation: sampling, stop strings and turn ends, context limits, per-request statistics.

The one generator CLI, chat, server and benchmarks consume:

    for step in generate(engine, ids, max_new_tokens=64, stop=["\\n\\n"]):
        print(step.text, end="")
    step.stats   # on the last step: the statistics of this request alone

Text that could be the start of a stop string is held back until it is known not to be, so a stop
string split across tokens is never streamed in part. The runtime (pcmoe.runtime) sees token ids
only; the tokenizer is used here, at the edge.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from pcmoe.options import PcmoeError, check_sampling

# Special tokens that close a turn in common chat formats (ChatML, Llama 3, Phi, Gemma).
_TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
_FALLBACK_STOP = ["\nuser:", "\nsystem:"]
DEFAULT_MAX_TOKENS = 256      # a request that names no limit and fits anywhere


@dataclass
class GenerationStep:
    token_id: int
    text: str                      # the newly decodable text (may be "")
    index: int                     # 0-based position among generated tokens
    finish_reason: str | None = None   # None, "length", "stop" or "eos"
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stats: dict = field(default_factory=dict)  # on the last step only: this request's statistics


# -- context ------------------------------------------------------------------------------------


class ContextError(PcmoeError):
    """A prompt (or prompt + requested tokens) that does not fit the model's context. `param` says
    which input is at fault: "prompt" or "max_tokens"."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def fit_max_tokens(prompt_tokens: int, context: int | None, requested: int | None = None,
                   default: int | None = None, clamp: bool = False) -> int:
    """How many tokens to generate after a prompt of `prompt_tokens` in a context of `context`
    (None = unlimited). `requested` None takes `default`, else as much as fits (at most
    DEFAULT_MAX_TOKENS). A request beyond the room is an error, or (clamp=True) cut to the room."""
    if prompt_tokens < 1:
        raise ContextError("the prompt is empty", "prompt")
    if context and prompt_tokens >= context:
        raise ContextError(f"the prompt has {prompt_tokens} tokens but the model's context is {context} tokens",
                           "prompt")
    room = context - prompt_tokens if context else None
    if requested is None:
        limits = [x for x in (default, room) if x is not None]
        return min(limits) if limits else DEFAULT_MAX_TOKENS
    if room is not None and requested > room:
        if clamp:
            return room
        raise ContextError(f"the model's context is {context} tokens: the prompt has {prompt_tokens} and "
                           f"max_tokens asks for {requested} more (at most {room})", "max_tokens")
    return requested


# -- chat formatting ------------------------------------------------------------------------------


def chat_prompt(tokenizer, messages: list[dict]) -> tuple[str, list[str]]:
    """The prompt text of a conversation with the assistant's turn opened, and the stop strings its
    format implies: the tokenizer's chat template, or a plain `role: content` transcript without one."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), []
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:", list(_FALLBACK_STOP)


def turn_end_ids(tokenizer) -> frozenset[int]:
    """Ids of the special tokens that end an assistant turn. Decoding skips special tokens, so a
    stop string cannot catch these: pass them as stop_token_ids."""
    if tokenizer is None:
        return frozenset()
    vocab = tokenizer.get_vocab()
    return frozenset(vocab[t] for t in _TURN_END_TOKENS if t in vocab)


# -- stop strings --------------------------------------------------------------------------------


class StopStrings:
    """Incremental stop-string matching over the decoded text of a generation. `update(text)` takes
    the whole text so far and returns the part that may be emitted now; the tail that could begin
    a stop string (or an incomplete UTF-8 sequence) is held back until the next update."""

    def __init__(self, stops: list[str] | None):
        self.stops = [s for s in (stops or []) if s]
        self.emitted = ""
        self.stopped = False

    def update(self, text: str, final: bool = False) -> str:
        hit = min((text.find(s) for s in self.stops if s in text), default=-1)
        if hit >= 0:
            text, self.stopped = text[:hit], True
            safe = len(text)
        elif final:
            safe = len(text)  # the end: flush whatever was held back
        else:
            safe = len(text.rstrip("\ufffd"))
            safe -= self._prefix_overlap(text[:safe])
        if safe <= len(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted):safe], text[:safe]
        return delta

    def _prefix_overlap(self, text: str) -> int:
        """Length of the longest end of `text` that is the beginning of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


# -- sampling ------------------------------------------------------------------------------------


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """Greedy at temperature 0; else nucleus sampling (the smallest set of tokens whose probability
    reaches top_p; the most likely token is always kept)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


# -- the generator -------------------------------------------------------------------------------


@torch.inference_mode()
def generate(engine, prompt: str | list[int], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
             stop_on_eos: bool = True, stop_token_ids: list[int] | frozenset[int] | None = None
             ) -> Iterator[GenerationStep]:
    """Yield one GenerationStep per generated token; the last one carries the request's statistics.
    Finish reasons: "eos", "stop" (a stop string or stop token id), "length"."""
    ids = engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
    check_sampling(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens)  # the CLI's and server's rules
    if not ids:
        raise ContextError("the prompt is empty", "prompt")
    context = engine.context
    if context and len(ids) + max_new_tokens > context:
        raise ContextError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                           f"model's context of {context} tokens", "max_tokens")
    gen = torch.Generator().manual_seed(seed if seed is not None else random.randrange(2**31))
    eos = engine.eos_ids() if stop_on_eos else set()
    stop_ids = set(stop_token_ids or ())
    stops = StopStrings(stop)
    mark = engine.counters()
    engine.begin_input()
    try:
        new_ids: list[int] = []
        t0 = time.perf_counter()
        logits, state = engine.prefill(ids)
        prefill_s = time.perf_counter() - t0
        for i in range(max_new_tokens):
            if i > 0:
                logits = engine.decode_step(state, new_ids[-1])
            token = sample(logits, temperature, top_p, gen)
            new_ids.append(token)
            finish = "eos" if token in eos else "stop" if token in stop_ids else None
            if finish is None and len(new_ids) >= max_new_tokens:
                finish = "length"
            delta = ""
            if engine.tokenizer is not None:
                delta = stops.update(engine.decode(new_ids), final=finish is not None)
                if stops.stopped:
                    finish = "stop"
            step = GenerationStep(token, delta, i, finish, len(ids), prefill_s,
                                  time.perf_counter() - t0 - prefill_s)
            if finish is not None:
                step.stats = engine.stats(since=mark)
            yield step
            if finish is not None:
                return
    finally:  # also when the consumer stops early (client disconnect): the engine is free again
        engine.end_input()
