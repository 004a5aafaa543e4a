"""Serve a checkpoint of a few hundred MB at a 50 % budget inside a real cgroup v1 memory limit.

Procedure (each run is a fresh `pcmoe eval` process, the checkpoint evicted from the page cache
before it starts):
 1. Measure the runtime's own overhead: committee at the budget, in a cgroup without a limit;
    overhead = peak RSS - resident weight bytes (Python, torch, transformers, activations).
 2. Run full (at the full model's size), committee and on-demand (at the budget) inside a cgroup
    limited to their weight bytes + that overhead; report peak RSS, the group's peak charge (RSS +
    page cache), limit hits and tokens/s, side by side, `--trials` rounds in alternating order.

    sudo .venv/bin/python benchmarks/memory_limit.py --out results/memory_limit
Writes <out>/memory_limit.json and <out>/memory_limit.md. A run that exceeds --timeout is recorded
as timed out. The held-out text defaults to the shipped model's eval text
(models/pcmoe-lm/eval/heldout.txt); nothing under the gitignored data/ is needed beyond the random
checkpoint this script builds there.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pcmoe.bench.cgroup import available  # noqa: E402
from pcmoe.bench.common import git_commit, machine, weight_files  # noqa: E402
from pcmoe.bench.runner import run_worker  # noqa: E402
from pcmoe.budget import format_bytes  # noqa: E402
from pcmoe.system import atomic_write_text  # noqa: E402

DEFAULT_MODEL = REPO / "data/bench/qwen3-moe-400m"
SHIPPED_LM = REPO / "models/pcmoe-lm"


def default_data(model: Path | None = None) -> Path | None:
    """The held-out text: the checkpoint's own eval text, else the shipped model's; None if neither."""
    for folder in ([Path(model)] if model else []) + [SHIPPED_LM]:
        if (folder / "eval" / "heldout.txt").exists():
            return folder / "eval" / "heldout.txt"
    return None


def build_random_checkpoint(out: Path, tokenizer: Path) -> None:
    """A random-weight Qwen3-MoE of ~430 MB (bf16): 8 layers x 32 experts, top-2 (speed and memory
    are real; its perplexity is meaningless)."""
    import torch

    from pcmoe.testing import make_checkpoint

    make_checkpoint("qwen3_moe", out, dtype=torch.bfloat16, hidden_size=512, num_hidden_layers=8, num_experts=32,
                    moe_intermediate_size=512, intermediate_size=1024, vocab_size=8192, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=False)
    for f in tokenizer.iterdir():  # the tokenizer's files only (the folder may be a whole model)
        if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            shutil.copy(f, out / f.name)


def eval_cmd(args, policy: str, budget: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "pcmoe", "eval", "--model", str(args.model), "--policy", policy,
           "--data", str(args.data), "--max-tokens", str(args.max_tokens), "--threads", str(args.threads), "--quiet"]
    return cmd + (["--budget", budget] if budget else [])


def run(args, policy, budget, limit):
    """One `pcmoe eval` in a cgroup of `limit` bytes, the checkpoint evicted first (a cold start:
    weights come from the disk); a run past --timeout is recorded as timed out (returncode None)."""
    r = run_worker(eval_cmd(args, policy, budget), limit, use_cgroup=True, threads=args.threads,
                   timeout=args.timeout, evict=weight_files(args.model), cwd=str(REPO))
    result = {"policy": policy, "budget": budget, "limit_bytes": limit, "timed_out": False, **r}
    if r.get("timed_out"):
        result["returncode"] = None
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint (default: build a random one)")
    ap.add_argument("--tokenizer", type=Path, default=REPO / "models/pcmoe-lm",
                    help="tokenizer folder copied into a freshly built random checkpoint")
    ap.add_argument("--data", type=Path, help="held-out text (default: <model>/eval/heldout.txt, else "
                    "models/pcmoe-lm/eval/heldout.txt)")
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run before it is recorded as "
                    "timed out (default 3600)")
    ap.add_argument("--out", type=Path, default=REPO / "results/memory_limit")
    args = ap.parse_args(argv)
    if not available():
        sys.exit("error: needs root and the cgroup v1 memory controller at /sys/fs/cgroup/memory")
    if not (args.model / "config.json").exists():
        if not (args.tokenizer / "tokenizer.json").exists():
            sys.exit(f"error: {args.model} does not exist and there is no tokenizer in {args.tokenizer} to build a "
                     "random checkpoint with; pass --model or --tokenizer")
        build_random_checkpoint(args.model, args.tokenizer)
    args.data = args.data or default_data(args.model)
    if args.data is None or not Path(args.data).exists():
        sys.exit(f"error: no held-out text ({args.data or SHIPPED_LM / 'eval' / 'heldout.txt'} does not exist); "
                 "pass --data FILE.txt")

    calib = run(args, "committee", args.budget, None)
    if calib["returncode"] != 0:
        why = "timed out" if calib.get("timed_out") else "failed"
        sys.exit(f"error: calibration run {why}: {calib.get('error')}")
    overhead = calib["peak_rss_bytes"] - calib["resident_bytes"]
    configs = [("full", None, calib["full_model_bytes"]), ("committee", args.budget, calib["budget_bytes"]),
               ("on-demand", args.budget, calib["budget_bytes"])]
    runs = []
    for trial in range(args.trials):
        order = configs if trial % 2 == 0 else configs[::-1]
        for policy, budget, weight_bytes in order:
            r = run(args, policy, budget, weight_bytes + overhead)
            r["trial"] = trial
            runs.append(r)
            print(f"trial {trial} {policy:10s} rc={r['returncode']}{' (timed out)' if r.get('timed_out') else ''} "
                  f"tok/s={r.get('tokens_per_s') or 0:.1f} "
                  f"peak RSS {format_bytes(r.get('peak_rss_bytes'))} limit {format_bytes(r['limit_bytes'])}",
                  flush=True)

    def med(policy, key):
        vals = [r[key] for r in runs if r["policy"] == policy and r["returncode"] == 0]
        return statistics.median(vals) if vals else None

    summary = {}
    for policy, _, weight_bytes in configs:
        summary[policy] = {k: med(policy, k) for k in ("tokens_per_s", "ppl", "peak_rss_bytes",
                                                       "cgroup_max_usage_bytes", "hit_rate", "bytes_read", "stall_s")}
        summary[policy]["weight_bytes"] = weight_bytes
        summary[policy]["limit_bytes"] = weight_bytes + overhead
        summary[policy]["all_completed"] = all(r["returncode"] == 0 for r in runs if r["policy"] == policy)
        summary[policy]["timed_out"] = sum(bool(r.get("timed_out")) for r in runs if r["policy"] == policy)
    ratios = {}
    if summary["committee"]["tokens_per_s"] and summary["full"]["tokens_per_s"]:
        ratios["committee_vs_full_tokens_per_s"] = (summary["committee"]["tokens_per_s"]
                                                    / summary["full"]["tokens_per_s"])
    if summary["committee"]["tokens_per_s"] and summary["on-demand"]["tokens_per_s"]:
        ratios["committee_vs_on_demand_tokens_per_s"] = (summary["committee"]["tokens_per_s"]
                                                        / summary["on-demand"]["tokens_per_s"])
    meta = {"command": shlex.join([Path(sys.executable).name, "benchmarks/memory_limit.py", *(argv or sys.argv[1:])]),
            "commit": git_commit(REPO), "machine": platform.machine(),
            "cpu": machine()["cpu"], "threads": args.threads, "model": str(args.model), "budget": args.budget,
            "data": str(args.data), "max_tokens": args.max_tokens, "overhead_bytes": overhead}
    report = {"meta": meta, "calibration": calib, "summary": summary, "ratios": ratios, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "memory_limit.json", json.dumps(report, indent=1))
    atomic_write_text(args.out / "memory_limit.md", _markdown(report))
    print(_markdown(report))
    return 0


def _markdown(report) -> str:
    m, s = report["meta"], report["summary"]
    lines = [
        f"Model `{Path(m['model']).name}`, budget {m['budget']}, {m['max_tokens']} tokens of `{Path(m['data']).name}`, "
        f"{m['threads']} thread(s), commit {m['commit']}, {m['cpu']}.",
        f"Measured runtime overhead (peak RSS - resident weights, committee run without a limit): "
        f"{format_bytes(m['overhead_bytes'])}.",
        "",
        "| policy | weights | cgroup limit | completed | peak RSS | cgroup peak (RSS + cache) | tokens/s | hit rate "
        "| bytes read | stall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for policy, r in s.items():
        tps = f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] else "-"
        hit = f"{r['hit_rate']:.3f}" if r["hit_rate"] is not None else "-"
        stall = f"{r['stall_s']:.2f}" if r["stall_s"] is not None else "-"
        lines.append(f"| {policy} | {format_bytes(r['weight_bytes'])} | {format_bytes(r['limit_bytes'])} | "
                     f"{'yes' if r['all_completed'] else 'NO'}"
                     f"{' (' + str(r['timed_out']) + ' timed out)' if r.get('timed_out') else ''} | "
                     f"{format_bytes(r['peak_rss_bytes'])} | "
                     f"{format_bytes(r['cgroup_max_usage_bytes'])} | {tps} | {hit} | "
                     f"{format_bytes(r['bytes_read'])} | {stall} |")
    lines.append("")
    for k, v in report["ratios"].items():
        lines.append(f"- {k.replace('_', ' ')}: {v:.2f}x")
    lines.append(f"\nCommand: `{m['command']}`\n")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
