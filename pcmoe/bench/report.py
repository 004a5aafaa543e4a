"""Summarise benchmark runs: bench.json, bench.md (tables + target ratios), PNG plots, and
BENCHMARKS.md (the same with provenance, plots and a hand-written reading that survives
regeneration). The numbers are computed in pcmoe.bench.summary, the plots drawn in pcmoe.bench.plots.

    pcmoe bench --report-only --out results/bench --markdown BENCHMARKS.md
    python -m pcmoe.bench.report results/bench --to BENCHMARKS.md      # the same

The memory axis of the tables and plots is pcmoe.bench.summary.memory_x (weight bytes held or
allowed, without the runtime's own overhead).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from pcmoe.bench.common import BUSY_CPU_SHARE, missing
from pcmoe.bench.plots import write_plots
from pcmoe.bench.summary import (
    by_label,
    expert_reads,
    is_busy,
    memory_x,
    quant_comparison,
    quant_verdicts,
    read_bandwidth,
    runtime_overhead,
    storage_rows,
    succeeded,
    targets,
)
from pcmoe.budget import format_bytes
from pcmoe.system import atomic_write_bytes, atomic_write_text

READING_BEGIN = "<!-- reading: hand-written; kept when this file is regenerated -->"
READING_END = "<!-- /reading -->"
READING_PLACEHOLDER = ("_Write the reading here: where pcmoe wins, where it loses, and why. The text between "
                       "these markers is kept when the file is regenerated._")

def _mb(n):
    if not isinstance(n, (int, float)):
        return "-"
    return f"{n / 1e6:.1f}" if abs(n) >= 1e7 else f"{n / 1e6:.3f}"


def _f(v, fmt="{:.2f}"):
    return fmt.format(v) if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) else "-"


def _mib(n):
    return f"{n / 2**20:.0f} MiB" if isinstance(n, (int, float)) else "-"

def _target_line(t) -> str:
    if t["value"] is None:
        return f"| {t['target']} | - | {t['goal']} | not measured | {t['note']} |"
    if t["met"]:
        result, how = "**met**", f"by a margin of {100 * t['margin']:.1f} %"
    else:
        result, how = "**missed**", f"by {100 * -t['margin']:.1f} %"
    note = f"{how}; {t['note']}" if t["note"] else how
    value = "inf" if math.isinf(t["value"]) else f"{t['value']:.3f}"
    return f"| {t['target']} | {value} | {t['goal']} | {result} | {note} |"


def targets_table(rows) -> list[str]:
    lines = ["| target (50 % of expert memory) | measured | goal | result | how much / why |", "|---|---|---|---|---|"]
    return lines + [_target_line(t) for t in rows]

# -- Markdown ------------------------------------------------------------------------------------


def _cpu(r) -> str:
    share = r.get("cpu_other_share")
    if not isinstance(share, (int, float)):
        return "-"
    return f"{100 * share:.0f} %" + (" ⚠" if share > BUSY_CPU_SHARE else "")


def _limit(r) -> str:
    return _mb(r.get("cgroup_limit_bytes")) if r.get("cgroup_limit_bytes") else "none"


def _not_ok(r, columns) -> str:
    text = r["skipped"] if r.get("skipped") else f"failed: {str(r.get('error', ''))[:100]}"
    return f"| {r['label']} | {text} " + "|" * columns


LM_HEADER = ["| run | memory MB | limit MB | peak RSS MB | ppl | ppl / full | decode tok/s | / full | prefill tok/s "
             "| hit rate | mass outside | bytes/token | stall s | swaps | others' CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]


def _lm_row(r, full) -> str:
    if r.get("returncode") != 0:
        return _not_ok(r, 14)
    ppl_ratio = r["ppl"] / full["ppl"] if r.get("ppl") and full.get("ppl") else None
    dec_ratio = (r["decode_tokens_per_s"] / full["decode_tokens_per_s"]
                 if r.get("decode_tokens_per_s") and full.get("decode_tokens_per_s") else None)
    return (f"| {r['label']} | {_mb(memory_x(r))} | {_limit(r)} | {_mb(r.get('peak_rss_bytes'))} "
            f"| {_f(r.get('ppl'))} | {_f(ppl_ratio, '{:.3f}')} | {_f(r.get('decode_tokens_per_s'), '{:.1f}')} "
            f"| {_f(dec_ratio)} | {_f(r.get('prefill_tokens_per_s'), '{:.0f}')} | {_f(r.get('hit_rate'), '{:.3f}')} "
            f"| {_f(r.get('router_mass_outside'), '{:.3f}')} | {_f(r.get('bytes_per_token'), '{:.0f}')} "
            f"| {_f(r.get('stall_s'))} | {r.get('swaps', '-')} | {_cpu(r)} |")


def notes(results, meta) -> list[str]:
    """How the numbers were made: memory limits, trials, the memory axis, busy runs."""
    overhead = runtime_overhead(by_label(results).get("full"))
    limits = ("off (no cgroup v1 memory controller, or --no-cgroup)" if not meta.get("cgroup") else
              f"cgroup v1. pcmoe runs: their weight bytes + the runtime overhead measured on `full` "
              f"({format_bytes(overhead)}: its peak RSS minus its resident weights; `full` itself runs without a "
              f"limit) + {_mib(meta.get('allocator_slack'))} slack, quantised runs at their quantised "
              "weight bytes. transformers: no limit (~2x weights: the safetensors file stays mapped beside its "
              f"copy). accelerate: its budget + {_mib(meta.get('accelerate_allowance'))} (the anchors' "
              "allowance). llama.cpp mmap: its weights at the GGUF's precision + its own measured overhead "
              "+ 64 MiB")
    lines = [f"Memory limits: {limits}.",
             f"Speeds: {meta.get('warmup', 1)} warm-up generation (not timed), then the median of "
             f"{meta.get('trials')} timed rounds of {meta.get('prompts')} prompt(s) x {meta.get('decode_tokens')} "
             f"tokens; perplexity over {meta.get('eval_tokens')} held-out tokens.",
             "Memory (tables and plots) = weight bytes held or allowed, without the runtime's overhead: pcmoe: "
             "resident weights (non-experts + expert slots); transformers / accelerate: parameter bytes in RAM "
             "after loading; llama.cpp resident: GGUF bytes; llama.cpp mmap: its cgroup limit minus its measured "
             "overhead. Budgets are % of the checkpoint's expert memory at its own precision "
             f"({(meta.get('model_sizes') or {}).get('dtype')}), one absolute axis for the quantised runs too: "
             "`committee/int4@20%` holds the bytes of `committee@20%`."]
    busy = [r["label"] for r in succeeded(results) if is_busy(r)]
    if busy:
        lines.append(f"⚠ Other processes used more than {100 * BUSY_CPU_SHARE:.0f} % of the CPU during "
                     f"{len(busy)} run(s): {', '.join(busy)}. Their speeds are not comparable; rerun them on a "
                     "quiet machine (column \"others' CPU\").")
    return lines


def markdown(results, meta, target_rows) -> str:
    """bench.md: provenance, targets and the tables."""
    lines = [f"Commit {meta.get('commit')}, {meta.get('date')}, {meta.get('cpu')} ({meta.get('cores')} cores, "
             f"{meta.get('threads')} threads). Model `{meta.get('model')}`. Command: `{meta.get('command')}`", ""]
    for note in notes(results, meta):
        lines += [note, ""]
    lines += ["### Targets at 50 % of expert memory", ""] + targets_table(target_rows) + [""]
    lines += _decode_targets_section(results, meta, "###")
    return "\n".join(lines + tables(results))


def _decode_targets_section(results, meta, level: str) -> list[str]:
    """The fast-decode targets (pcmoe.bench.scale), where either section measured one."""
    from pcmoe.bench import scale

    rows = scale.decode_targets(results, meta)
    if all(t["value"] is None for t in rows):
        return []
    return [f"{level} Fast decode targets (shipped LM and, with `--scale`, the 1.3 GB checkpoint)", ""] \
        + scale.targets_table(rows) + [""]


def tables(results) -> list[str]:
    """The result tables, one per section."""
    full = by_label(results).get("full", {})
    lines = []
    sections = [("lm", "Language model: policies x budgets"), ("quant", "Quantisation on the same memory axis"),
                ("shadow", "Below full/int4: everything quantised, with and without int2 shadow experts"),
                ("peers", "External peers"),
                ("scale", "Second language model: 1.3 GB random-weight Qwen3-MoE (`--scale`; / full = / `scale full`)")]
    for section, title in sections:
        rows = [r for r in results if r.get("section") == section]
        if not rows:
            continue
        base = by_label(results).get("scale full", {}) if section == "scale" else full
        lines += [f"### {title}", ""] + LM_HEADER + [_lm_row(r, base) for r in rows] + [""]
        if section == "quant":
            comp = quant_comparison(results)
            if comp:
                lines += ["Quantised setups next to the bf16 committee at the closest memory (computed):", ""]
                lines += quant_verdicts(comp) + [""]
    srows = storage_rows(results)
    if any(r["profile_mb_per_s"] for r in srows):
        bw = read_bandwidth(results)
        measured = (f"{bw['mb_per_s']:.0f} MB/s for reads of {bw['read_bytes'] / 1e3:.0f} kB ({bw['reads']} cold "
                    f"reads in `{bw['run']}`)" if bw else "not measured (no run read experts)")
        lines += ["### Emulated storage (50 % of expert memory)", "",
                  "The emulation only slows reads down to the profile's bandwidth (a read takes at least bytes / "
                  "bandwidth); it cannot speed them up, so a profile faster than this disk's measured cold read "
                  f"rate changes nothing. Measured cold read rate: {measured}.", "",
                  "| run | profile | profile MB/s | decode tok/s | vs this disk | achieved read MB/s | stall s "
                  "| bytes/token | effect |", "|---|---|---|---|---|---|---|---|---|"]
        for row in srows:
            r = row["rec"]
            if r.get("returncode") != 0:
                lines.append(_not_ok(r, 8))
                continue
            b, s, _ = expert_reads(r)
            lines.append(f"| {row['run']} | {row['profile']} | {_f(row['profile_mb_per_s'], '{:.0f}')} "
                         f"| {_f(r.get('decode_tokens_per_s'), '{:.1f}')} | {_f(row.get('vs_disk'))} "
                         f"| {_f(b / s / 1e6 if s else None, '{:.0f}')} | {_f(r.get('stall_s'))} "
                         f"| {_f(r.get('bytes_per_token'), '{:.0f}')} | {row.get('effect', '-')} |")
        lines.append("")
    vision = [r for r in results if r.get("section") == "vision"]
    if vision:
        lines += ["### Vision MoE on the frame stream", "",
                  "| run | memory MB | limit MB | peak RSS MB | accuracy | frames/s | bytes/frame | hit rate "
                  "| mass outside | swaps | stall s | others' CPU |", "|---" * 12 + "|"]
        for r in vision:
            if r.get("returncode") != 0:
                lines.append(_not_ok(r, 11))
                continue
            lines.append(f"| {r['label']} | {_mb(memory_x(r))} | {_limit(r)} | {_mb(r.get('peak_rss_bytes'))} "
                         f"| {_f(r.get('accuracy'), '{:.4f}')} | {_f(r.get('frames_per_s'), '{:.1f}')} "
                         f"| {_f(r.get('bytes_per_frame'), '{:.0f}')} | {_f(r.get('hit_rate'), '{:.3f}')} "
                         f"| {_f(r.get('router_mass_outside'), '{:.3f}')} | {r.get('swaps', '-')} "
                         f"| {_f(r.get('stall_s'))} | {_cpu(r)} |")
        lines.append("")
    return lines

# -- writing -------------------------------------------------------------------------------------


def write_report(out: Path, results: list[dict], meta: dict, markdown_to: str | Path | None = None,
                 plots_dir: str | Path | None = None) -> str:
    """bench.json, bench.md and the plots in `out`; BENCHMARKS.md too when `markdown_to`."""
    out = Path(out)
    meta = {k: v for k, v in meta.items() if k != "plots"}  # a note from an earlier rebuild
    rows = targets(results, meta)
    from pcmoe.bench import scale

    payload = {"meta": meta, "targets": rows, "decode_targets": scale.decode_targets(results, meta),
               "quant_comparison": quant_comparison(results),
               "read_bandwidth": read_bandwidth(results), "runs": results}
    written: list[tuple[str, str]] = []
    why = missing("matplotlib")
    if why:
        print(f"plots {why}", file=sys.stderr)
        meta["plots"] = f"plots {why}"
    else:
        written = write_plots(out, results)
        extra = scale.plot(out, results)
        if extra:
            written.append(extra)
    payload["plots"] = [name for name, _ in written]
    atomic_write_text(out / "bench.json", json.dumps(payload, indent=1, default=str))
    md = markdown(results, meta, rows)
    atomic_write_text(out / "bench.md", md)
    if markdown_to:
        write_benchmarks_md(Path(markdown_to), out, results, meta, rows, written, plots_dir)
    return md


def rebuild(out: Path, markdown_to=None, plots_dir=None) -> str:
    """Regenerate every report from <out>/bench.json (no measurement)."""
    payload = json.loads((Path(out) / "bench.json").read_text())
    return write_report(Path(out), payload["runs"], payload["meta"], markdown_to, plots_dir)


def reading(existing: str | None) -> str:
    """The hand-written reading of an earlier BENCHMARKS.md (between the markers), or the placeholder."""
    if existing:
        m = re.search(re.escape(READING_BEGIN) + r"\n?(.*?)\n?" + re.escape(READING_END), existing, re.S)
        if m and m.group(1).strip():
            return m.group(1).strip("\n")
    return READING_PLACEHOLDER


def write_benchmarks_md(path: Path, out: Path, results, meta, target_rows, written, plots_dir=None) -> None:
    import os

    path = Path(path)
    plots_dir = Path(plots_dir) if plots_dir else path.parent / "docs" / "benchmarks"
    links = []
    for name, caption in written:
        atomic_write_bytes(plots_dir / name, (Path(out) / name).read_bytes())
        links.append((os.path.relpath(plots_dir / name, path.parent), caption))
    scaling_md, scaling_png = Path(out) / "scaling" / "scaling.md", None
    if scaling_md.exists() and (Path(out) / "scaling" / "scaling.png").exists():
        atomic_write_bytes(plots_dir / "scaling.png", (Path(out) / "scaling" / "scaling.png").read_bytes())
        scaling_png = os.path.relpath(plots_dir / "scaling.png", path.parent)
    existing = path.read_text() if path.exists() else None
    atomic_write_text(path, benchmarks_md(results, meta, target_rows, links, reading(existing),
                                          scaling_md.read_text() if scaling_md.exists() else None, scaling_png))


def benchmarks_md(results, meta, target_rows, links, reading_text, scaling_text=None, scaling_png=None) -> str:
    v = meta.get("versions") or {}
    ram = meta.get("ram_bytes")
    lines = ["# Benchmarks", "",
             "<!-- Generated by `pcmoe bench --markdown` from bench.json; regenerate with "
             "`pcmoe bench --report-only --out DIR --markdown BENCHMARKS.md`. Only the reading is hand-written. -->",
             "", "## How these numbers were made", "",
             f"- Command: `{meta.get('command')}`",
             f"- Commit: `{meta.get('commit')}`, {meta.get('date')}",
             f"- Machine: {meta.get('cpu')}, {meta.get('cores')} cores, "
             f"{f'{ram / 2**30:.1f} GiB RAM' if ram else 'RAM unknown'}, Linux {meta.get('kernel')}; "
             f"{meta.get('threads')} threads per run",
             "- Packages: " + ", ".join(f"{k} {v.get(k) or 'not installed'}" for k in
                                        ("torch", "transformers", "accelerate", "llama-cpp-python", "matplotlib",
                                         "numpy")) + f"; Python {meta.get('python')}",
             f"- Scaling study: `{meta.get('scaling_command') or 'pcmoe bench --scaling'}`"
             + ("" if meta.get("scaling_command") else " (not run with these results)")]
    if meta.get("plots"):
        lines.append(f"- {meta['plots']}")
    for note in notes(results, meta):
        lines += ["", note]
    lines += ["", "## Reading", "", READING_BEGIN, reading_text, READING_END, "",
              "## Headline targets", ""] + targets_table(target_rows) + [""] \
        + _decode_targets_section(results, meta, "##") + ["## Results", ""] + tables(results)
    if links:
        lines += ["## Plots", ""]
        for rel, caption in links:
            lines += [f"![{caption}]({rel})", "", f"_{caption}_", ""]
    lines += ["## Scaling", ""]
    if scaling_text:
        lines += [f"Command: `{meta.get('scaling_command') or 'python benchmarks/scaling.py'}`", "", scaling_text, ""]
        if scaling_png:
            lines += [f"![scaling: decode time and peak RSS vs resident weights]({scaling_png})", ""]
    else:
        lines += ["Not part of these results. Run it with `pcmoe bench --scaling` (after the suite, into "
                  "`<out>/scaling`) or alone with `python benchmarks/scaling.py --out results/scaling`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the bench output folder (holds bench.json)")
    ap.add_argument("--to", help="write this BENCHMARKS.md too")
    ap.add_argument("--plots-dir", help="where the plots are copied for --to (default <its folder>/docs/benchmarks)")
    args = ap.parse_args(argv)
    print(rebuild(Path(args.out), args.to, args.plots_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
