"""Decode under replayed vs random-init routing at scale (issue 14): committee vs on-demand.

On a random-weight checkpoint (pcmoe.bench.scaling's 1.2 GB qwen3-moe-e32 by default) at one budget,
greedy decode after a fixed prompt for each routing (the checkpoint's own, and the shipped LM's trace
replayed, marked "replayed routing") and each policy (committee, on-demand). Reports hit rate, expert
bytes read per token, stall and ms/token. Bytes read are exact; times are only as quiet as the
machine. In-process, no cgroup (the regime study runs each inside a memory limit). Writes
replay_decode.json and .md atomically.

    python benchmarks/replay_decode.py --out docs/results [--budget 50%experts] [--tokens 96]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pcmoe.budget import format_bytes  # noqa: E402
from pcmoe.system import atomic_write_text  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "data" / "bench" / "scaling" / "qwen3-moe-e32"),
                    help="checkpoint (built by pcmoe.bench.scaling when missing: mid shape, 32 experts)")
    ap.add_argument("--trace", default=str(ROOT / "data" / "traces" / "pcmoe-lm-heldout.npz"),
                    help="routing trace (`pcmoe trace`; recorded from the shipped LM on held-out text when missing)")
    ap.add_argument("--budget", default="50%experts")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = ap.parse_args(argv)

    import torch

    import pcmoe
    from pcmoe.bench import scaling

    model = Path(args.model)
    scaling.build(model, 32, "mid", args.threads)
    if not Path(args.trace).exists():
        from pcmoe.cli import main as cli

        Path(args.trace).parent.mkdir(parents=True, exist_ok=True)
        lm = ROOT / "models" / "pcmoe-lm"
        if cli(["trace", "--model", str(lm), "--data", str(lm / "eval" / "heldout.txt"), "-o", args.trace]) != 0:
            return 2
    torch.set_num_threads(args.threads)
    prompt = list(range(100, 132))
    rows = []
    for routing in ("random-init", "replayed"):
        for policy in ("committee", "on-demand"):
            opts = {"routing_trace": args.trace} if routing == "replayed" else {}
            with pcmoe.load(model, budget=args.budget, policy=policy, progress=False, threads=args.threads,
                            **opts) as engine:
                list(engine.generate(prompt, max_new_tokens=16, temperature=0, stop_on_eos=False))  # warm-up
                mark = engine.counters()
                t0 = time.perf_counter()
                steps = list(engine.generate(prompt, max_new_tokens=args.tokens, temperature=0, stop_on_eos=False))
                wall = time.perf_counter() - t0
                st = engine.stats(since=mark)
            rows.append({"routing": st["routing"], "policy": policy, "hit_rate": st["hit_rate"],
                         "bytes_read_per_token": st["bytes_read"] / len(steps), "swaps": st["swaps"],
                         "stall_s": st["stall_s"], "ms_per_token": 1000 * steps[-1].decode_s / (len(steps) - 1),
                         "wall_s": wall, "resident_bytes": st["resident_bytes"]})
            print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "replay_decode", "model": str(model), "budget": args.budget, "tokens": args.tokens,
              "threads": args.threads, "rows": rows,
              "note": "bytes read are exact; ms/token only as quiet as the machine was"}
    out = Path(args.out)
    atomic_write_text(out / "replay_decode.json", json.dumps(result, indent=1))
    atomic_write_text(out / "replay_decode.md", markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    lines = ["# Decode with replayed vs random-init routing (issue 14)", "",
             f"{r['model']} (random weights) at budget {r['budget']}, {r['tokens']} greedy tokens after a 32-token "
             f"prompt, {r['threads']} threads, in-process (no cgroup). {r['note']}.", "",
             "| routing | policy | hit rate | expert bytes read / token | swaps | stall (s) | ms / token |",
             "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['routing']} | {row['policy']} | {row['hit_rate']:.3f} | "
                     f"{format_bytes(row['bytes_read_per_token'])} | {row['swaps']} | {row['stall_s']:.2f} | "
                     f"{row['ms_per_token']:.1f} |")
    lines += ["", "Rerun: `python benchmarks/replay_decode.py --out docs/results`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
