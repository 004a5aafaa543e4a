"""Perplexity of a text file read as an ordered stream of documents (continuous serving).

Documents are processed in file order and the committee state carries from one document to the
next, as when a deployed model serves one user's successive requests. The protocol (documents,
token streams, windows, chunks) is pcmoe.protocol's, shared with the bench and its peers.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch

from pcmoe import protocol
from pcmoe.options import PcmoeError
from pcmoe.protocol import read_documents

if TYPE_CHECKING:
    from pcmoe.engine import Engine

__all__ = ["perplexity", "read_documents"]


@torch.inference_mode()
def perplexity(engine: Engine, documents: list[str], window: int = protocol.WINDOW, max_tokens: int | None = None,
               progress: bool = True, chunk: int = protocol.CHUNK) -> dict:
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
    window = protocol.fit_window(window, getattr(engine.config, "max_position_embeddings", None))
    streams = protocol.token_streams(documents, engine.encode, engine.tokenizer.eos_token_id, max_tokens)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=protocol.scored_tokens(streams, max_tokens), desc="eval", unit="tok", leave=False,
                   dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        nll, count = protocol.stream_nll(engine.forward, engine.new_state, streams, window, chunk, max_tokens,
                                         begin=engine.begin_input, progress=bar.update if bar is not None else None)
    finally:
        engine.end_input()
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    return {"ppl": math.exp(nll / count) if count else float("nan"), "nll_per_token": nll / max(count, 1),
            "tokens": count, "documents": len(documents), "seconds": elapsed,
            "tokens_per_s": count / elapsed if elapsed > 0 else 0.0}
