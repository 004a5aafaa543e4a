"""The shared measurement protocol (pcmoe.protocol) against straightforward references: the same
windows, and bit-identical perplexity through `pcmoe eval`'s engine path and the bench's
transformers path."""

from __future__ import annotations

import math

import pytest
import torch

import pcmoe
from pcmoe import protocol
from pcmoe.evaluate import perplexity

DOCS = ["the quick brown fox jumps over the lazy dog " * 9, "def main():\n    return 0\n" * 7, "ok",
        "hello world " * 30]


def reference_nll(forward, new_state, begin, streams, window, chunk, max_tokens):
    """Every predicted position by its absolute place in its stream: windows start at multiples
    of `window`, each from an empty state, fed in `chunk`-token steps; stops at `max_tokens`."""
    nll, count = 0.0, 0
    for stream in streams:
        if count >= max_tokens:
            break
        begin()
        for start in range(0, len(stream) - 1, window):
            end = min(start + window, len(stream) - 1, start + max_tokens - count)  # last position fed + 1
            if end <= start:
                break
            state = new_state()
            for c in range(start, end, chunk):
                e = min(c + chunk, end)
                logits = forward(torch.tensor([stream[c:e]]), state).float()
                nll += torch.nn.functional.cross_entropy(logits, torch.tensor(stream[c + 1:e + 1]),
                                                         reduction="sum").item()
            count += end - start
    return nll, count


def _reference_windows(streams, max_tokens, window):
    out, left = [], min(sum(len(s) - 1 for s in streams), max_tokens)
    for stream in streams:
        for start in range(0, len(stream) - 1, window):
            n = min(window, len(stream) - 1 - start, left)
            if n > 0:
                out.append((stream[start:start + n], stream[start + 1:start + 1 + n]))
                left -= n
    return out


@pytest.mark.parametrize("max_tokens", [1, 7, 10, 31, 1000])
def test_windows(max_tokens):
    streams = [list(range(100, 112)), list(range(200, 203)), list(range(300, 320))]
    got = [w for stream in protocol.windows(streams, 5, max_tokens) for w in stream]
    assert got == _reference_windows(streams, max_tokens, 5)
    assert sum(len(t) for _, t in got) == protocol.scored_tokens(streams, max_tokens) == min(max_tokens, 11 + 2 + 19)
    assert all(len(ids) == len(t) <= 5 for ids, t in got)
    assert len(list(protocol.windows(streams, 5, 12))) == 2  # the third stream holds no scored token


def test_streams_and_prompts():
    def encode(text):
        return [ord(c) for c in text]

    assert protocol.token_streams(["ab", "c"], encode, 0) == [[0, 97, 98, 0], [0, 99, 0]]
    assert protocol.token_streams(["ab", "c"], encode, None) == [[97, 98], [99]]
    assert protocol.token_streams(["ab", "c", "d"], encode, 0, max_tokens=3) == [[0, 97, 98, 0]]
    assert protocol.prompts(["abcd", "x", "efgh", "ijkl"], encode, 2, length=3) == [[97, 98, 99], [101, 102, 103]]
    assert protocol.fit_window(256, 128) == 128 and protocol.fit_window(256, None) == 256


@pytest.mark.parametrize("policy,budget,window,chunk,max_tokens", [
    ("full", None, 64, 32, 300), ("committee", "50%experts", 40, 7, 250), ("committee", "50%experts", 256, 32, None)])
def test_engine_perplexity_is_bit_identical_to_the_reference(tiny_lm, policy, budget, window, chunk, max_tokens):
    kw = dict(budget=budget, policy=policy, progress=False, update_every=4, margin=0.0)
    with pcmoe.load(tiny_lm, **kw) as engine:
        got = perplexity(engine, DOCS, window=window, max_tokens=max_tokens, chunk=chunk, progress=False)
        assert engine.stats()["swaps"] > 0 or policy == "full"  # the committee changed while scoring
    with pcmoe.load(tiny_lm, **kw) as engine, torch.inference_mode():
        eos = engine.tokenizer.eos_token_id
        streams = [[eos] + engine.encode(d) + [eos] for d in DOCS]
        nll, count = reference_nll(engine.forward, engine.new_state, engine.begin_input, streams, window, chunk,
                                   max_tokens or 10**9)
    assert got["tokens"] == count and got["nll_per_token"] == nll / count  # bit-identical, not close
    assert count == min(max_tokens or 10**9, sum(len(s) - 1 for s in streams))


def test_transformers_perplexity_is_bit_identical_to_the_reference(tiny_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from pcmoe.bench.worker import _hf_perplexity

    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    streams = [[tok.eos_token_id] + tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in DOCS]
    got = _hf_perplexity(model, model.config, streams, 200, window=48, chunk=16)

    def forward(ids, cache):
        return model(input_ids=ids, cache=cache, use_cache=True).logits[0]

    with torch.inference_mode():
        nll, count = reference_nll(forward, lambda: DynamicCache(config=model.config), lambda: None, streams, 48, 16,
                                   200)
    assert got["tokens"] == count == 200 and got["ppl"] == math.exp(nll / count)  # bit-identical
