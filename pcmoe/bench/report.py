"""Summarise benchmark runs: bench.json, bench.md (tables + target ratios) and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from pcmoe.budget import atomic_write_text, format_bytes


def _mb(n):
    return f"{n / 1e6:.1f}" if n is not None else "-"


def _f(v, fmt="{:.2f}"):
    return fmt.format(v) if isinstance(v, (int, float)) else "-"


def _ok(results):
    return [r for r in results if r.get("returncode") == 0]


def _by_label(results):
    return {r["label"]: r for r in _ok(results)}


def targets(results) -> list[dict]:
    """The issue's targets at 50 % of expert memory, as measured ratios."""
    r = _by_label(results)
    full, com = r.get("full"), r.get("committee@50%")
    mag, od = r.get("magnitude-keep@50%"), r.get("on-demand@50%")
    acc = r.get("accelerate-offload@50%")
    rows = []

    def add(name, value, goal, ok):
        rows.append({"target": name, "value": value, "goal": goal, "met": ok})

    if full and com and full.get("ppl") and com.get("ppl"):
        v = com["ppl"] / full["ppl"]
        add("committee ppl / full ppl", v, "<= 1.05", v <= 1.05)
        if mag and mag.get("ppl"):
            inc_c, inc_m = com["ppl"] - full["ppl"], mag["ppl"] - full["ppl"]
            v = inc_c / inc_m if inc_m > 0 else float("inf")
            add("committee ppl increase / magnitude-keep's", v, "<= 0.5", v <= 0.5)
    if full and com and full.get("decode_tokens_per_s"):
        v = com["decode_tokens_per_s"] / full["decode_tokens_per_s"]
        add("committee decode / full decode", v, ">= 0.95", v >= 0.95)
    if od and com and od.get("decode_tokens_per_s"):
        v = com["decode_tokens_per_s"] / od["decode_tokens_per_s"]
        add("committee decode / on-demand decode (cold cache)", v, ">= 5", v >= 5)
    if acc and com and acc.get("decode_tokens_per_s"):
        v = com["decode_tokens_per_s"] / acc["decode_tokens_per_s"]
        add("committee decode / accelerate offload decode", v, ">= 5", v >= 5)
    for label in ("llama.cpp mmap@50%/bf16", "llama.cpp mmap@50%/f32"):
        lc = r.get(label)
        if lc and com and lc.get("decode_tokens_per_s"):
            v = com["decode_tokens_per_s"] / lc["decode_tokens_per_s"]
            add(f"committee decode / {label} decode", v, ">= 1.0", v >= 1.0)
    if com and com.get("cgroup_limit_bytes"):
        overhead = com["cgroup_limit_bytes"] - com["budget_bytes"]
        v = com["peak_rss_bytes"] / (com["budget_bytes"] + overhead)
        add("committee peak RSS / (budget + measured overhead)", v, "<= 1.03", v <= 1.03)
    return rows


def write_report(out: Path, results: list[dict], meta: dict) -> str:
    payload = {"meta": meta, "targets": targets(results), "runs": results}
    atomic_write_text(out / "bench.json", json.dumps(payload, indent=1, default=str))
    md = markdown(results, meta, payload["targets"])
    atomic_write_text(out / "bench.md", md)
    try:
        plots(out, results)
    except ImportError:
        pass  # matplotlib is in the [bench] extra
    return md


def markdown(results, meta, target_rows) -> str:
    full = _by_label(results).get("full", {})
    lines = [f"Commit {meta.get('commit')}, {meta.get('date')}, {meta.get('cpu')} ({meta.get('cores')} cores, "
             f"{meta.get('threads')} threads), torch {meta.get('torch')}, transformers {meta.get('transformers')}.",
             f"Model `{meta.get('model')}`; cgroup limits: "
             f"{'weights + ' + format_bytes(meta['overhead_allowance']) if meta.get('overhead_allowance') else 'off'}."
             f" Command: `{meta.get('command')}`", ""]
    if target_rows:
        lines += ["### Targets at 50 % of expert memory", "", "| target | measured | goal | met |", "|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['value']:.3f} | {t['goal']} | {'yes' if t['met'] else 'no'} |"
                  for t in target_rows]
        lines.append("")
    sections = [("lm", "Language model: policies x budgets"), ("storage", "Emulated storage (50 % of expert memory)"),
                ("quant", "Quantised experts"), ("peers", "External peers")]
    for section, title in sections:
        rows = [r for r in results if r.get("section") == section]
        if not rows:
            continue
        lines += [f"### {title}", "",
                  "| run | weights MB | peak RSS MB | ppl | ppl / full | decode tok/s | / full | prefill tok/s "
                  "| hit rate | mass outside | bytes/token | stall s | swaps |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r.get("returncode") != 0:
                lines.append(f"| {r['label']} | failed: {r.get('error', '')[:80]} |||||||||||| ")
                continue
            ppl_ratio = r["ppl"] / full["ppl"] if r.get("ppl") and full.get("ppl") else None
            dec_ratio = (r["decode_tokens_per_s"] / full["decode_tokens_per_s"]
                         if r.get("decode_tokens_per_s") and full.get("decode_tokens_per_s") else None)
            # llama.cpp mmap runs hold at most their budget of the file in memory
            weights = r.get("resident_bytes") or r.get("budget_bytes") or r.get("model_bytes")
            lines.append(
                f"| {r['label']} | {_mb(weights)} | {_mb(r.get('peak_rss_bytes'))} "
                f"| {_f(r.get('ppl'))} | {_f(ppl_ratio, '{:.3f}')} | {_f(r.get('decode_tokens_per_s'), '{:.1f}')} "
                f"| {_f(dec_ratio)} | {_f(r.get('prefill_tokens_per_s'), '{:.0f}')} "
                f"| {_f(r.get('hit_rate'), '{:.3f}')} "
                f"| {_f(r.get('router_mass_outside'), '{:.3f}')} | {_f(r.get('bytes_per_token'), '{:.0f}')} "
                f"| {_f(r.get('stall_s'))} | {r.get('swaps', '-')} |")
        lines.append("")
    vision = [r for r in results if r.get("section") == "vision"]
    if vision:
        lines += ["### Vision MoE on the frame stream", "",
                  "| run | weights MB | accuracy | frames/s | hit rate | mass outside | swaps | stall s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in vision:
            if r.get("returncode") != 0:
                lines.append(f"| {r['label']} | failed: {r.get('error', '')[:80]} |||||||")
                continue
            lines.append(f"| {r['label']} | {_mb(r.get('resident_bytes'))} | {_f(r.get('accuracy'), '{:.4f}')} "
                         f"| {_f(r.get('frames_per_s'), '{:.1f}')} | {_f(r.get('hit_rate'), '{:.3f}')} "
                         f"| {_f(r.get('router_mass_outside'), '{:.3f}')} | {r.get('swaps', '-')} "
                         f"| {_f(r.get('stall_s'))} |")
        lines.append("")
    return "\n".join(lines)


def plots(out: Path, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in _ok(results) if r.get("section") in ("lm", "quant", "peers")]
    groups: dict[str, list] = {}
    for r in ok:
        name = r["label"].split("@")[0]
        groups.setdefault(name, []).append(r)
    for metric, ylabel, fname in (("ppl", "held-out perplexity (lower is better)", "memory_vs_quality.png"),
                                  ("decode_tokens_per_s", "decode tokens/s (higher is better)",
                                   "memory_vs_speed.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, rows in sorted(groups.items()):
            pts = sorted((r.get("resident_bytes") or r.get("model_bytes") or r.get("peak_rss_bytes"), r.get(metric))
                         for r in rows if r.get(metric))
            if not pts:
                continue
            xs, ys = [p[0] / 1e6 for p in pts], [p[1] for p in pts]
            ax.plot(xs, ys, marker="o", linestyle="-" if len(pts) > 1 else "none", label=name)
        ax.set_xlabel("resident weight memory (MB)")
        ax.set_ylabel(ylabel)
        if metric == "ppl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
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
        fig.tight_layout()
        fig.savefig(out / "committee_over_stream.png", dpi=110)
        plt.close(fig)
    if com and com.get("committee_sizes"):
        fig, ax = plt.subplots(figsize=(6, 3))
        sizes = com["committee_sizes"]
        ax.bar(range(len(sizes)), sizes, label="committee size")
        if com.get("per_layer_swaps"):
            ax.plot(range(len(sizes)), com["per_layer_swaps"], "o-", color="tab:red", label="swaps")
        ax.set_xlabel("MoE layer")
        ax.set_title("per-layer committee sizes at 50 % (uniform plan)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "committee_sizes.png", dpi=110)
        plt.close(fig)
    vision = [r for r in _ok(results) if r.get("section") == "vision"]
    if vision:
        fig, ax = plt.subplots(figsize=(6, 4))
        vg: dict[str, list] = {}
        for r in vision:
            vg.setdefault(r["label"].split("@")[0], []).append(r)
        for name, rows in sorted(vg.items()):
            pts = sorted((r["resident_bytes"] / 1e6, r["accuracy"]) for r in rows if r.get("accuracy") is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel("resident weight memory (MB)")
        ax.set_ylabel("frame-stream accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "vision_memory_vs_accuracy.png", dpi=110)
        plt.close(fig)
