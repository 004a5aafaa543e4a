"""Baked routing (benchmarks only): a random-weight checkpoint whose routers route like a trained model.

Replayed routing (pcmoe.replay) forces a trace onto pcmoe's routers at load, which no other engine
can do. A baked checkpoint carries trained-like routing in its weights, so pcmoe, transformers and
llama.cpp (through its GGUF) all route the same way on the same text. Every result made with one
must say "baked routing" (the folder's pcmoe_baked.json holds the mark and the design).

Dimension legend:  V vocabulary, H hidden, D routing dims (a reserved slice of H), L' MoE layers,
N' experts per layer, k' top-k of the checkpoint; L, N, k those of the trace; hd head dim.

Design (every other weight stays the random checkpoint's, so bytes and compute are unchanged):
  routing dims   hidden dims [0, D) carry a routing code; no block writes there (the rows [0, D) of
                 every o_proj and expert down_proj are zero), except layer 0's context heads below,
                 so every layer's router reads the code exactly (its gate reads only those dims;
                 an RMSNorm only scales a token's logits, which leaves the top-k as it is).
  scores         per token id t and layer j, a score per expert: the trace's per-token expert
                 frequencies at source layer j mod L (fitted on the trace's tokens from --skip on,
                 smoothed by the layer's overall frequencies; tokens never seen get k experts drawn
                 from those), carried onto N' experts through replay's seeded group mapping (same
                 groups and token hash as pcmoe.replay.map_trace for the seed; each source expert
                 fans out over ceil(k'/k) members); unit norm per (t, j).
  code           embedding row t = [sum_j P_j s_j(t) (D dims) | the random row], rescaled to one norm for
                 every token; P_j [D, N'] are blocks of a seeded orthonormal basis when L'N' <= D
                 (exact), else seeded random unit columns (approximate; `built` reports agreement).
  context        a token-only map routes each word the same way everywhere, a little less locally than
                 trained routing (measured on the LM: consecutive overlap 0.22 vs 0.26). Layer 0 gets
                 ceil(D/hd) context heads (their keys zero, so they attend uniformly over the
                 context; values copy the code; o_proj writes alpha x that mean back into the
                 routing dims), so layer j routes by top-k of s_j(t) + alpha * mean_{t' <= t} s_j(t').
Top-k of a layer: argtopk(P_j^T (c_t + alpha * mean_{t'<=t} c_t')) (`simulate`, the numpy twin).
alpha 2 (the default) was chosen on the 1.3 GB checkpoint (8 x 32 experts, top-4) with the map fitted
on the whole held-out trace: consecutive overlap 0.245 and LRU hit at 50 % of experts 0.682 vs the
trained LM's 0.245 / 0.680 (benchmarks/replay_locality.py). Fitted only on other text, the same alpha
gives 0.201 / 0.622 (an unseen stretch of text routes less locally; alpha 3 brings it to ~0.24 / 0.66).
Limits: bf16 rounding flips ~1 % of (token, layer) top-k sets against the twin (near ties); with
L'N' > D the code is a random projection and routing follows the map only approximately; a GGUF
quantised below 8 bits rounds the code in the embedding, so its routing can drift from the map.

    python -m pcmoe.bench.baked --trace data/traces/pcmoe-lm-heldout.npz --experts 32 --shape mid \\
        -o data/bench/baked/qwen3-moe-e32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from pcmoe.options import PcmoeError
from pcmoe.system import atomic_write_text

BAKED = "baked routing"
DESIGN_FILE = "pcmoe_baked.json"
DEFAULT_ALPHA = 2.0


# -- the design (numpy) ------------------------------------------------------------------------------


def _groups(rng, N: int, N2: int):
    """replay.map_trace's per-layer draw: a seeded permutation of N2 cut into N groups, one salt each."""
    perm = rng.permutation(N2)
    groups = np.array_split(perm, N)
    sizes = np.array([len(g) for g in groups])                        # [N]
    table = np.full((N, sizes.max()), -1, dtype=np.int64)             # [N, max group]
    for g, members in enumerate(groups):
        table[g, :len(members)] = members
    salt = rng.integers(1, 2**31, size=N, dtype=np.int64)
    return table, sizes, salt


def scores(trace, vocab: int, layers: int, num_experts: int, top_k: int, seed: int = 0,
           skip: int = 0) -> np.ndarray:
    """Per-token expert scores s [L', V, N'] float32 (unit norm per row): see the module docstring."""
    N, k = trace.num_experts, trace.top_k
    fan = math.ceil(top_k / k)
    if num_experts < N or fan > num_experts // N:
        raise PcmoeError(f"cannot bake top-{k} routing over {N} experts into top-{top_k} over {num_experts}")
    tokens = trace.tokens[skip:].astype(np.int64) % vocab
    if len(tokens) == 0:
        raise PcmoeError(f"--skip {skip} leaves no trace tokens to fit (the trace has {len(trace.tokens)})")
    rng = np.random.default_rng(seed)
    fallback_rng = np.random.default_rng(seed + 1)
    vocab_ids = np.arange(vocab, dtype=np.int64)
    out = np.zeros((layers, vocab, num_experts), dtype=np.float32)
    for j in range(layers):
        src = trace.idx[j % trace.layers, skip:]                                     # [T, k]
        counts = np.zeros((vocab, N))
        valid = src >= 0
        np.add.at(counts, (np.repeat(tokens, k).reshape(-1, k)[valid], src[valid]), 1.0)
        marginal = counts.sum(0) / counts.sum()                                     # [N]
        seen = counts.sum(1) > 0
        for t in np.flatnonzero(~seen):                                             # k experts from the marginal
            counts[t, fallback_rng.choice(N, size=k, replace=False, p=marginal)] = 1.0
        p = (counts + marginal) / (counts.sum(1, keepdims=True) + 1.0)              # [V, N] smoothed
        table, sizes, salt = _groups(rng, N, num_experts)
        h = (vocab_ids[:, None] * 2654435761 + salt[None, :]) % (2**31)             # [V, N]
        for f in range(fan):
            member = table[np.arange(N)[None, :], (h % sizes[None, :] + f) % sizes[None, :]]   # [V, N]
            np.put_along_axis(out[j], member, (p * (1.0 - 1e-3 * f)).astype(np.float32), axis=1)
    out /= np.linalg.norm(out, axis=2, keepdims=True)
    return out


def projections(layers: int, num_experts: int, dims: int, seed: int = 0) -> np.ndarray:
    """P [L', D, N'] float64: orthonormal columns when L'N' <= D (exact), else random unit columns."""
    rng = np.random.default_rng(seed + 2)
    G = rng.standard_normal((dims, layers * num_experts))
    if layers * num_experts <= dims:
        G, _ = np.linalg.qr(G)
    else:
        G /= np.linalg.norm(G, axis=0, keepdims=True)
    return G.reshape(dims, layers, num_experts).transpose(1, 0, 2)


def codes(s: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Routing codes c [V, D] = sum_j P_j s_j(t), scaled to unit norm on average."""
    c = np.einsum("ldn,lvn->vd", P, s.astype(np.float64))
    return c / np.sqrt(s.shape[0])


def simulate(code: np.ndarray, P: np.ndarray, tokens, top_k: int, alpha: float, window: int) -> np.ndarray:
    """The numpy twin of the baked model's routing: idx [L', T, k'] for token ids read in fresh
    contexts of `window` tokens. code [V, D] as written (after any rounding), P [L', D, N']."""
    tokens = np.asarray(tokens, dtype=np.int64)
    c = code[tokens]                                                                # [T, D]
    mixed = np.empty_like(c)
    for start in range(0, len(tokens), window):
        part = c[start:start + window]
        mixed[start:start + window] = part + alpha * np.cumsum(part, 0) / np.arange(1, len(part) + 1)[:, None]
    logits = np.einsum("td,ldn->ltn", mixed, P)                                      # [L', T, N']
    return np.argsort(-logits, axis=2, kind="stable")[:, :, :top_k].astype(np.int16)


# -- the checkpoint --------------------------------------------------------------------------------


_DTYPES = {"BF16": 2, "F16": 2, "F32": 4}


def bake(source: Path, out: Path, trace_path: Path, alpha: float = DEFAULT_ALPHA, dims: int | None = None,
         seed: int = 0, skip: int = 0, progress: bool = True, tokenizer_from: Path | None = None) -> dict:
    """Write the baked copy of the random checkpoint `source` into `out` (atomically: a temporary
    folder renamed at the end), with the tokenizer files of `tokenizer_from` when the source has
    none (llama.cpp's converter needs one). Returns the design note also written to out/pcmoe_baked.json."""
    import torch
    from safetensors import safe_open

    from pcmoe.replay import load_trace

    cfg = json.loads((source / "config.json").read_text())
    if cfg.get("model_type") != "qwen3_moe":
        raise PcmoeError(f"{source}: only qwen3_moe checkpoints can be baked (got {cfg.get('model_type')})")
    files = sorted(source.glob("*.safetensors"))
    if len(files) != 1:
        raise PcmoeError(f"{source}: expected one model.safetensors (got {len(files)} files)")
    H, L2, k2, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_experts_per_tok"], cfg["vocab_size"]
    N2, hd = cfg["num_experts"] if "num_experts" in cfg else cfg["num_local_experts"], cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        raise PcmoeError(f"{source}: every layer must be an MoE layer to bake routing")
    D = dims or min(L2 * N2, H // 4, nkv * hd)
    if not 0 < D <= min(H // 2, nkv * hd):
        raise PcmoeError(f"--dims must be in 1..{min(H // 2, nkv * hd)} for this shape (hidden {H}, "
                         f"{nkv} kv heads x {hd})")
    trace = load_trace(trace_path)
    s = scores(trace, V, L2, N2, k2, seed, skip)                                      # [L', V, N']
    P = projections(L2, N2, D, seed)                                                  # [L', D, N']
    code = codes(s, P)                                                                # [V, D]
    heads = math.ceil(D / hd)                       # layer 0's context heads (one per kv group)
    per_group = nq // nkv

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with safe_open(str(files[0]), framework="pt") as f:
        names = list(f.keys())
        meta = {n: (f.get_slice(n).get_dtype(), f.get_slice(n).get_shape()) for n in names}
        header, offset = {}, 0
        for n in names:
            dtype, shape = meta[n]
            size = _DTYPES[dtype] * math.prod(shape)
            header[n] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt", "pcmoe_routing": BAKED}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        bar = _bar(offset, progress)
        written_code = None
        R = float(f.get_tensor("model.embed_tokens.weight").double().norm(dim=1).mean())  # embedding row norm
        ctx = dict(code=code, P=P, alpha=alpha, D=D, H=H, hd=hd, heads=heads, per_group=per_group, R=R, L=L2)
        with open(tmp / "model.safetensors", "wb") as w:
            w.write(len(blob).to_bytes(8, "little"))
            w.write(blob)
            for n in names:
                t = f.get_tensor(n)
                t, row_code = _baked_tensor(n, t, ctx)
                if row_code is not None:
                    written_code = row_code
                w.write(t.contiguous().view(torch.uint8).numpy().tobytes())
                bar.update(header[n]["data_offsets"][1] - header[n]["data_offsets"][0])
            w.flush()
            os.fsync(w.fileno())
        bar.close()
    for extra in source.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name != DESIGN_FILE:
            shutil.copy2(extra, tmp / extra.name)
    if tokenizer_from is not None and not (tmp / "tokenizer.json").exists():
        from pcmoe.bench.scale import TOKENIZER_FILES

        for name in TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).exists():
                shutil.copy2(Path(tokenizer_from) / name, tmp / name)
    # how often the numpy twin on the written (rounded) code picks the designed experts
    sample = trace.tokens[skip:skip + 4096] % V if skip < len(trace.tokens) else trace.tokens[:4096] % V
    twin = simulate(written_code, P, sample, k2, 0.0, 256)
    designed = np.argsort(-s[:, sample], axis=2, kind="stable")[:, :, :k2]
    agree = float((np.sort(twin, 2) == np.sort(designed, 2)).all(2).mean())
    note = {"routing": f"{BAKED} ({trace_path.name}: {trace.meta.get('model_type')} {trace.layers}x"
                       f"{trace.num_experts} top-{trace.top_k} into {L2}x{N2} top-{k2}, seed {seed}, "
                       f"alpha {alpha:g}, {D} routing dims)",
            "trace": str(trace_path), "seed": seed, "alpha": alpha, "routing_dims": D, "skip": skip,
            "exact": L2 * N2 <= D, "context_heads": heads, "source": str(source),
            "token_map_agreement": agree}
    atomic_write_text(tmp / DESIGN_FILE, json.dumps(note, indent=1))
    np.savez_compressed(tmp / "pcmoe_baked_design.npz", code=written_code.astype(np.float32),
                        projections=P.astype(np.float32))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return note


def _baked_tensor(name: str, t, ctx: dict):
    """One tensor of the baked checkpoint (torch, same dtype and shape) and, for the embedding, the
    routing code as written (float64 [V, D], after rounding to the tensor's dtype).

    Scales: embedding rows have norm R, their code part code * R * sqrt(D / H) (the other dims'
    scale); after an RMSNorm (rms R / sqrt(H)) the code reads code * sqrt(D)."""
    import torch

    code, P, alpha, D, H, hd, R = (ctx[x] for x in ("code", "P", "alpha", "D", "H", "hd", "R"))

    parts = name.split(".")
    layer = int(parts[2]) if name.startswith("model.layers.") else None
    if name == "model.embed_tokens.weight":
        w = t.double()                                                              # [V, H]
        rest = w[:, D:] / w[:, D:].norm(dim=1, keepdim=True)
        c = torch.from_numpy(code) * R * math.sqrt(D / H)                           # [V, D] at the embedding's scale
        rest = rest * (R ** 2 - c.pow(2).sum(1, keepdim=True)).clamp(min=0).sqrt()  # every row of norm R
        w = torch.cat([c, rest], 1).to(t.dtype)
        return w, w[:, :D].double().numpy() / (R * math.sqrt(D / H))
    if layer is None:
        return t, None
    if name.endswith("mlp.gate.weight"):                                            # [N', H] router
        g = torch.zeros(t.shape, dtype=torch.float64)
        # logits ~ gain * s_j(t) / sqrt(L'): a top score of ~4 at layer 0 (later layers' rms grows: smaller)
        g[:, :D] = torch.from_numpy(P[layer].T) * (8.0 * math.sqrt(ctx["L"]) / math.sqrt(D))
        return g.to(t.dtype), None
    if name.endswith("down_proj.weight") or name.endswith("self_attn.o_proj.weight"):  # [H, *] writes
        w = t.clone()
        w[:D] = 0
        if layer == 0 and name.endswith("o_proj.weight"):
            # context heads: head h (first q head of kv group h) reads mean(code) * sqrt(D) and writes
            # alpha x mean(code) at the residual's code scale into chunk h of the routing dims
            scale = alpha * R / math.sqrt(H)
            for h in range(ctx["heads"]):
                lo, hi = h * hd, min((h + 1) * hd, D)
                q = h * ctx["per_group"]
                w[lo:hi, q * hd:q * hd + (hi - lo)] = torch.eye(hi - lo, dtype=t.dtype) * scale
        return w, None
    if layer == 0 and (name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.v_proj.weight")):
        w = t.clone()                                                               # [nkv * hd, H]
        rows = slice(0, ctx["heads"] * hd)
        w[rows] = 0
        if name.endswith("v_proj.weight"):
            for h in range(ctx["heads"]):
                lo, hi = h * hd, min((h + 1) * hd, D)
                w[lo:hi, lo:hi] = torch.eye(hi - lo, dtype=t.dtype)                # value = code chunk h
        return w, None
    if name.endswith("layernorm.weight"):                                            # [H] norms reading the code
        w = t.clone()
        w[:D] = 1
        return w, None
    return t, None


def _bar(total: int, on: bool):
    if on:
        from tqdm import tqdm

        return tqdm(total=total, unit="B", unit_scale=True, desc="baking", leave=False, file=sys.stderr)

    class _Quiet:
        def update(self, n):
            pass

        def close(self):
            pass

    return _Quiet()


# -- llama.cpp's own routing (a check) ------------------------------------------------------------


def llamacpp_routing(gguf_file: Path, ids: list[int], layers: int) -> np.ndarray:
    """The experts llama.cpp picks per layer for `ids` (one context): idx [L', T, k'], read from its
    "ffn_moe_topk-<layer>" graph tensors through the eval callback (llama-cpp-python)."""
    import ctypes

    import llama_cpp
    from llama_cpp import _internals

    class Tensor(ctypes.Structure):  # struct ggml_tensor (ggml.h), up to the name
        _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                    ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                    ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                    ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]

    lib = next(Path(llama_cpp.__file__).parent.glob("lib/libggml-base.so*"))
    get = ctypes.CDLL(str(lib)).ggml_backend_tensor_get
    get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    found: dict[int, np.ndarray] = {}

    def on_tensor(ptr, ask, _user):
        t = Tensor.from_address(ptr)
        name = t.name.decode(errors="replace")
        if not name.startswith("ffn_moe_topk-"):
            return not ask  # ask: we want no other tensor
        if ask:
            return True
        k, n = t.ne[0], t.ne[1]
        buf = np.empty((n, k), dtype=np.int32)
        if t.nb[1] == 4 * k:
            get(ptr, buf.ctypes.data, 0, buf.nbytes)
        else:  # a strided view: row by row
            for r in range(n):
                get(ptr, buf[r].ctypes.data, r * t.nb[1], 4 * k)
        found[int(name.rsplit("-", 1)[1])] = buf
        return True

    callback = llama_cpp.ggml_backend_sched_eval_callback(on_tensor)
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=max(64, len(ids) + 8), n_batch=max(64, len(ids)),
                          logits_all=True, verbose=False, n_threads=1)  # all rows: the last layer too
    try:
        llm.context_params.cb_eval = callback
        llm._ctx = _internals.LlamaContext(model=llm._model, params=llm.context_params, verbose=False)
        llm.eval(ids)
    finally:
        llm.close()
    if sorted(found) != list(range(layers)):
        raise PcmoeError(f"llama.cpp reported routing for layers {sorted(found)}, expected 0..{layers - 1}")
    return np.stack([found[j] for j in range(layers)]).astype(np.int16)


# -- command line ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pcmoe.bench.baked", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True, type=Path, help="routing trace of the trained model (pcmoe trace)")
    ap.add_argument("-o", "--out", required=True, type=Path, help="folder of the baked checkpoint (under data/)")
    ap.add_argument("--source", type=Path, help="random qwen3_moe checkpoint to bake (default: pcmoe.bench."
                                                 "scaling's data/bench/scaling/qwen3-moe[-tiny]-e<experts>, built "
                                                 "when missing)")
    ap.add_argument("--experts", type=int, default=32, help="experts per layer of the default source (default 32)")
    ap.add_argument("--shape", default="mid", choices=("tiny", "mid"), help="shape of the default source")
    ap.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                    help=f"weight of the context mean in the routing signal (default {DEFAULT_ALPHA}; 0: token only)")
    ap.add_argument("--dims", type=int, help="routing dims reserved in the hidden state (default min(L'N', H/4, "
                                             "kv heads x head dim); exact when L'N' <= dims)")
    ap.add_argument("--skip", type=int, default=0, help="leave the trace's first SKIP tokens out of the fit (to "
                                                        "evaluate on them)")
    ap.add_argument("--seed", type=int, default=0, help="mapping seed (same groups as routing_trace_seed)")
    ap.add_argument("--tokenizer-from", type=Path, default=Path("models/pcmoe-lm"),
                    help="copy this folder's tokenizer files when the source has none (default models/pcmoe-lm; "
                         "the trace's token ids must be below the checkpoint's vocabulary)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        if args.alpha < 0:
            raise PcmoeError("--alpha must be at least 0")
        if args.skip < 0:
            raise PcmoeError("--skip must be at least 0")
        if args.experts < 1:
            raise PcmoeError("--experts must be at least 1")
        if not args.trace.is_file():
            raise PcmoeError(f"routing trace {args.trace} does not exist")
        source = args.source
        if source is None:
            from pcmoe.bench import scaling

            name = f"qwen3-moe-e{args.experts}" if args.shape == "mid" else f"qwen3-moe-{args.shape}-e{args.experts}"
            source = Path("data/bench/scaling") / name
            scaling.build(source, args.experts, args.shape)
        elif not (source / "config.json").is_file():
            raise PcmoeError(f"source checkpoint {source} has no config.json")
        tokenizer = args.tokenizer_from if (args.tokenizer_from / "tokenizer.json").is_file() else None
        note = bake(source, args.out, args.trace, args.alpha, args.dims, args.seed, args.skip, not args.quiet,
                    tokenizer)
    except PcmoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {note['routing']}; designed top-k reproduced by the written code for "
          f"{100 * note['token_map_agreement']:.1f} % of (token, layer) pairs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
