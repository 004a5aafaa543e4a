"""The benchmark's PNG plots (matplotlib, the [bench] extra), written atomically."""

from __future__ import annotations

from pathlib import Path

from pcmoe.bench.common import savefig
from pcmoe.bench.summary import by_label, memory_x, storage_rows, succeeded


def write_plots(out: Path, results: list[dict]) -> list[tuple[str, str]]:
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

    ok = [r for r in succeeded(results) if r.get("section") in ("lm", "quant", "shadow", "peers")
          and memory_x(r)]
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
    by = by_label(results)
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
    vision = [r for r in succeeded(results) if r.get("section") == "vision" and memory_x(r)]
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
