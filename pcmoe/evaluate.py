"""Perplexity of a text file read as an ordered stream of documents (continuous serving).

Documents are separated by a blank line followed by a line `=====`, or by form feeds. They are
processed in file order and the committee state carries from one document to the next, as when a
deployed model serves one user's successive requests.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import torch

from pcmoe.engine import Engine, PcmoeError

_SEPARATOR = re.compile(r"\n[ \t]*\n=====[ \t]*(?:\n|$)|\f")


def read_documents(path: str | Path) -> list[str]:
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


@torch.inference_mode()
def perplexity(engine: Engine, documents: list[str], window: int = 256, max_tokens: int | None = None,
               progress: bool = True, chunk: int = 32) -> dict:
    """Token-level perplexity over the documents in order; each document is [eos] + text + [eos],
    scored in consecutive windows of `window` predicted tokens (no overlap). Each window is fed
    through a KV cache `chunk` tokens per forward step, as a stream is served: the committee can
    update between steps (the logits equal scoring the whole window at once)."""
    if not isinstance(window, int) or window < 1 or not isinstance(chunk, int) or chunk < 1:
        raise PcmoeError(f"window and chunk must be positive integers (got window={window!r}, chunk={chunk!r})")
    if max_tokens is not None and max_tokens < 1:
        raise PcmoeError(f"max_tokens must be positive (got {max_tokens!r})")
    if engine.tokenizer is None:
        raise PcmoeError("perplexity needs the checkpoint's tokenizer")
    if engine.family.seq2seq:
        raise PcmoeError("perplexity evaluation needs a decoder-only language model")
    limit = getattr(engine.config, "max_position_embeddings", None) or window
    window = min(window, limit)
    eos = engine.tokenizer.eos_token_id
    streams = []
    for doc in documents:
        ids = engine.encode(doc)
        streams.append(([eos] if eos is not None else []) + ids + ([eos] if eos is not None else []))
    total = sum(len(s) - 1 for s in streams)
    if max_tokens is not None:
        total = min(total, max_tokens)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="eval", unit="tok", leave=False, dynamic_ncols=True)
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    try:
        for stream in streams:
            if count >= total:
                break
            engine.begin_input()
            for start in range(0, len(stream) - 1, window):
                piece = torch.tensor([stream[start:start + window + 1]])
                n = min(piece.shape[1] - 1, total - count)
                if n <= 0:
                    break
                state = engine.new_state()
                for c in range(0, n, chunk):
                    ids = piece[:, c:min(c + chunk, n)]
                    logits = engine.forward(ids, state).float()
                    nll += torch.nn.functional.cross_entropy(logits, piece[0, c + 1:c + 1 + ids.shape[1]],
                                                             reduction="sum").item()
                count += n
                if bar is not None:
                    bar.update(n)
    finally:
        engine.end_input()
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    return {"ppl": math.exp(nll / count) if count else float("nan"), "nll_per_token": nll / max(count, 1),
            "tokens": count, "documents": len(documents), "seconds": elapsed,
            "tokens_per_s": count / elapsed if elapsed > 0 else 0.0}
