"""Locality of replayed routing next to the trained model's (issue 14, item 1).

Records the shipped LM's routing on held-out text (`pcmoe trace`, unless --trace exists), replays it
onto a random-weight Qwen3-MoE checkpoint built by pcmoe.bench.scaling (more experts, more layers,
another top-k) and compares, for the same tokens:

  trained      the trace itself (the shipped LM, policy full)
  mapped       the trace through the seeded mapping (pcmoe.trace.map_trace), as arrays
  replayed     what the large checkpoint's routers actually chose with routing_trace=... (recorded
               through its engine: checks the forcing end to end; must equal `mapped`)
  random-init  the large checkpoint's own routing (what scale benchmarks measured before)
  baked        a copy of the large checkpoint with the routing baked into its weights
               (pcmoe.bench.baked: every engine sees it), its own routing recorded like random-init;
               the map fitted on the whole trace (the text compared included)
  baked, held-out fit   the same, the map fitted only on the trace's tokens after those compared

Figures: window entropy (share of log2 N), consecutive-token overlap, share of experts carrying
90 % of the traffic, and the LRU hit curve at cache shares of N. Writes replay_locality.json and
.md atomically. Every row of "replayed" is marked "replayed routing", every "baked" row "baked routing".

    python benchmarks/replay_locality.py --out docs/results [--experts 32 --shape tiny] [--tokens 8192]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pcmoe.system import atomic_write_text  # noqa: E402


def _record(folder: Path, tokens: list[int], **options) -> tuple[object, str | None]:
    import pcmoe
    from pcmoe import trace as tr

    engine = pcmoe.load(folder, policy="full", progress=False, **options)
    try:
        vocab = engine.config.vocab_size
        # one more token at the end: the windows feed every token but the last of a stream
        out = tr.record(engine, [[t % vocab for t in tokens] + [0]], window=256)
        return out, engine.load_info.get("routing")
    finally:
        engine.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(ROOT / "models" / "pcmoe-lm"), help="the trained model")
    ap.add_argument("--data", default=str(ROOT / "models" / "pcmoe-lm" / "eval" / "heldout.txt"))
    ap.add_argument("--trace", default=str(ROOT / "data" / "traces" / "pcmoe-lm-heldout.npz"),
                    help="routing trace (recorded first when missing)")
    ap.add_argument("--target", help="large checkpoint folder (default: pcmoe.bench.scaling's "
                                     "data/bench/scaling/qwen3-moe[-tiny]-e<experts>, built when missing)")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--shape", default="mid", choices=("tiny", "mid"),
                    help="mid: the 1.2 GB study checkpoint at 32 experts (top-4); tiny: seconds")
    ap.add_argument("--tokens", type=int, default=8192, help="trace tokens compared (default 8192)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alpha", type=float, help="baked routing's context weight (default: pcmoe.bench.baked's)")
    ap.add_argument("--no-baked", action="store_true", help="leave out the baked rows (no checkpoint copies)")
    ap.add_argument("--llamacpp", default="", help="comma-separated GGUF types (f32, bf16, q8_0, q4_K_M): convert the "
                                                   "baked checkpoint and compare llama.cpp's top-k with pcmoe's on the "
                                                   "first --llamacpp-tokens tokens (needs llama-cpp-python)")
    ap.add_argument("--llamacpp-tokens", type=int, default=64)
    ap.add_argument("--llamacpp-src", default=str(ROOT / "data" / "llamacpp"), help="GGUF converter source")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = ap.parse_args(argv)

    import numpy as np

    from pcmoe import trace as tr
    from pcmoe.bench import scaling

    trace_path = Path(args.trace)
    if not trace_path.exists():
        from pcmoe.cli import main as cli

        trace_path.parent.mkdir(parents=True, exist_ok=True)
        if cli(["trace", "--model", args.source, "--data", args.data, "-o", str(trace_path)]) != 0:
            return 2
    trace = tr.load_trace(trace_path)
    T = min(args.tokens, trace.idx.shape[1])
    trace = tr.Trace(trace.idx[:, :T], trace.weights[:, :T], trace.tokens[:T], trace.num_experts, trace.meta)
    part = trace_path.with_name(f"{trace_path.stem}-first{T}.npz")
    tr.save(trace, part)

    name = f"qwen3-moe-e{args.experts}" if args.shape == "mid" else f"qwen3-moe-{args.shape}-e{args.experts}"
    target = Path(args.target) if args.target else ROOT / "data" / "bench" / "scaling" / name
    scaling.build(target, args.experts, args.shape)
    tokens = trace.tokens.tolist()
    replayed, mark = _record(target, tokens, routing_trace=str(part), routing_trace_seed=args.seed)
    own, _ = _record(target, tokens)
    N2, L2, k2 = own.num_experts, own.layers, own.top_k
    mapped = tr.map_trace(trace, L2, N2, k2, args.seed)
    same = float((np.sort(replayed.idx, axis=2) == np.sort(mapped.idx, axis=2)).all(axis=2).mean())

    replayed_layers = [j % trace.layers for j in range(L2)]  # the trained layers the target replays
    rows = {"trained": tr.locality(trace.idx[replayed_layers], trace.num_experts),
            "mapped": tr.locality(mapped.idx, N2),
            "replayed": {**tr.locality(replayed.idx, N2), "routing": mark}, "random-init": tr.locality(own.idx, N2)}
    if not args.no_baked:
        from pcmoe.bench import baked

        alpha = baked.DEFAULT_ALPHA if args.alpha is None else args.alpha
        for label, skip in (("baked", 0), ("baked, held-out fit", T)):
            folder = target.with_name(f"{target.name}-baked" + ("-heldout" if skip else ""))
            note = baked.bake(target, folder, trace_path, alpha=alpha, seed=args.seed, skip=skip,
                              tokenizer_from=Path(args.source))  # the trained LM's tokenizer: GGUF-convertible
            got, _ = _record(folder, tokens)
            design = np.load(folder / "pcmoe_baked_design.npz")
            vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
            twin = baked.simulate(design["code"].astype(np.float64), design["projections"].astype(np.float64),
                                  [t % vocab for t in tokens], k2, alpha, 256)
            rows[label] = {**tr.locality(got.idx, N2), "routing": note["routing"], "fit_skip": skip,
                           "equals_numpy_twin": float((np.sort(got.idx, 2) == np.sort(twin, 2)).all(2).mean())}
            if skip == 0 and args.llamacpp:
                llama = _llamacpp_check(folder, tokens[:args.llamacpp_tokens], got.idx[:, :args.llamacpp_tokens],
                                        args.llamacpp.split(","), args.llamacpp_src)
    result = {"benchmark": "replay_locality",
              "routing_note": "rows 'mapped' and 'replayed' are replayed routing; rows 'baked...' baked routing",
              "source": {"model": args.source, "data": Path(args.data).name, "layers": trace.layers,
                         "experts": trace.num_experts, "top_k": trace.top_k},
              "target": {"model": str(target), "layers": L2, "experts": N2, "top_k": k2},
              "tokens": T, "seed": args.seed, "replayed_equals_mapped": same, "rows": rows}
    if args.llamacpp and not args.no_baked:
        result["llamacpp_baked"] = llama
    out = Path(args.out)
    atomic_write_text(out / "replay_locality.json", json.dumps(result, indent=1))
    atomic_write_text(out / "replay_locality.md", markdown(result))
    print(markdown(result))
    return 0


def _llamacpp_check(folder: Path, tokens: list[int], pcmoe_idx, types: list[str], src: str) -> dict:
    """llama.cpp's own top-k on the baked checkpoint's GGUF of each type vs pcmoe's, one context."""
    import numpy as np

    from pcmoe.bench import baked, gguf

    out = {"tokens": len(tokens)}
    for q in types:
        f = gguf.convert(folder, folder.parent.parent / "baked-gguf" / f"{folder.name}-{q}.gguf", q, src=src)
        idx = baked.llamacpp_routing(f, tokens, pcmoe_idx.shape[0])
        same = (np.sort(idx, 2) == np.sort(pcmoe_idx, 2)).all(2)                     # [L', T]
        overlap = (idx[:, :, :, None] == pcmoe_idx[:, :, None, :]).any(3).mean()
        out[q] = {"same_topk_share": float(same.mean()), "expert_overlap": float(overlap),
                  "same_topk_per_layer": [float(x) for x in same.mean(1)]}
    return out


def markdown(r: dict) -> str:
    s, t = r["source"], r["target"]
    shares = list(r["rows"]["trained"]["lru_hit_rate"])
    lines = ["# Replayed routing: locality (issue 14)", "",
             f"Source: {s['model']} on {s['data']} ({s['layers']} MoE layers x {s['experts']} experts, "
             f"top-{s['top_k']}), {r['tokens']} tokens. Target: {t['model']} ({t['layers']} x {t['experts']}, "
             f"top-{t['top_k']}), random "
             f"weights. Mapping seed {r['seed']}. **Rows mapped and replayed are replayed routing** (benchmarks "
             f"only); replayed = the target engine's recorded choices, identical to mapped for "
             f"{100 * r['replayed_equals_mapped']:.1f} % of (token, layer) pairs.", "",
             "| routing | window entropy (share of log2 N) | consecutive overlap | experts for 90 % of traffic | "
             + " | ".join(f"LRU {float(x):.0%}" for x in shares) + " |",
             "|---|---|---|---|" + "---|" * len(shares)]
    note = {"trained": " (the layers replayed)", "mapped": " (replayed routing)", "replayed": " (replayed routing)",
            "baked": " (baked routing)", "baked, held-out fit": " (baked routing)"}
    for name, row in r["rows"].items():
        lines.append(f"| {name}{note.get(name, '')} | {row['window_entropy_share']:.3f} "
                     f"({row['window_entropy_bits']:.2f} bits) | "
                     f"{row['consecutive_overlap']:.3f} | {row['experts_for_90pct_traffic_share']:.0%} | "
                     + " | ".join(f"{row['lru_hit_rate'][x]:.3f}" for x in shares) + " |")
    per_k = list(r["rows"]["trained"]["lru_hit_rate_per_k"])
    lines += ["", "LRU hit rate by capacity in units of k (a cache of m x k experts; the curve to compare "
              "when the sparsity k/N differs):", "",
              "| routing | " + " | ".join(f"{m} x k" for m in per_k) + " |", "|---|" + "---|" * len(per_k)]
    for name, row in r["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row['lru_hit_rate_per_k'][m]:.3f}" for m in per_k) + " |")
    baked_rows = [(n, row) for n, row in r["rows"].items() if n.startswith("baked")]
    if baked_rows:
        lines += ["", "**Baked routing** (pcmoe.bench.baked; benchmarks only): the routing is in the checkpoint's "
                  "weights, so pcmoe, transformers and llama.cpp (GGUF) all route this way. "
                  + " ".join(f"{n}: {row['routing']}; the engine's recorded top-k equals the numpy twin's for "
                             f"{100 * row['equals_numpy_twin']:.1f} % of (token, layer) pairs."
                             for n, row in baked_rows)]
    if r.get("llamacpp_baked"):
        lc = r["llamacpp_baked"]
        lines += ["", f"llama.cpp on the baked checkpoint's GGUF (its own top-k, read from its graph, first "
                  f"{lc['tokens']} tokens, one context) vs pcmoe's: "
                  + "; ".join(f"{q}: same top-k set for {100 * v['same_topk_share']:.1f} % of (token, layer) pairs, "
                              f"{100 * v['expert_overlap']:.1f} % of choices shared" for q, v in lc.items()
                              if q != "tokens") + "."]
    lines += ["", "Window: 32 tokens. LRU x %: hit rate of a per-layer LRU cache holding x % of the layer's experts.",
              "Command: `python benchmarks/replay_locality.py --out docs/results --experts "
              f"{t['experts']} --shape {'tiny' if 'tiny' in t['model'] else 'mid'} --tokens {r['tokens']}"
              + (f" --llamacpp {','.join(q for q in r['llamacpp_baked'] if q != 'tokens')}" if r.get("llamacpp_baked")
                 else "") + "`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
