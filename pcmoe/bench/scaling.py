"""Scaling: decode time and peak memory as the number of experts and the budget grow.

Random-weight Qwen3-MoE checkpoints (bf16; quality is meaningless, speed and memory are real):
8 MoE layers, hidden 1024, expert width 768, top-4, with 16 / 32 / 64 experts per layer
(0.6 / 1.2 / 2.4 GB). For each: `full`, `committee` at 25 / 50 / 75 % of expert memory (swaps
every 8 tokens, async and sync), `magnitude-keep` and `on-demand` at 50 %. Every run is a fresh
process with the checkpoint evicted from the page cache (pcmoe.bench.worker), warm-up excluded,
the median of --trials decode rounds.

It shows (a) decode time per token against resident memory, (b) the cost of one swap (a cold
expert read) against the time of one decode step, and (c) that async swaps stay off the critical
path: committee decode ~= magnitude-keep decode (no swaps) with stall ~0, while the same swaps
done inline (sync) cost decode time.

    pcmoe bench --scaling                               # after the suite, into <out>/scaling
    python -m pcmoe.bench.scaling --out results/scaling [--experts 16,32,64] [--quick]
    python benchmarks/scaling.py ...                    # the same
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from pcmoe.bench import common, runner
from pcmoe.budget import format_bytes
from pcmoe.system import atomic_write_text

SHAPES = {  # "mid": the 1-3 GB models of the study; "tiny": a smoke test in seconds
    "mid": dict(hidden_size=1024, num_hidden_layers=8, num_experts_per_tok=4, moe_intermediate_size=768,
                intermediate_size=2048, vocab_size=32000, num_attention_heads=16, num_key_value_heads=8,
                head_dim=64, max_position_embeddings=1024),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_experts_per_tok=2, moe_intermediate_size=32,
                 intermediate_size=64, vocab_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=256),
}
CONFIGS = ("full", "committee", "committee-sync", "magnitude-keep", "on-demand")


def build(folder: Path, experts: int, shape: str = "mid", threads: int = 2) -> None:
    import torch

    from pcmoe.testing import make_checkpoint

    if (folder / "config.json").exists():
        return
    torch.set_num_threads(threads)
    make_checkpoint("qwen3_moe", folder, dtype=torch.bfloat16, num_experts=experts, tie_word_embeddings=False,
                    **SHAPES[shape])


def configs(quick: bool, only: set[str] | None = None) -> list[tuple[str, int | None, dict]]:
    out = [("full", None, {})]
    for b in ((50,) if quick else (25, 50, 75)):
        out.append(("committee", b, {"update_every": 8, "margin": 0.0}))
    out += [("committee-sync", 50, {"update_every": 8, "margin": 0.0, "synchronous": True}),
            ("magnitude-keep", 50, {}), ("on-demand", 50, {})]
    return [c for c in out if only is None or c[0] in only]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/scaling"))
    ap.add_argument("--models", type=Path, default=Path("data/bench/scaling"), help="where checkpoints are built")
    ap.add_argument("--experts", default="16,32,64")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mid", help="model shape (tiny: smoke tests)")
    ap.add_argument("--configs", help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="16 experts only, fewer configurations")
    args = ap.parse_args(argv)
    experts = [int(e) for e in args.experts.split(",")]
    if args.quick:
        experts = experts[:1]
    only = set(args.configs.split(",")) if args.configs else None
    vocab = SHAPES[args.shape]["vocab_size"]
    rng = random.Random(0)
    prompts = [[rng.randrange(min(100, vocab // 2), vocab) for _ in range(32)] for _ in range(args.prompts)]
    args.out.mkdir(parents=True, exist_ok=True)
    log = common.RunLog(args.out / "runs.jsonl")
    done = log.done()
    results = []
    for n in experts:
        folder = args.models / (f"qwen3-moe-e{n}" if args.shape == "mid" else f"qwen3-moe-{args.shape}-e{n}")
        build(folder, n, args.shape, args.threads)
        fp = common.fingerprint(folder)
        base = {"kind": "pcmoe", "model": str(folder), "model_fp": fp, "prompts": prompts,
                "decode_tokens": args.decode_tokens, "trials": args.trials, "warmup": 1, "threads": args.threads,
                "section": "scaling", "experts": n}
        for name, budget, opts in configs(args.quick, only):
            label = f"E{n} {name}" + (f"@{budget}%" if budget else "")
            policy = "committee" if name.startswith("committee") else name
            spec = dict(base, label=label, policy=policy, options=opts,
                        budget=f"{budget}%experts" if budget else None)
            key = runner.spec_key(spec, prefix="scaling-")
            if key in done:
                results.append(done[key])
                continue
            rec = runner.measure(spec)
            rec.update(experts=n, key=key)
            log.append(rec)
            results.append(rec)
            print(f"{label:28s} rc={rec['returncode']} decode {rec.get('decode_tokens_per_s', 0):.2f} tok/s "
                  f"peak RSS {format_bytes(rec.get('peak_rss_bytes'))} stall {rec.get('stall_s', 0):.3f}s "
                  f"swaps {rec.get('swaps')}", file=sys.stderr, flush=True)
    atomic_write_text(args.out / "scaling.json", json.dumps(results, indent=1, default=str))
    md = markdown(results)
    atomic_write_text(args.out / "scaling.md", md)
    plot(args.out, results)
    print(md)
    return 0


def markdown(results) -> str:
    lines = ["| run | weights MB | peak RSS MB | decode ms/token | swaps | swap read ms (mean) | stall s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("returncode") != 0:
            lines.append(f"| {r['label']} | failed: {str(r.get('error', ''))[:60]} ||||||")
            continue
        d = r.get("decode_stats", {})
        read_ms = f"{1e3 * d['read_s'] / d['reads']:.2f}" if d.get("reads") else "-"
        lines.append(f"| {r['label']} | {r['resident_bytes'] / 1e6:.0f} | {r['peak_rss_bytes'] / 1e6:.0f} "
                     f"| {1e3 / r['decode_tokens_per_s']:.1f} | {d.get('swaps', 0)} | {read_ms} "
                     f"| {d.get('stall_s', 0):.3f} |")
    return "\n".join(lines) + "\n"


def plot(out: Path, results) -> bool:
    if common.missing("matplotlib"):
        print(f"scaling plot {common.missing('matplotlib')}", file=sys.stderr)
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.get("returncode") == 0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for n in sorted({r["experts"] for r in ok}):
        rows = [r for r in ok if r["experts"] == n]
        for name, marker in (("committee@", "o"), ("full", "s"), ("magnitude-keep", "^"), ("on-demand", "x"),
                             ("committee-sync", "v")):
            pts = sorted((r["resident_bytes"] / 1e6, 1e3 / r["decode_tokens_per_s"], r["peak_rss_bytes"] / 1e6)
                         for r in rows if name in r["label"])
            if not pts:
                continue
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"E{n} {name.rstrip('@')}")
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker=marker, label=f"E{n} {name.rstrip('@')}")
    axes[0].set_xlabel("resident weights (MB)")
    axes[0].set_ylabel("decode ms / token")
    axes[1].set_xlabel("resident weights (MB)")
    axes[1].set_ylabel("peak RSS (MB)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    common.savefig(fig, out / "scaling.png")
    plt.close(fig)
    return True


if __name__ == "__main__":
    sys.exit(main())
