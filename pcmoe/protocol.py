"""The measurement protocol every evaluator shares: `pcmoe eval`, the bench workers (pcmoe,
transformers, accelerate) and the llama.cpp peer. One definition, so that their numbers compare.

- documents: a text file read as an ordered stream of documents (read_documents);
- token streams: each document is [eos] + its ids + [eos] (token_streams);
- perplexity windows: consecutive windows of `window` predicted tokens per stream, no overlap,
  `max_tokens` predicted tokens in all (windows); each window is scored from an empty state,
  fed `chunk` tokens per forward step (stream_nll);
- prompts: the first `length` ids of evenly spread documents (prompts);
- decode trials: greedy generation, warm-up excluded, the median of timed rounds (decode_trials).

Torch-free at import: the llama.cpp worker and the bench's parent process import it cheaply.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from pcmoe.options import PcmoeError

WINDOW = 256  # predicted tokens per perplexity window
CHUNK = 32    # tokens per forward step inside a window
PROMPT_TOKENS = 64

_SEPARATOR = re.compile(r"\n[ \t]*\n=====[ \t]*(?:\n|$)|\f")


def read_documents(path: str | Path) -> list[str]:
    """The documents of a text file, in file order: separated by a blank line followed by a line
    `=====`, or by form feeds."""
    p = Path(path)
    if not p.is_file():
        raise PcmoeError(f"data file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PcmoeError(f"data file {p} is not UTF-8 text") from None
    docs = [d.strip("\n") for d in _SEPARATOR.split(text)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise PcmoeError(f"data file {p} has no text")
    return docs


def tokenizer_encoder(model_dir: str | Path) -> tuple[Callable[[str], list[int]], int | None]:
    """(encode, eos id) of a checkpoint's tokenizer, encoding as the engine does (no special tokens)."""
    from pcmoe.tokenizer import LeanTokenizer

    tok = LeanTokenizer.from_folder(Path(model_dir))
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
    return (lambda text: tok(text, add_special_tokens=False)["input_ids"]), tok.eos_token_id


def token_streams(documents: Sequence[str], encode: Callable[[str], list[int]], eos: int | None,
                  max_tokens: int | None = None) -> list[list[int]]:
    """[eos] + ids + [eos] per document (no eos: the ids alone). With `max_tokens`, the documents
    after those that already hold that many predicted tokens are not tokenised."""
    edge = [eos] if eos is not None else []
    streams, total = [], 0
    for doc in documents:
        if max_tokens is not None and total >= max_tokens:
            break
        streams.append(edge + list(encode(doc)) + edge)
        total += max(len(streams[-1]) - 1, 0)
    return streams


def fit_window(window: int, max_positions: int | None) -> int:
    """The window, shortened to the model's context when that is shorter."""
    return min(window, max_positions or window)


def scored_tokens(streams: Sequence[Sequence[int]], max_tokens: int | None = None) -> int:
    """How many tokens the windows predict: every token after the first of each stream, at most `max_tokens`."""
    total = sum(max(len(s) - 1, 0) for s in streams)
    return total if max_tokens is None else min(total, max_tokens)


def windows(streams: Sequence[Sequence[int]], window: int = WINDOW,
            max_tokens: int | None = None) -> Iterator[Iterator[tuple[list[int], list[int]]]]:
    """Per stream that is scored, an iterator of its windows (ids fed, ids predicted), both of
    length n <= window: consecutive, no overlap, stopping after `max_tokens` predicted tokens in
    all. A stream whose turn comes before the total is reached is yielded even if it predicts
    nothing (a one-token stream): it is still an input the model sees start."""
    left = scored_tokens(streams, max_tokens)
    for stream in streams:
        if left <= 0:
            return
        n = min(max(len(stream) - 1, 0), left)
        left -= n
        yield _stream_windows(stream, window, n)


def _stream_windows(stream: Sequence[int], window: int, n: int) -> Iterator[tuple[list[int], list[int]]]:
    """The windows of the first n predicted tokens of one stream."""
    for start in range(0, n, window):
        end = min(start + window, n)
        yield list(stream[start:end]), list(stream[start + 1:end + 1])


def stream_nll(forward, new_state, streams: Sequence[Sequence[int]], window: int = WINDOW, chunk: int = CHUNK,
               max_tokens: int | None = None, begin: Callable[[], None] | None = None,
               progress: Callable[[int], None] | None = None) -> tuple[float, int]:
    """(summed negative log-likelihood, predicted tokens) over the windows of the streams (torch).
    Each window starts from new_state(); forward(ids [1, c], state) -> logits [c, V] is fed `chunk`
    tokens at a time (the logits equal scoring the window at once); begin() marks each stream's
    start (a new input for the committee); progress(n) after each window. The sum is accumulated
    one chunk at a time, in order, as a Python float."""
    import torch

    nll, count = 0.0, 0
    for stream_windows in windows(streams, window, max_tokens):
        if begin is not None:
            begin()
        for ids, targets in stream_windows:
            piece = torch.tensor([ids + targets[-1:]])
            n = len(ids)
            state = new_state()
            for c in range(0, n, chunk):
                fed = piece[:, c:min(c + chunk, n)]
                logits = forward(fed, state).float()
                nll += torch.nn.functional.cross_entropy(logits, piece[0, c + 1:c + 1 + fed.shape[1]],
                                                         reduction="sum").item()
            count += n
            if progress is not None:
                progress(n)
    return nll, count


def prompts(documents: Sequence[str], encode: Callable[[str], list[int]], n: int,
            length: int = PROMPT_TOKENS) -> list[list[int]]:
    """Up to `n` prompts: the first `length` ids of evenly spread documents that have that many."""
    step = max(1, len(documents) // n)
    out = []
    for doc in documents[::step]:
        ids = encode(doc)
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            break
    return out


def decode_trials(prefill_fn, step_fn, prompts: Sequence[Sequence[int]], decode_tokens: int, trials: int = 3,
                  warmup: int = 1, after_warmup=None, continuations: Sequence[Sequence[int]] | None = None) -> dict:
    """Greedy prefill + decode speed: `warmup` generations (not timed), then `trials` rounds over
    all prompts; each round's tokens/s is its tokens over its time; the result is the median round.
    prefill_fn(ids) -> (state, logits); step_fn(state, token) -> logits; logits have .argmax();
    after_warmup() runs between the warm-up and the trials (e.g. to reset statistics).

    `continuations` (one per prompt, at least decode_tokens - 1 ids each) feeds the text's own next
    tokens instead of the argmax (still computed: the work per step is the same). For models whose
    greedy output means nothing (random weights with baked routing): their argmax loops on a few
    tokens, whose routing flatters every cache; the text's tokens route like text."""
    if continuations is not None and (len(continuations) < len(prompts)
                                      or any(len(c) < decode_tokens - 1 for c in continuations)):
        raise ValueError(f"need a continuation of at least {decode_tokens - 1} ids for each of the "
                         f"{len(prompts)} prompts")

    def generate(i):
        t0 = time.perf_counter()
        state, logits = prefill_fn(prompts[i])
        t1 = time.perf_counter()
        token = int(logits.argmax())
        for j in range(decode_tokens - 1):
            if continuations is not None:
                token = int(continuations[i][j])
            token = int(step_fn(state, token).argmax())
        return t1 - t0, time.perf_counter() - t1

    for i in range(warmup):
        generate(i % len(prompts))
    if after_warmup is not None:
        after_warmup()
    prefill, decode = [], []
    for _ in range(max(1, trials)):
        pre_s = dec_s = 0.0
        for i in range(len(prompts)):
            a, b = generate(i)
            pre_s, dec_s = pre_s + a, dec_s + b
        prefill.append(sum(len(p) for p in prompts) / pre_s)
        decode.append(len(prompts) * (decode_tokens - 1) / dec_s if dec_s > 0 else 0.0)
    return {"prefill_tokens_per_s": statistics.median(prefill), "decode_tokens_per_s": statistics.median(decode),
            "prefill_trials": prefill, "decode_trials": decode, "trials": len(decode), "warmup": warmup,
            "timed_tokens": len(decode) * len(prompts) * decode_tokens}
