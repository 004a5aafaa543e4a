"""Routing traces: record a trained model's routing, replay it onto a larger checkpoint (benchmarks only).

Random-init checkpoints route unlike trained ones (a few experts per layer carry the tokens), which
flatters every expert cache. `record` runs a model over held-out text (policy full, teacher forced)
and keeps each MoE layer's top-k choices and combine weights per token; `replay` forces those
choices onto another checkpoint's routers through a fixed seeded mapping while its weights stay its
own. Every engine with replayed routing says so: `engine.load_info["routing"]` is "replayed
routing (...)", and the benchmarks copy it into their results.

Dimension legend:  L MoE layers, T tokens of the trace, k choices per token, N experts per layer
(primes for the target checkpoint: L', N', k').

The mapping (`map_trace`), fixed by a seed:
  layers   target layer j replays source layer j mod L (cyclic).
  experts  per target layer a seeded permutation of the N' experts is cut into N groups (N' >= N);
           source expert e's traffic goes to group e: a token's choice of e becomes the group
           member picked by a hash of (token id, layer, e), so a word keeps its expert, as in trained
           routing, and e's traffic is split over its group; but while consecutive tokens keep
           choosing e they stay on the member of the run's first token (consecutive overlap and
           runs carry over; measured: hashing every token alone halved the overlap).
  top-k    k' > k: each source choice fans out over ceil(k'/k) consecutive members of its group
           (its weight split evenly); k' < k: the k' heaviest source choices, renormalised.
Forcing: the block's router logits are replaced by log(weight) for the forced experts and by the
model's own logits pushed 30 below them elsewhere, so every family rule and every policy (masked
gating, exchange, on-demand) sees the forced top-k; exchange still substitutes by the model's own
preferences.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from pcmoe.options import PcmoeError
from pcmoe.replay import REPLAYED, TRACE_FORMAT, Trace, load_trace, map_trace, replay, save

__all__ = ["REPLAYED", "TRACE_FORMAT", "Trace", "load_trace", "locality", "map_trace", "record", "replay", "save"]


# -- recording -----------------------------------------------------------------------------------


def record(engine, streams: list[list[int]], window: int = 256, max_tokens: int | None = None) -> Trace:
    """Each MoE layer's unmasked top-k per token while `engine` (policy full) reads `streams`
    (token id lists) in consecutive windows of `window` tokens, a fresh context per window."""
    import torch

    from pcmoe.protocol import windows

    rows = [[] for _ in engine.layers]      # per layer: (idx [t, k], weights [t, k]) per forward
    saved = [layer.controller.router for layer in engine.layers]
    for i, layer in enumerate(engine.layers):
        layer.controller.router = _recording(saved[i], rows[i])
    tokens = []
    try:
        with torch.inference_mode():
            for stream in windows(streams, window, max_tokens):
                for ids, _ in stream:
                    if ids:
                        engine.forward(torch.tensor([ids]), engine.new_state(), last_only=True)
                        tokens += ids
    finally:
        for layer, router in zip(engine.layers, saved):
            layer.controller.router = router
    idx = np.stack([np.concatenate([r[0] for r in layer_rows]) for layer_rows in rows]).astype(np.int16)
    weights = np.stack([np.concatenate([r[1] for r in layer_rows]) for layer_rows in rows]).astype(np.float32)
    meta = {"format": TRACE_FORMAT, "model_type": engine.config.model_type, "tokens": len(tokens),
            "window": window}
    return Trace(idx, weights, np.asarray(tokens, dtype=np.int32), engine.committees[0].num_experts, meta)


def _recording(router, sink: list):
    """The router, recording the unmasked route of every forward (called once per forward with
    mask None by every policy); the one-token twin is off so that every step goes through it."""

    def route(logits, mask, batch):
        out = router.route(logits, mask, batch)
        if mask is None:
            sink.append((out.idx.numpy().copy(), out.weights.float().numpy().copy()))
        return out

    return replace(router, route=route, route_one=None)


# -- locality figures --------------------------------------------------------------------------------


def locality(idx: np.ndarray, num_experts: int, window: int = 32,
             cache_shares: tuple[float, ...] = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)) -> dict:
    """Locality of a routing stream idx [L, T, k]: mean per-layer entropy of the experts used within
    windows of `window` tokens (bits, and as a share of log2 N), mean overlap of consecutive tokens'
    expert sets (share of k), and the hit rate of a per-layer LRU cache of each share of N experts
    and of m * k experts (m = 1, 2, 3, 4, 6: the curve to compare where k/N differs)."""
    L, T, k = idx.shape
    ent = []
    for j in range(L):
        for start in range(0, T - window + 1, window):
            counts = np.bincount(idx[j, start:start + window].reshape(-1).clip(min=0), minlength=num_experts)
            p = counts[counts > 0] / counts.sum()
            ent.append(float(-(p * np.log2(p)).sum()))
    overlap = []
    for j in range(L):
        a, b = idx[j, :-1], idx[j, 1:]                                          # [T-1, k]
        overlap.append(float(((a[:, :, None] == b[:, None, :]) & (a[:, :, None] >= 0)).any(2).sum(1).mean() / k))
    curve = {}
    for share in cache_shares:
        cap = max(1, round(share * num_experts))
        curve[f"{share:g}"] = float(np.mean([_lru_hits(idx[j], cap) for j in range(L)]))
    # the same per slot of capacity per choice (capacity = m * k): equal when the sparsity k/N differs
    per_k = {str(m): float(np.mean([_lru_hits(idx[j], min(m * k, num_experts)) for j in range(L)]))
             for m in (1, 2, 3, 4, 6)}
    usage = [np.bincount(idx[j].reshape(-1).clip(min=0), minlength=num_experts) for j in range(L)]
    carried = [int(np.searchsorted(np.cumsum(np.sort(u)[::-1]) / u.sum(), 0.9) + 1) for u in usage]
    return {"tokens": T, "layers": L, "experts": num_experts, "top_k": k, "window": window,
            "window_entropy_bits": float(np.mean(ent)) if ent else 0.0,
            "window_entropy_share": float(np.mean(ent) / math.log2(num_experts)) if ent else 0.0,
            "consecutive_overlap": float(np.mean(overlap)),
            "experts_for_90pct_traffic_share": float(np.mean(carried) / num_experts),
            "lru_hit_rate": curve, "lru_hit_rate_per_k": per_k}


def _lru_hits(idx: np.ndarray, capacity: int) -> float:
    """Hit rate of an LRU cache of `capacity` experts over one layer's choices idx [T, k]."""
    from collections import OrderedDict

    cache: OrderedDict[int, None] = OrderedDict()
    hits = total = 0
    for row in idx.tolist():
        for e in row:
            if e < 0:
                continue
            total += 1
            if e in cache:
                hits += 1
                cache.move_to_end(e)
            else:
                cache[e] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
    return hits / total if total else 1.0


# -- `pcmoe trace` ---------------------------------------------------------------------------------


def fill_trace(p) -> None:
    from pcmoe.args import add_model

    add_model(p)
    p.add_argument("--data", required=True, help="held-out text (same format as eval)")
    p.add_argument("-o", "--out", required=True, help="output trace (.npz)")
    p.add_argument("--window", type=int, default=256, help="tokens per context window (default 256)")
    p.add_argument("--max-tokens", type=int, help="stop after this many tokens of the text (default: all of it)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.set_defaults(func=cmd_trace, check=check_trace)


def check_trace(args) -> None:
    if args.window < 1:
        raise PcmoeError("--window must be at least 1")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise PcmoeError("--max-tokens must be at least 1")
    if not Path(args.data).is_file():
        raise PcmoeError(f"data file {args.data} does not exist")


def cmd_trace(args) -> int:
    """Record the model's routing (policy full, exact) over the text and write the trace."""
    import sys

    from pcmoe.engine import load
    from pcmoe.protocol import fit_window, read_documents, token_streams

    documents = read_documents(args.data)
    engine = load(args.model, policy="full", progress=False, threads=args.threads)
    try:
        eos = engine.tokenizer.eos_token_id if engine.tokenizer is not None else None
        streams = token_streams(documents, engine.encode, eos, args.max_tokens)
        trace = record(engine, streams, fit_window(args.window, engine.context), args.max_tokens)
    finally:
        engine.close()
    trace.meta.update(model=str(args.model), data=Path(args.data).name)
    save(trace, args.out)
    print(f"wrote {args.out}: routing of {trace.idx.shape[1]} tokens, {trace.layers} MoE layers x "
          f"{trace.num_experts} experts, top-{trace.top_k}", file=sys.stderr)
    return 0
