"""Shadow experts on the shipped LM: heldout perplexity at equal weight memory, with and without
shadows (issue 13). Writes docs/results/shadow.json and .md (atomically).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/shadow.py [--max-tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pcmoe
from pcmoe.evaluate import perplexity
from pcmoe.protocol import read_documents
from pcmoe.system import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "pcmoe-lm"
# (budget, policy, options): each budget's best configurations without shadows beside those with them
RUNS = [(None, "full", {})]
for budget, shadows in (("9.7MB", (4, 7)), ("12MB", (7, 10)), ("14MB", (None,)), ("22.5MB", (None,))):
    RUNS += [(budget, "static-frequency", {"quantize": "int4"}), (budget, "committee", {"quantize": "int4"}),
             (budget, "committee", {})]
    RUNS += [(budget, "static-frequency", {"quantize": "int4", "shadow": "int2", "shadow_experts": m})
             for m in shadows]
RUNS += [("22.5MB", "static-frequency", {"quantize": "int4", "shadow": "int3"})]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "shadow"))
    args = ap.parse_args()
    docs = read_documents(MODEL / "eval" / "heldout.txt")
    rows = []
    for budget, policy, options in RUNS:
        options = {k: v for k, v in options.items() if v is not None}
        row = {"budget": budget, "policy": policy, **options}
        try:
            engine = pcmoe.load(MODEL, budget=budget, policy=policy, progress=False, **options)
        except pcmoe.PcmoeError as e:
            rows.append({**row, "error": str(e)})
            continue
        t0 = time.perf_counter()
        result = perplexity(engine, docs, max_tokens=args.max_tokens, progress=False)
        st = engine.stats()
        rows.append({**row, "ppl": result["ppl"], "tokens": result["tokens"], "seconds": time.perf_counter() - t0,
                     "resident_bytes": st["resident_bytes"], "shadow_bytes": st["shadow_bytes"],
                     "committee_sizes": st["committee_sizes"], "shadowed": st["shadowed"],
                     "exchanged": st["exchanged"], "skipped": st["skipped"]})
        print(json.dumps(rows[-1]), flush=True)
    atomic_write_text(Path(args.out + ".json"), json.dumps({"max_tokens": args.max_tokens, "runs": rows}, indent=1))
    lines = ["| budget | policy | options | ppl | resident MB | shadowed | exchanged | skipped |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r.items() if k in ("quantize", "shadow", "shadow_experts"))
        if "error" in r:
            lines.append(f"| {r['budget']} | {r['policy']} | {opts} | - | - | - | - | {r['error'][:60]} |")
        else:
            lines.append(f"| {r['budget']} | {r['policy']} | {opts} | {r['ppl']:.2f} | {r['resident_bytes'] / 1e6:.2f} "
                         f"| {r['shadowed']} | {r['exchanged']} | {r['skipped']} |")
    atomic_write_text(Path(args.out + ".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
