"""How the committee's own knobs move quality at one budget: update period F, importance aggregation,
hysteresis margin, swap bandwidth per step, request-handling strategy, warm start.

Each configuration is a fresh engine reading the same document stream in order (committee state
carries across documents, as in continuous serving); the all-resident model and magnitude-keep
(the paper's static "Pruning") at the same budget are the references. Quality only: speed and
memory belong to `pcmoe bench`. Writes <out>/committee_knobs.json and .md; the last stdout line is
the JSON summary.

    python benchmarks/committee_knobs.py --model models/pcmoe-lm --budget 50%experts \\
        --data models/pcmoe-lm/eval/heldout.txt --out results/committee_knobs
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pcmoe  # noqa: E402
from pcmoe.engine import inspect  # noqa: E402
from pcmoe.evaluate import perplexity, read_documents  # noqa: E402
from pcmoe.system import atomic_write_text  # noqa: E402

# name -> (policy, load options); the first committee row is the default configuration. Options
# are changes from the defaults (EMA 0.95, F = 16 tokens, margin 0.1, staged swaps with no spare
# slot, profile.json beside the model as warm start); the paper's own arrangement is a row too.
NO_PROFILE = {"profile": "none"}
PAPER = {"importance": "window", "spare_slots": 1, **NO_PROFILE}
CONFIGS = {
    "full (reference)": ("full", {}),
    "magnitude-keep (static)": ("magnitude-keep", {}),
    "static-frequency (profile.json top experts, static)": ("static-frequency", {}),
    "committee, defaults": ("committee", {}),
    "paper's arrangement: window importance, 1 spare slot, no profile": ("committee", PAPER),
    "window importance (no EMA)": ("committee", {"importance": "window"}),
    "EMA decay 0.5": ("committee", {"ema_decay": 0.5}),
    "EMA decay 0.9": ("committee", {"ema_decay": 0.9}),
    "EMA decay 0.98": ("committee", {"ema_decay": 0.98}),
    "1 spare slot per layer (no staging)": ("committee", {"spare_slots": 1}),
    "no profile (magnitude start, zero prior)": ("committee", NO_PROFILE),
    "profile members, never updated": ("committee", {"update_every": 10**9}),
    "F = 4 tokens": ("committee", {"update_every": 4}),
    "F = 64 tokens": ("committee", {"update_every": 64}),
    "F = 1 document": ("committee", {"update_every": 1, "update_unit": "inputs"}),
    "margin 0": ("committee", {"margin": 0.0}),
    "margin 0.5": ("committee", {"margin": 0.5}),
    "swap 1 expert / step": ("committee", {"bytes_per_step": "1x"}),
    "swap 8 experts / step": ("committee", {"bytes_per_step": "8x"}),
    "skip": ("committee", {"strategy": "skip"}),
    "hybrid tau 0.05": ("committee", {"strategy": "hybrid", "tau": 0.05}),
}


def _options(model: Path, opts: dict, expert_bytes: int) -> dict:
    out = dict(opts)
    if isinstance(out.get("bytes_per_step"), str):  # "<n>x" experts
        out["bytes_per_step"] = int(out["bytes_per_step"][:-1]) * expert_bytes
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models/pcmoe-lm")
    ap.add_argument("--budget", default="50%experts")
    ap.add_argument("--data", type=Path, help="document stream (default: <model>/eval/heldout.txt)")
    ap.add_argument("--max-tokens", type=int, default=24576)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="run only the configurations whose name contains one of these")
    ap.add_argument("--out", type=Path, default=REPO / "results/committee_knobs")
    args = ap.parse_args(argv)
    data = args.data or args.model / "eval" / "heldout.txt"
    documents = read_documents(data)
    info = inspect(args.model)
    rows = []
    for name, (policy, opts) in CONFIGS.items():
        if args.only and not any(s in name for s in args.only):
            continue
        if policy == "static-frequency" and not (args.model / "profile.json").exists():
            print(f"skip {name}: no profile.json beside the model", flush=True)
            continue
        budget = None if policy == "full" else args.budget
        t0 = time.perf_counter()
        with pcmoe.load(args.model, budget=budget, policy=policy, threads=args.threads, progress=False,
                        **_options(args.model, opts, info["expert_bytes"])) as engine:
            result = perplexity(engine, documents, max_tokens=args.max_tokens, progress=False)
            st = engine.stats()
        row = {"name": name, "policy": policy, "options": opts, "ppl": result["ppl"], "tokens": result["tokens"],
               "hit_rate": st["hit_rate"], "router_mass_outside": st["router_mass_outside"], "swaps": st["swaps"],
               "updates": st["updates"], "bytes_read": st["bytes_read"], "stall_s": st["stall_s"],
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{name}: ppl {row['ppl']:.3f} hit {row['hit_rate']:.3f} outside {row['router_mass_outside']:.3f} "
              f"swaps {row['swaps']}", flush=True)
    full = next((r["ppl"] for r in rows if r["policy"] == "full"), None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    report = {"model": str(args.model), "budget": args.budget, "data": str(data), "max_tokens": args.max_tokens,
              "threads": args.threads, "commit": commit, "rows": rows,
              "command": shlex.join(["python", "benchmarks/committee_knobs.py",
                                     *(argv if argv is not None else sys.argv[1:])])}
    lines = [f"# Committee knobs at {args.budget} on `{args.model.name}`", "",
             f"`{report['command']}` (commit {commit}); {rows[0]['tokens'] if rows else 0} tokens of `{data}` "
             "read in order, one engine per row.", "",
             "| configuration | perplexity | vs full | hit rate | router mass outside | swaps | bytes read |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{r['ppl'] / full:.3f}x" if full else "-"
        lines.append(f"| {r['name']} | {r['ppl']:.3f} | {rel} | {r['hit_rate']:.3f} | {r['router_mass_outside']:.3f} "
                     f"| {r['swaps']} | {r['bytes_read'] / 1e6:.1f} MB |")
    atomic_write_text(args.out / "committee_knobs.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(args.out / "committee_knobs.md", "\n".join(lines) + "\n")
    print(json.dumps({r["name"]: round(r["ppl"], 4) for r in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
