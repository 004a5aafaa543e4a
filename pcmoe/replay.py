"""Replayed routing (benchmarks only): a recorded trace (pcmoe.trace) forced onto another
checkpoint's routers through a fixed seeded mapping; the load option routing_trace=... installs it.
See pcmoe.trace for the method. Torch-free at import; imports nothing of the loader.

Dimension legend:  L MoE layers, T tokens of the trace, k choices per token, N experts per layer
(primes for the target checkpoint: L', N', k').
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pcmoe.options import PcmoeError
from pcmoe.system import atomic_write_bytes

TRACE_FORMAT = "pcmoe-routing-trace/1"
REPLAYED = "replayed routing"


@dataclass
class Trace:
    idx: np.ndarray        # [L, T, k] int16 expert ids
    weights: np.ndarray    # [L, T, k] float32 combine weights
    tokens: np.ndarray     # [T] int32 token ids (what each row routed)
    num_experts: int
    meta: dict

    @property
    def layers(self) -> int:
        return self.idx.shape[0]

    @property
    def top_k(self) -> int:
        return self.idx.shape[2]


def save(trace: Trace, path: str | Path) -> None:
    import json

    buf = io.BytesIO()
    np.savez_compressed(buf, idx=trace.idx, weights=trace.weights, tokens=trace.tokens,
                        num_experts=np.int64(trace.num_experts), meta=np.asarray(json.dumps(trace.meta)))
    atomic_write_bytes(path, buf.getvalue())


def load_trace(path: str | Path) -> Trace:
    import json

    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            trace = Trace(z["idx"], z["weights"], z["tokens"], int(z["num_experts"]), meta)
    except FileNotFoundError:
        raise PcmoeError(f"routing trace {path} does not exist") from None
    except (OSError, KeyError, ValueError) as e:
        raise PcmoeError(f"routing trace {path} is not a pcmoe trace ({type(e).__name__})") from None
    if meta.get("format") != TRACE_FORMAT or trace.idx.ndim != 3 or trace.idx.shape != trace.weights.shape \
            or trace.idx.shape[1] != len(trace.tokens):
        raise PcmoeError(f"routing trace {path} is not a {TRACE_FORMAT} file")
    return trace


# -- mapping and replay ----------------------------------------------------------------------------


def map_trace(trace: Trace, layers: int, num_experts: int, top_k: int, seed: int = 0) -> Trace:
    """The trace as a model of `layers` MoE layers x `num_experts` experts (top-`top_k`) routes it:
    see the module docstring. Deterministic in the seed."""
    N, k = trace.num_experts, trace.top_k
    if num_experts < N:
        raise PcmoeError(f"cannot replay a trace of {N} experts per layer onto {num_experts}: the target needs "
                         "at least as many experts")
    fan = math.ceil(top_k / k)
    group_size = num_experts // N
    if fan > group_size:
        raise PcmoeError(f"cannot replay top-{k} routing over {N} experts as top-{top_k} over {num_experts}: each "
                         f"choice would fan out over {fan} experts of groups of {group_size}")
    rng = np.random.default_rng(seed)
    T = trace.idx.shape[1]
    out_idx = np.empty((layers, T, top_k), dtype=np.int16)
    out_w = np.empty((layers, T, top_k), dtype=np.float32)
    for j in range(layers):
        src_idx, src_w = trace.idx[j % trace.layers], trace.weights[j % trace.layers]        # [T, k]
        if top_k < k:
            src_idx, src_w = src_idx[:, :top_k], src_w[:, :top_k]
        perm = rng.permutation(num_experts)
        groups = np.array_split(perm, N)                                  # N groups of N'/N or one more
        sizes = np.array([len(g) for g in groups])                        # [N]
        table = np.full((N, sizes.max()), -1, dtype=np.int64)             # [N, max group]
        for g, members in enumerate(groups):
            table[g, :len(members)] = members
        salt = rng.integers(1, 2**31, size=N, dtype=np.int64)             # per source expert
        e = src_idx.astype(np.int64).clip(min=0)                          # [T, kk]
        h = (trace.tokens.astype(np.int64)[:, None] * 2654435761 + salt[e]) % (2**31)
        pick = _sticky(e, h % sizes[e])                                   # [T, kk] member of the group
        cols_idx, cols_w = [], []
        for c in range(top_k):
            s = c % src_idx.shape[1]
            share = math.ceil((top_k - s) / src_idx.shape[1])             # sub-choices source choice s gets
            member = (pick[:, s] + c // src_idx.shape[1]) % sizes[e[:, s]]
            cols_idx.append(np.where(src_idx[:, s] >= 0, table[e[:, s], member], -1))
            cols_w.append(src_w[:, s] / share)
        idx_j, w_j = np.stack(cols_idx, 1), np.stack(cols_w, 1)
        if top_k < k:
            w_j = w_j / np.clip(w_j.sum(1, keepdims=True), 1e-20, None)
        out_idx[j], out_w[j] = idx_j, w_j
    meta = {**trace.meta, "replayed_onto": {"layers": layers, "experts": num_experts, "top_k": top_k, "seed": seed}}
    return Trace(out_idx, out_w, trace.tokens, num_experts, meta)


def _sticky(experts: np.ndarray, fresh: np.ndarray) -> np.ndarray:
    """Group members picked per (token, choice): an expert the previous token also chose keeps the
    member it had (a run of one trained expert stays on one target expert, so consecutive-token
    overlap carries over); otherwise the token's hash picks. experts, fresh [T, kk] -> [T, kk]."""
    out = fresh.copy()
    last: dict[int, int] = {}
    for t, (row, picks) in enumerate(zip(experts.tolist(), fresh.tolist())):
        now = {}
        for s, (e, p) in enumerate(zip(row, picks)):
            now[e] = out[t, s] = last.get(e, p)
        last = now
    return out


def replay(engine, trace_path: str | Path, seed: int = 0) -> str:
    """Force the (mapped) trace's choices onto every MoE layer of `engine`, in trace order from its
    first token on, wrapping at the end. Marks the engine ("replayed routing ...") and returns the mark."""
    import torch

    trace = load_trace(trace_path)
    N = engine.committees[0].num_experts
    mapped = map_trace(trace, len(engine.layers), N, engine.layers[0].controller.router.top_k, seed)
    for j, layer in enumerate(engine.layers):
        block = layer.block
        block.bound = replace(block.bound, logits=_Forced(block.bound.logits, torch.from_numpy(mapped.idx[j].astype(
            np.int64)), torch.from_numpy(mapped.weights[j])))
    mark = (f"{REPLAYED} ({Path(trace_path).name}: {trace.meta.get('model_type')} {trace.layers}x{trace.num_experts} "
            f"top-{trace.top_k} onto {len(engine.layers)}x{N}, seed {seed})")
    engine.load_info["routing"] = mark
    return mark


class _Forced:
    """A block's router logits with the trace's choices forced: x [T, H] -> logits [T, N] float32."""

    GAP = 30.0  # how far below the weakest forced expert every other expert's logit is pushed

    def __init__(self, logits, idx, weights):
        self.logits, self.idx, self.weights = logits, idx, weights   # [T_trace, k'] each
        self.cursor = 0

    def __call__(self, x):
        import torch

        own = self.logits(x).float()                                          # [T, N]
        T, total = own.shape[0], self.idx.shape[0]
        rows = torch.arange(self.cursor, self.cursor + T) % total
        self.cursor = (self.cursor + T) % total
        idx, w = self.idx[rows], self.weights[rows]                           # [T, k']
        logw = torch.log(w.clamp(min=1e-12))
        floor = logw.min(dim=1, keepdim=True).values - self.GAP               # [T, 1]
        out = own - own.max(dim=1, keepdim=True).values + floor               # every own logit below the floor
        valid = idx >= 0
        return out.scatter(1, idx.clamp(min=0), torch.where(valid, logw, out.gather(1, idx.clamp(min=0))))
