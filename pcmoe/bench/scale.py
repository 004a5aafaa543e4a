"""The bench's second language-model section (`pcmoe bench --scale`): a 1.3 GB random-weight
Qwen3-MoE next to the shipped LM, with llama.cpp on it, and the fast-decode target table.

The checkpoint is the scaling study's "mid" shape with 32 experts per layer (8 MoE layers, hidden
1024, expert width 768, top-4, vocabulary 32000: 1.3 GB in bf16), built once under
data/bench/scale/ (never committed) with the shipped LM's tokenizer files beside it, so that the
same held-out text and prompts feed both sizes (its ids are below 32000; llama.cpp's converter pads
the vocabulary). Random weights: perplexity is meaningless there, speed and memory are real.

Runs (labels prefixed "scale "): pcmoe `full` (its peak RSS minus resident weights calibrates the
cgroup limits as in the main section), `full/int8`, `full/int4`, `committee@50%`; llama.cpp
resident bf16 / q8_0 / q4_K_M and, with cgroup limits, mmap@50% (pcmoe.bench.llamacpp).

`decode_targets` turns both sections into the table of issue 15 (ratios with goals, the kernel
path of each pcmoe run and the CPU share others used while it ran).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from pcmoe.bench import common, runner
from pcmoe.bench.summary import by_label, is_busy, runtime_overhead, why_missing
from pcmoe.budget import format_bytes

PREFIX = "scale "
SECTION = "scale"
EXPERTS = 32
DEFAULT_FOLDER = Path("data/bench/scale/qwen3-moe-e32")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
EVAL_TOKENS = 256  # random weights: a short evaluation warms the committee, its perplexity means nothing
OVERHEAD_GOAL = 300e6


def ensure_model(folder: Path, tokenizer_from: Path, shape: str = "mid", experts: int = EXPERTS,
                 threads: int = 2) -> Path:
    """The scale checkpoint in `folder`, built on first use (into a temporary folder, renamed when
    complete, so an interrupted build is never taken for a checkpoint)."""
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    from pcmoe.bench.scaling import build

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"[scale] building the random {shape} Qwen3-MoE with {experts} experts per layer in {folder} "
          "(once; a few minutes)", file=sys.stderr, flush=True)
    build(tmp, experts, shape, threads)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_from) / name).exists():
            shutil.copy2(Path(tokenizer_from) / name, tmp / name)
    tmp.rename(folder)
    return folder


def plan(args, model: str, sizes: dict, prompts) -> list[dict]:
    """The pcmoe runs of the section, in order (`full` first: it calibrates the limits)."""
    base = {"kind": "pcmoe", "model": model, "model_fp": sizes.get("fingerprint"), "data": args.data,
            "eval_tokens": min(args.eval_tokens, EVAL_TOKENS), "prompts": prompts,
            "decode_tokens": args.decode_tokens, "trials": args.trials, "warmup": 1, "threads": args.threads,
            "section": SECTION}
    runs = [dict(base, label=PREFIX + "full", curve="scale full", policy="full", calibration=True,
                 weight_bytes=sizes["full"], mem_pct=100.0)]
    for q in ("int8", "int4"):
        qs = sizes["quant"].get(q)
        run = dict(base, label=f"{PREFIX}full/{q}", curve=f"scale full/{q}", policy="full",
                   options={"quantize": q}, weight_bytes=qs["full"] if qs else sizes["full"])
        if qs is None:
            run["skip"] = f"skipped: {q} is not available for this model ({sizes['quant_errors'].get(q)})"
        runs.append(run)
    # Everything quantised, as llama.cpp's q8_0 / q4_K_M GGUFs are: experts and non-expert weights
    # (attention projections, LM head; --quantize-nonexpert). Limits: the experts-only bytes (an upper bound).
    for q in ("int8", "int4"):
        qs = sizes["quant"].get(q)
        run = dict(base, label=f"{PREFIX}full/{q}+ne", curve=f"scale full/{q}+ne", policy="full",
                   options={"quantize": q, "nonexpert_quantize": q}, weight_bytes=qs["full"] if qs else sizes["full"])
        if qs is None:
            run["skip"] = f"skipped: {q} is not available for this model ({sizes['quant_errors'].get(q)})"
        runs.append(run)
    half = int(sizes["nonexpert"] + 0.5 * sizes["all_experts"])
    com = dict(base, label=PREFIX + "committee@50%", curve="scale committee", policy="committee", budget=half,
               weight_bytes=half, mem_pct=50.0)
    if half < sizes["min_budget"][True]:
        com["skip"] = f"skipped: {format_bytes(half)} is below the minimum budget"
    runs.append(com)
    for r in runs:
        r["key"] = runner.spec_key(r)
    return runs


def run_section(args, prompts, log, done, use_cgroup: bool, run_or_reuse) -> tuple[list[dict], dict]:
    """Build (if needed) and measure the scale section; `run_or_reuse` is the suite's.
    Returns its records and what the report says about it (model, sizes, measured overhead)."""
    from pcmoe.bench import llamacpp

    model = Path(args.scale_model) if args.scale_model else ensure_model(DEFAULT_FOLDER, Path(args.model),
                                                                         threads=args.threads)
    if not (model / "config.json").exists():
        raise SystemExit(f"error: {model} is not a checkpoint folder")
    sizes = common.model_sizes(str(model))
    results, overhead = [], None
    runs = plan(args, str(model), sizes, prompts)
    for i, spec in enumerate(runs):
        rec = run_or_reuse(spec, overhead, done, log, use_cgroup)
        rec.setdefault("model", spec["model"])  # two checkpoints in one results file
        if spec.get("calibration") and rec.get("returncode") == 0:
            overhead = max(0, int(rec["peak_rss_bytes"] - rec["resident_bytes"]))
        results.append(rec)
        common.log_status(i + 1, len(runs), rec)
    if "llamacpp" not in set(filter(None, args.skip.split(","))):
        peer = argparse.Namespace(**{**vars(args), "model": str(model), "eval_tokens": min(args.eval_tokens,
                                                                                           EVAL_TOKENS),
                                     "quick": True, "gguf_dir": None})
        for rec in llamacpp.run_all(peer, sizes, overhead, use_cgroup, log, done):
            results.append(dict(rec, label=PREFIX + rec["label"], section=SECTION, model=str(model)))
    return results, {"model": str(model), "sizes": sizes, "overhead": overhead}


# -- the target table ----------------------------------------------------------------------------


def decode_targets(results, meta=None) -> list[dict]:
    """Issue 15's targets from both sections: measured value, goal, whether met, by how much, and
    the kernel path and contention of the runs it comes from."""
    ok, every = by_label(results), {r["label"]: r for r in results}
    ck = common.GGUF_TYPE.get(((meta or {}).get("model_sizes") or {}).get("dtype") or "", "bf16")
    rows = []

    def add(name, op, goal, labels, fn, unit=""):
        recs = [ok.get(label) for label in labels]
        row = {"target": name, "goal": f"{op} {goal:g}{unit}", "op": op, "goal_value": goal, "runs": labels,
               "value": None, "met": None, "margin": None}
        if all(recs):
            try:
                row["value"] = fn(*recs)
            except (TypeError, ZeroDivisionError, KeyError):
                pass
        notes = []
        if row["value"] is None:
            notes.append(why_missing(labels, every, 120) if not all(recs) else
                         "a needed measurement is missing in the runs")
        else:
            v = row["value"]
            row["met"] = v >= goal if op == ">=" else v <= goal
            if goal:  # a goal of 0 (no stall) has no relative margin
                row["margin"] = (v / goal - 1) if op == ">=" else (1 - v / goal)
        kernels = sorted({f"`{r['label']}` {r['kernel']}" for r in recs if r and r.get("kernel")})
        if kernels:
            notes.append("kernel: " + ", ".join(kernels))
        busy = [f"`{r['label']}` {100 * r['cpu_other_share']:.0f} %" for r in recs if r and is_busy(r)]
        if busy:
            notes.append("others' CPU during " + ", ".join(busy))
        row["note"] = "; ".join(notes)
        rows.append(row)

    def ratio(key):
        return lambda a, b: a[key] / b[key]

    dec, pre = ratio("decode_tokens_per_s"), ratio("prefill_tokens_per_s")
    s = PREFIX
    add(f"pcmoe full / llama.cpp resident {ck}, decode, shipped LM", ">=", 0.8, ["full", f"llama.cpp resident/{ck}"],
        dec)
    add("pcmoe full / llama.cpp resident bf16, decode, 1.3 GB", ">=", 1.0,
        [s + "full", s + "llama.cpp resident/bf16"], dec)
    add("pcmoe int8 / llama.cpp q8_0, decode, 1.3 GB", ">=", 0.9, [s + "full/int8", s + "llama.cpp resident/q8_0"], dec)
    add("pcmoe int4 / llama.cpp q4_K_M, decode, 1.3 GB", ">=", 0.9,
        [s + "full/int4", s + "llama.cpp resident/q4_K_M"], dec)
    add("pcmoe int4 / pcmoe bf16, decode, 1.3 GB", ">=", 2.5, [s + "full/int4", s + "full"], dec)
    add("pcmoe int8 + int8 non-expert / llama.cpp q8_0, decode, 1.3 GB", ">=", 0.9,
        [s + "full/int8+ne", s + "llama.cpp resident/q8_0"], dec)
    add("pcmoe int4 + int4 non-expert / llama.cpp q4_K_M, decode, 1.3 GB", ">=", 0.9,
        [s + "full/int4+ne", s + "llama.cpp resident/q4_K_M"], dec)
    add("pcmoe int4 + int4 non-expert / pcmoe bf16, decode, 1.3 GB", ">=", 2.5, [s + "full/int4+ne", s + "full"], dec)
    add("committee@50% / full, decode, shipped LM", ">=", 0.95, ["committee@50%", "full"], dec)
    add("committee@50% / full, decode, 1.3 GB", ">=", 0.95, [s + "committee@50%", s + "full"], dec)
    add("committee@50% decode stall, 1.3 GB (s)", "<=", 0.0, [s + "committee@50%"],
        lambda r: r["decode_stats"]["stall_s"], " s")
    add("prefill pcmoe / llama.cpp bf16, 1.3 GB", ">=", 0.8, [s + "full", s + "llama.cpp resident/bf16"], pre)
    add("runtime overhead (peak RSS - resident weights), shipped LM `full` (MB)", "<=", OVERHEAD_GOAL / 1e6,
        ["full"], lambda r: runtime_overhead(r) / 1e6, " MB")
    add("runtime overhead, 1.3 GB `full` (MB)", "<=", OVERHEAD_GOAL / 1e6, [s + "full"],
        lambda r: runtime_overhead(r) / 1e6, " MB")
    return rows


def targets_table(rows) -> list[str]:
    lines = ["| target | measured | goal | result | how much / kernel / contention |", "|---|---|---|---|---|"]
    for t in rows:
        if t["value"] is None:
            lines.append(f"| {t['target']} | - | {t['goal']} | not measured | {t['note']} |")
            continue
        result = "**met**" if t["met"] else "**missed**"
        how = "" if t["margin"] is None else (f"by a margin of {100 * t['margin']:.1f} %" if t["met"]
                                              else f"by {100 * -t['margin']:.1f} %")
        note = "; ".join(filter(None, [how, t["note"]]))
        lines.append(f"| {t['target']} | {t['value']:.3f} | {t['goal']} | {result} | {note} |")
    return lines


def plot(out: Path, results) -> tuple[str, str] | None:
    """Decode tokens/s of each setup at both sizes (bar chart); (file name, caption) or None."""
    ok = {r["label"]: r for r in results if r.get("returncode") == 0 and r.get("decode_tokens_per_s")}
    # "+ne": the non-expert weights quantised too, as llama.cpp's q8_0 / q4_K_M GGUFs hold them
    setups = [("pcmoe bf16", "full"), ("pcmoe int8", "full/int8"), ("pcmoe int4", "full/int4"),
              ("pcmoe int8+ne", "full/int8+ne"), ("pcmoe int4+ne", "full/int4+ne"), ("committee@50%", "committee@50%"),
              ("llama.cpp bf16", "llama.cpp resident/bf16"),
              ("llama.cpp q8_0", "llama.cpp resident/q8_0"), ("llama.cpp q4_K_M", "llama.cpp resident/q4_K_M")]
    if not any(PREFIX + label in ok for _, label in setups) or common.missing("matplotlib"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, prefix, title in ((axes[0], "", "shipped LM"), (axes[1], PREFIX, "1.3 GB random Qwen3-MoE")):
        names = [name for name, label in setups if prefix + label in ok]
        ms = [1e3 / ok[prefix + label]["decode_tokens_per_s"] for _, label in setups if prefix + label in ok]
        ax.bar(range(len(ms)), ms, color=["C0" if n.startswith(("pcmoe", "committee")) else "C1" for n in names])
        ax.set_xticks(range(len(ms)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("decode ms / token (lower is better)")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    common.savefig(fig, Path(out) / "decode_targets.png")
    plt.close(fig)
    return "decode_targets.png", "decode ms/token of pcmoe and llama.cpp at both sizes"
