"""Summarise benchmark runs: bench.json, bench.md (tables + target ratios), PNG plots, and
BENCHMARKS.md (the same with provenance, plots and a hand-written reading that survives
regeneration).

    pcmoe bench --report-only --out results/bench --markdown BENCHMARKS.md
    python -m pcmoe.bench.report results/bench --to BENCHMARKS.md      # the same

Memory axis (tables and plots): the weight bytes a setup holds or is allowed to hold, without the
runtime's own overhead — pcmoe: its resident weights (non-experts + expert slots); transformers
and accelerate: the parameter bytes in RAM after loading; llama.cpp resident: the GGUF's bytes;
llama.cpp memory-mapped: its cgroup limit minus its measured runtime overhead.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from pcmoe.bench.common import BUSY_CPU_SHARE, GGUF_TYPE, missing, savefig
from pcmoe.budget import format_bytes
from pcmoe.system import atomic_write_bytes, atomic_write_text

READING_BEGIN = "<!-- reading: hand-written; kept when this file is regenerated -->"
READING_END = "<!-- /reading -->"
READING_PLACEHOLDER = ("_Write the reading here: where pcmoe wins, where it loses, and why. The text between "
                       "these markers is kept when the file is regenerated._")
MATCH_TOLERANCE = 0.05  # a quantised run and a committee are "matched" within 5 % of memory


def _mb(n):
    if not isinstance(n, (int, float)):
        return "-"
    return f"{n / 1e6:.1f}" if abs(n) >= 1e7 else f"{n / 1e6:.3f}"


def _f(v, fmt="{:.2f}"):
    return fmt.format(v) if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) else "-"


def _mib(n):
    return f"{n / 2**20:.0f} MiB" if isinstance(n, (int, float)) else "-"


def _ok(results):
    return [r for r in results if r.get("returncode") == 0]


def _by_label(results):
    return {r["label"]: r for r in _ok(results)}


def _quantized(r) -> str | None:
    """int8 / int4 (pcmoe) or q8_0 / q4_K_M (llama.cpp) when the run's weights are quantised."""
    q = ((r.get("spec") or {}).get("options") or {}).get("quantize")
    if q:
        return q
    return r.get("outtype") if r.get("outtype") in ("q8_0", "q4_K_M") else None


def memory_x(r) -> int | None:
    """The weight bytes a run holds or is allowed to hold (see the module docstring)."""
    if r.get("policy") == "llama.cpp":
        if r.get("use_mmap"):
            return r.get("budget_bytes") or r.get("cgroup_limit_bytes")
        return r.get("model_bytes")
    if r.get("policy") in ("transformers", "accelerate-offload"):
        return r.get("held_bytes")
    return r.get("resident_bytes")


def _ckpt_type(meta) -> str | None:
    return GGUF_TYPE.get(((meta or {}).get("model_sizes") or {}).get("dtype"))


def _busy(r) -> bool:
    share = r.get("cpu_other_share")
    return isinstance(share, (int, float)) and share > BUSY_CPU_SHARE


# -- targets -------------------------------------------------------------------------------------


def runtime_overhead(full: dict | None) -> int | None:
    """The runtime's own memory, measured on the `full` run: its peak RSS minus its resident weights."""
    if not full or not full.get("peak_rss_bytes") or not full.get("resident_bytes"):
        return None
    return max(0, int(full["peak_rss_bytes"] - full["resident_bytes"]))


def targets(results, meta=None) -> list[dict]:
    """The issue's targets at 50 % of expert memory, as measured ratios; a target whose runs are
    missing is listed with value None and the reason."""
    ok, every = _by_label(results), {r["label"]: r for r in results}
    ck = _ckpt_type(meta) or "bf16"
    rows = []

    def why_missing(labels):
        for label in labels:
            r = every.get(label)
            if r is None:
                return f"no `{label}` run"
            if r.get("skipped"):
                return f"`{label}` {r['skipped']}"
            if r.get("returncode") != 0:
                return f"`{label}` failed: {r.get('error', '?')}"
        return "a needed measurement is missing"

    def add(name, op, goal, labels, fn, note=""):
        recs = [ok.get(label) for label in labels]
        value = None
        if all(recs):
            try:
                value = fn(*recs)
            except (TypeError, ZeroDivisionError, KeyError):
                value = None
        row = {"target": name, "goal": f"{op} {goal:g}", "op": op, "goal_value": goal, "value": value,
               "runs": labels, "note": note}
        if value is None:
            row.update(met=None, margin=None, note=why_missing(labels) if not all(recs) else
                       "a needed measurement is missing in the runs")
        else:
            row["met"] = value >= goal if op == ">=" else value <= goal
            row["margin"] = (value / goal - 1) if op == ">=" else (1 - value / goal)
            busy = [f"`{r['label']}` {100 * r['cpu_other_share']:.0f} %" for r in recs if _busy(r)]
            if busy:
                row["note"] = "; ".join(filter(None, [note, "others' CPU during " + ", ".join(busy)]))
        rows.append(row)

    def ratio(key):
        return lambda a, b: a[key] / b[key]

    def increase(com, full, mag):
        inc_c, inc_m = com["ppl"] - full["ppl"], mag["ppl"] - full["ppl"]
        if inc_c <= 0:
            return 0.0
        return inc_c / inc_m if inc_m > 0 else float("inf")

    add("committee ppl / full ppl", "<=", 1.05, ["committee@50%", "full"], ratio("ppl"))
    add("committee ppl increase / magnitude-keep's", "<=", 0.5, ["committee@50%", "full", "magnitude-keep@50%"],
        increase)
    add("committee decode / full decode", ">=", 0.95, ["committee@50%", "full"], ratio("decode_tokens_per_s"))
    add("committee decode / on-demand decode (page cache evicted)", ">=", 5, ["committee@50%", "on-demand@50%"],
        ratio("decode_tokens_per_s"))
    add("committee decode / accelerate offload decode (same budget and precision)", ">=", 5,
        ["committee@50%", "accelerate-offload@50%"], ratio("decode_tokens_per_s"))
    add(f"committee decode / llama.cpp mmap {ck} decode (same memory limit and precision)", ">=", 1.0,
        ["committee@50%", f"llama.cpp mmap@50%/{ck}"], ratio("decode_tokens_per_s"))
    overhead = runtime_overhead(ok.get("full"))
    add("committee peak RSS / (budget + runtime overhead)", "<=", 1.03, ["committee@50%", "full"],
        lambda com, full: com["peak_rss_bytes"] / (com["budget_bytes"] + runtime_overhead(full)),
        note=f"overhead measured on the `full` run (its peak RSS - its resident weights): {format_bytes(overhead)}"
        if overhead is not None else "")
    add(f"pcmoe full decode / llama.cpp resident {ck} decode (same precision)", ">=", 0.8,
        ["full", f"llama.cpp resident/{ck}"], ratio("decode_tokens_per_s"))
    return rows


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


# -- quantisation at matched memory --------------------------------------------------------------


def quant_comparison(results) -> list[dict]:
    """Every quantised setup next to the bf16 committee (same checkpoint precision) whose memory is
    closest, with who wins on quality and on speed."""
    ok = _ok(results)
    committees = [r for r in ok if r.get("policy") == "committee" and not _quantized(r) and not r.get("storage")
                  and r.get("section") in ("lm", "quant") and memory_x(r)]
    rows = []
    for q in ok:
        if not _quantized(q) or not memory_x(q) or not committees:
            continue
        c = min(committees, key=lambda r: abs(memory_x(r) - memory_x(q)))
        row = {"quantised": q["label"], "quantised_bytes": memory_x(q), "committee": c["label"],
               "committee_bytes": memory_x(c), "memory_gap": memory_x(c) / memory_x(q) - 1,
               "quantised_ppl": q.get("ppl"), "committee_ppl": c.get("ppl"),
               "quantised_decode": q.get("decode_tokens_per_s"), "committee_decode": c.get("decode_tokens_per_s")}
        if row["quantised_ppl"] and row["committee_ppl"]:
            row["ppl_ratio"] = c["ppl"] / q["ppl"]
            row["quality"] = "committee" if c["ppl"] < q["ppl"] else "quantised"
        if row["quantised_decode"] and row["committee_decode"]:
            row["speed_ratio"] = c["decode_tokens_per_s"] / q["decode_tokens_per_s"]
            row["speed"] = "committee" if row["speed_ratio"] > 1 else "quantised"
        row["matched"] = abs(row["memory_gap"]) <= MATCH_TOLERANCE
        rows.append(row)
    return rows


def quant_verdicts(rows) -> list[str]:
    out = []
    for r in rows:
        gap = f"{100 * r['memory_gap']:+.1f} % memory"
        parts = []
        if "quality" in r:
            better = r["committee"] if r["quality"] == "committee" else r["quantised"]
            parts.append(f"quality: {better} better (ppl {r['committee_ppl']:.3f} vs {r['quantised_ppl']:.3f}, "
                         f"committee {100 * (r['ppl_ratio'] - 1):+.1f} %)")
        if "speed" in r:
            faster = r["committee"] if r["speed"] == "committee" else r["quantised"]
            parts.append(f"speed: {faster} faster (committee {r['speed_ratio']:.2f}x)")
        match = "" if r["matched"] else " (not closely matched: add a committee run at this memory)"
        out.append(f"- `{r['committee']}` vs `{r['quantised']}` ({gap}){match}: " + ("; ".join(parts) or "no data"))
    matched = [r for r in rows if r["matched"]]
    if matched:
        q_wins = sum(r.get("quality") == "committee" for r in matched)
        s_wins = sum(r.get("speed") == "committee" for r in matched)
        out.append(f"- Over {len(matched)} closely matched pair(s) the bf16 committee wins on quality in {q_wins} "
                   f"and on speed in {s_wins}.")
    return out


# -- storage -------------------------------------------------------------------------------------


def _reads(r) -> tuple[int, float, int]:
    """Bytes, seconds and count of the expert reads of a run (evaluation + decode phases)."""
    b, s, n = r.get("bytes_read") or 0, r.get("read_s") or 0.0, r.get("reads") or 0
    ev = r.get("eval_stats") or {}
    return b + (ev.get("bytes_read") or 0), s + (ev.get("read_s") or 0.0), n + (ev.get("reads") or 0)


def read_bandwidth(results) -> dict | None:
    """The achieved cold read rate of this disk for expert-sized reads, from the runs without
    storage emulation (on-demand@50% preferred: every miss is a read from the evicted file)."""
    ok = [r for r in _ok(results) if r.get("section") == "lm" and r.get("policy") in ("on-demand", "committee")]
    ok.sort(key=lambda r: (r["label"] != "on-demand@50%", r.get("policy") != "on-demand"))
    for r in ok:
        b, s, n = _reads(r)
        if b and s > 0:
            return {"mb_per_s": b / s / 1e6, "read_bytes": b / max(n, 1), "reads": n, "run": r["label"]}
    return None


def storage_rows(results) -> list[dict]:
    from pcmoe.store import STORAGE_PROFILES

    by = _by_label(results)
    bw = read_bandwidth(results)
    rows = []
    for policy in ("committee", "on-demand"):
        base = by.get(f"{policy}@50%")
        if base:
            rows.append({"run": base["label"], "profile": "this disk (no emulation)", "profile_mb_per_s": None,
                         "rec": base, "vs_disk": 1.0})
        for r in results:
            if r.get("section") != "storage" or not r["label"].startswith(f"{policy}@"):
                continue
            profile = r.get("storage") or r["label"].rsplit("/", 1)[-1]
            mbps = STORAGE_PROFILES.get(profile)
            row = {"run": r["label"], "profile": profile, "profile_mb_per_s": mbps, "rec": r}
            if base and r.get("decode_tokens_per_s") and base.get("decode_tokens_per_s"):
                row["vs_disk"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            if bw and mbps:
                row["effect"] = ("slows reads to the profile" if mbps < bw["mb_per_s"] else
                                 "none expected: the profile is faster than this disk")
            rows.append(row)
    return rows


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
    overhead = runtime_overhead(_by_label(results).get("full"))
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
    busy = [r["label"] for r in _ok(results) if _busy(r)]
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
    return "\n".join(lines + tables(results))


def tables(results) -> list[str]:
    """The result tables, one per section."""
    full = _by_label(results).get("full", {})
    lines = []
    sections = [("lm", "Language model: policies x budgets"), ("quant", "Quantisation on the same memory axis"),
                ("peers", "External peers")]
    for section, title in sections:
        rows = [r for r in results if r.get("section") == section]
        if not rows:
            continue
        lines += [f"### {title}", ""] + LM_HEADER + [_lm_row(r, full) for r in rows] + [""]
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
            b, s, _ = _reads(r)
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


# -- plots ---------------------------------------------------------------------------------------


def plots(out: Path, results: list[dict]) -> list[tuple[str, str]]:
    """Write the PNGs into `out`; returns (file name, caption) of each written plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name, caption):
        fig.tight_layout()
        savefig(fig, out / name)
        plt.close(fig)
        written.append((name, caption))

    ok = [r for r in _ok(results) if r.get("section") in ("lm", "quant", "peers") and memory_x(r)]
    groups: dict[str, list] = {}
    for r in ok:
        groups.setdefault(_series(r), []).append(r)
    for metric, ylabel, fname, caption in (
            ("ppl", "held-out perplexity (lower is better)", "memory_vs_quality.png", "memory vs quality"),
            ("decode_tokens_per_s", "decode tokens/s (higher is better)", "memory_vs_speed.png", "memory vs speed")):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        palette = plt.get_cmap("tab20").colors  # more series than the default cycle's 10 colours
        markers = "os^Dv<>pPX*h"
        for i, (name, rows) in enumerate(sorted(groups.items())):
            pts = sorted(((memory_x(r), r[metric], r) for r in rows if r.get(metric)), key=lambda p: p[:2])
            if not pts:
                continue
            xs, ys = [p[0] / 1e6 for p in pts], [p[1] for p in pts]
            ax.plot(xs, ys, marker=markers[i % len(markers)], color=palette[(2 * i) % 20 + (2 * i) // 20 % 2],
                    linestyle="-" if len(pts) > 1 else "none", label=name)
            if name == "llama.cpp resident":
                for x, y, p in zip(xs, ys, pts):
                    ax.annotate(p[2].get("outtype", ""), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("weight memory held or allowed (MB)")
        ax.set_ylabel(ylabel)
        if metric == "ppl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        save(fig, fname, caption + " (language model; x: weight bytes held or allowed, see the note above)")
    by = _by_label(results)
    com = by.get("committee@50%")
    if com and com.get("series"):
        s = com["series"]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot([x["doc"] for x in s], [x["hits"] / max(1, x["choices"]) for x in s], label="hit rate per document")
        ax2 = ax.twinx()
        ax2.bar([x["doc"] for x in s], [x["swaps"] for x in s], alpha=0.3, color="tab:orange", label="swaps")
        ax.set_xlabel("document in the stream")
        ax.set_ylabel("hit rate")
        ax2.set_ylabel("swaps")
        ax.set_title("committee at 50 % of expert memory: changes over the stream")
        save(fig, "committee_over_stream.png", "committee changes over the held-out stream (50 %)")
    if com and com.get("committee_sizes"):
        fig, ax = plt.subplots(figsize=(6, 3))
        sizes = com["committee_sizes"]
        ax.bar(range(len(sizes)), sizes, label="committee size")
        if com.get("per_layer_swaps"):
            ax.plot(range(len(sizes)), com["per_layer_swaps"], "o-", color="tab:red", label="swaps (decode)")
        ax.set_xlabel("MoE layer")
        ax.set_title("per-layer committee sizes at 50 % (uniform plan)")
        ax.legend()
        save(fig, "committee_sizes.png", "per-layer committee sizes at 50 %")
    srows = [r for r in storage_rows(results) if r["rec"].get("decode_tokens_per_s")]
    if any(r["profile_mb_per_s"] for r in srows):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        profiles = list(dict.fromkeys(r["profile"] for r in srows))
        width = 0.4
        for j, policy in enumerate(("committee", "on-demand")):
            vals = {r["profile"]: r["rec"]["decode_tokens_per_s"] for r in srows if r["run"].startswith(policy + "@")}
            ax.bar([i + (j - 0.5) * width for i in range(len(profiles))], [vals.get(p, 0) for p in profiles],
                   width, label=policy)
        ax.set_xticks(range(len(profiles)))
        ax.set_xticklabels(profiles, fontsize=7)
        ax.set_ylabel("decode tokens/s")
        ax.set_title("emulated storage at 50 % of expert memory")
        ax.legend()
        save(fig, "storage_profiles.png", "decode speed under the emulated storage profiles")
    vision = [r for r in _ok(results) if r.get("section") == "vision" and memory_x(r)]
    if vision:
        fig, ax = plt.subplots(figsize=(6, 4))
        vg: dict[str, list] = {}
        for r in vision:
            vg.setdefault(_series(r), []).append(r)
        for name, rows in sorted(vg.items()):
            pts = sorted((memory_x(r) / 1e6, r["accuracy"]) for r in rows if r.get("accuracy") is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel("resident weight memory (MB)")
        ax.set_ylabel("frame-stream accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "vision_memory_vs_accuracy.png", "vision: memory vs frame-stream accuracy")
        vc = next((r for r in vision if r["label"] == "vision committee@50%" and r.get("series")), None)
        if vc:
            s = vc["series"]
            fig, ax = plt.subplots(figsize=(7, 3.5))
            ax.plot([x["frame"] for x in s], [x["hits"] / max(1, x["choices"]) for x in s], label="hit rate")
            ax2 = ax.twinx()
            ax2.plot([x["frame"] for x in s], [x["swaps"] for x in s], color="tab:orange", alpha=0.6,
                     label="swaps")
            ax.set_xlabel("frame")
            ax.set_ylabel("hit rate")
            ax2.set_ylabel("swaps per interval")
            ax.set_title("vision committee at 50 %: changes over the frame stream")
            save(fig, "vision_committee_over_stream.png", "vision committee changes over the frame stream (50 %)")
    return written


def _series(r) -> str:
    if r.get("curve"):
        return r["curve"]
    if r.get("policy") == "llama.cpp":
        return f"llama.cpp mmap/{r.get('outtype')}" if r.get("use_mmap") else "llama.cpp resident"
    return r["label"].split("@")[0]


# -- writing -------------------------------------------------------------------------------------


def write_report(out: Path, results: list[dict], meta: dict, markdown_to: str | Path | None = None,
                 plots_dir: str | Path | None = None) -> str:
    """bench.json, bench.md and the plots in `out`; BENCHMARKS.md too when `markdown_to`."""
    out = Path(out)
    meta = {k: v for k, v in meta.items() if k != "plots"}  # a note from an earlier rebuild
    rows = targets(results, meta)
    payload = {"meta": meta, "targets": rows, "quant_comparison": quant_comparison(results),
               "read_bandwidth": read_bandwidth(results), "runs": results}
    written: list[tuple[str, str]] = []
    why = missing("matplotlib")
    if why:
        print(f"plots {why}", file=sys.stderr)
        meta["plots"] = f"plots {why}"
    else:
        written = plots(out, results)
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
              "## Headline targets", ""] + targets_table(target_rows) + ["", "## Results", ""] + tables(results)
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
