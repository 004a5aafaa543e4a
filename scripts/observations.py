"""The paper's motivation study (paper.md §1) on any pcmoe checkpoint, through the engine.

  python scripts/observations.py --model models/pcmoe-vit --out docs/observations/vision
  python scripts/observations.py --model models/pcmoe-lm --data models/pcmoe-lm/eval/heldout.txt \
      --out docs/observations/lm

1. Temporal locality (§1.1): with policy "full", the share of each input's routing choices that
   goes to each expert (unmasked routing, read from the engine's per-layer counters), one row per
   input over time: a vision frame (or group of frames) of the Fashion-MNIST test stream, or an LM
   window of tokens read in document order. Writes a heatmap of one layer and, for every layer,
   the mean per-window routing entropy against the entropy of the pooled routing, and the mean
   overlap of the top-N/2 experts of consecutive windows against random window pairs.
2. Exchangeability / skippable computation (§1.2-1.3, v1 Tables 1-2): policy "random-keep" keeps
   a random half of the experts in one layer (--layer) or in every layer; tokens routed to a dropped
   expert are skipped or exchanged (masked gating to a kept one). Accuracy on the test set (vision)
   or perplexity (LM), averaged over seeds.

Outputs under --out: locality.png, observations.json, README.md (Markdown tables).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import pcmoe
from pcmoe.formats import PLAN_FORMAT
from pcmoe.system import atomic_write_text

# ------------------------------------------------------------------------------------------------
# 1. Temporal locality


def _counts(engine) -> np.ndarray:
    return np.stack([t.counts.numpy().copy() for t in engine.trackers])        # [L, N]


def record_counts(engine, steps) -> tuple[np.ndarray, list]:
    """Run `steps` (an iterator that does one window's forwards per item and yields its tag) and
    return the routing choices each window made, [W, L, N], with the tags. The engine must be
    loaded with track_importance=True (the counters only move then)."""
    rows, tags = [], []
    before = _counts(engine)
    for tag in steps:
        now = _counts(engine)
        rows.append(now - before)
        tags.append(tag)
        before = now
    if not rows or not any(r.any() for r in rows):
        raise RuntimeError("no routing was recorded: load the engine with track_importance=True")
    return np.stack(rows), tags


@torch.inference_mode()
def vision_steps(engine, frames: int, seed: int = 0, per_window: int = 1, data=None):
    """Frames of the Fashion-MNIST test stream, `per_window` frames per window; tag = the label."""
    from pcmoe.models.vit_moe import frame_stream, load_fashion_mnist

    images, labels = load_fashion_mnist("test", data)
    stream = frame_stream(images, labels, frames, seed)
    try:
        for i, (frame, label) in enumerate(stream):
            engine.begin_input()
            engine.model(pixel_values=frame)
            if (i + 1) % per_window == 0:
                yield label
    finally:
        engine.end_input()


@torch.inference_mode()
def lm_steps(engine, documents: list[str], window: int = 128, max_tokens: int | None = None):
    """Windows of `window` tokens of each document in order (fresh context per window); tag = the
    document's index."""
    used = 0
    try:
        for d, doc in enumerate(documents):
            ids = engine.encode(doc)
            engine.begin_input()
            for start in range(0, len(ids), window):
                chunk = ids[start:start + window]
                if max_tokens is not None and used >= max_tokens:
                    return
                engine.model(input_ids=torch.tensor([chunk]))
                used += len(chunk)
                yield d
    finally:
        engine.end_input()


def _entropy_bits(p: np.ndarray) -> np.ndarray:
    return -(p * np.log2(np.where(p > 0, p, 1.0))).sum(axis=-1)


def _top(shares: np.ndarray, n: int) -> np.ndarray:
    return np.argsort(-shares, axis=-1, kind="stable")[..., :n]               # [W, n]


def locality_stats(counts: np.ndarray, seed: int = 0) -> dict:
    """counts [W, N] routing choices per window of one layer -> entropy and top-N/2 overlap numbers."""
    counts = counts[counts.sum(axis=1) > 0]
    W, N = counts.shape
    shares = counts / counts.sum(axis=1, keepdims=True)                       # [W, N]
    pooled = counts.sum(axis=0) / counts.sum()                                # [N]
    n = max(1, N // 2)
    top = _top(shares, n)

    def overlap(i: np.ndarray, j: np.ndarray) -> float:
        if len(i) == 0:
            return float("nan")
        hits = [len(set(top[a]) & set(top[b])) for a, b in zip(i, j)]
        return float(np.mean(hits)) / n

    def distance(i: np.ndarray, j: np.ndarray) -> float:  # total variation between the two share vectors
        return float(0.5 * np.abs(shares[i] - shares[j]).sum(axis=1).mean()) if len(i) else float("nan")

    # Control: the same number of random, non-adjacent window pairs (the global skew alone).
    rng = np.random.default_rng(seed)
    ri, rj = rng.integers(0, W, size=(2, max(W - 1, 1) * 4))
    keep = np.abs(ri - rj) > 1
    entropy = _entropy_bits(shares)
    return {
        "windows": int(W), "experts": int(N), "top_n": int(n),
        "mean_window_entropy_bits": float(entropy.mean()),
        "global_entropy_bits": float(_entropy_bits(pooled)),
        "max_entropy_bits": math.log2(N),
        "consecutive_top_overlap": overlap(np.arange(W - 1), np.arange(1, W)),
        "random_pair_top_overlap": overlap(ri[keep], rj[keep]),
        "consecutive_tv_distance": distance(np.arange(W - 1), np.arange(1, W)),
        "random_pair_tv_distance": distance(ri[keep], rj[keep]),
        "chance_top_overlap": n / N,
        "pooled_share": pooled.round(4).tolist(),
        "mean_choices_per_window": float(counts.sum(axis=1).mean()),
    }


def plot_heatmap(counts: np.ndarray, path: Path, titles: list[str] | str, tags: list | None = None,
                 tag_name: str = "") -> None:
    """counts [W, N] or [W, P, N] (P panels, e.g. layers). Rows = windows over time, columns =
    experts, colour = share of the window's routing choices; an optional tag strip on the left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if counts.ndim == 2:
        counts = counts[:, None]
    if isinstance(titles, str):
        titles = [titles]
    shares = counts / np.maximum(counts.sum(axis=2, keepdims=True), 1)       # [W, P, N]
    W, P, N = shares.shape
    vmax = float(shares.max())
    fig = plt.figure(figsize=(1.4 + P * (0.6 + 0.25 * N), 6.5))
    grid = fig.add_gridspec(1, P + 2, width_ratios=[0.06 * N] + [N] * P + [0.05 * N], wspace=0.08)
    axes = [fig.add_subplot(grid[1 + i]) for i in range(P)]
    for i, ax in enumerate(axes):
        # Antialiased: thousands of rows are averaged, not dropped, when drawn into a few hundred pixels.
        im = ax.imshow(shares[:, i], aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="antialiased")
        ax.set_xlabel("expert")
        ax.set_xticks(range(N))
        ax.set_title(titles[i], fontsize=9)
        ax.set_yticks([])
    fig.colorbar(im, cax=fig.add_subplot(grid[P + 1]), label="share of the window's routing choices")
    strip = fig.add_subplot(grid[0], sharey=axes[0])
    if tags:
        values = np.asarray(tags, dtype=float)[:, None]
        strip.imshow(values % 10, aspect="auto", cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
        strip.set_ylabel(f"window, time going down (colour strip: {tag_name})")
    else:
        strip.set_ylabel("window, time going down")
    strip.set_xticks([])
    strip.set_yticks([])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# 2. Exchangeability and skippable computation


@torch.inference_mode()
def vision_accuracy(engine, data=None, limit: int | None = None, batch_size: int = 500) -> dict:
    from pcmoe.models.vit_moe import load_fashion_mnist

    images, labels = load_fashion_mnist("test", data)
    if limit:
        images, labels = images[:limit], labels[:limit]
    correct = 0
    for s in range(0, len(images), batch_size):
        x = torch.from_numpy(images[s:s + batch_size].astype(np.float32) / 255.0)[:, None]
        engine.begin_input()
        correct += int((engine.model(pixel_values=x).logits.argmax(-1).numpy() == labels[s:s + batch_size]).sum())
    engine.end_input()
    return {"accuracy": correct / len(images), "images": len(images)}


def lm_perplexity(engine, documents, window: int = 256, max_tokens: int | None = None) -> dict:
    from pcmoe.evaluate import perplexity

    return perplexity(engine, documents, window=window, max_tokens=max_tokens, progress=False)


def exchangeability(model: Path, evaluate, layer: int | None, seeds: list[int], metric: str, log=print) -> dict:
    """Random keep of half the experts in one layer (`layer`; None = each layer in turn) and in all
    layers, skip vs exchange, per seed. `evaluate(engine) -> dict` holds `metric`; returns rows
    with the mean, std and per-seed values."""
    def run(policy, **kw):
        with pcmoe.load(model, policy=policy, progress=False, **kw) as engine:
            t0 = time.perf_counter()
            result = evaluate(engine)
            stats = engine.stats()
            num_experts = [c.num_experts for c in engine.committees]
        return {metric: result[metric], "hit_rate": stats["hit_rate"], "num_experts": num_experts,
                "router_mass_outside": stats["router_mass_outside"], "seconds": time.perf_counter() - t0}

    base = run("full")
    log(f"original: {metric} {base[metric]:.4f}")
    num_experts = base["num_experts"]
    rows = [{"method": "original (all experts)", "scope": "-", "strategy": "-", "mean": base[metric], "std": 0.0,
             "per_seed": [base[metric]], "hit_rate": 1.0, "router_mass_outside": 0.0}]
    singles = range(len(num_experts)) if layer is None else [layer]
    scopes = [(f"layer {i} only", [i]) for i in singles] + [("all layers", range(len(num_experts)))]
    for scope, halved in scopes:
        sizes = [N // 2 if i in halved else N for i, N in enumerate(num_experts)]
        plan = {"format": PLAN_FORMAT, "committee_sizes": sizes}
        for strategy in ("skip", "exchange"):
            runs = [run("random-keep", plan=plan, strategy=strategy, seed=s) for s in seeds]
            values = [r[metric] for r in runs]
            row = {"method": f"random {strategy}, {scope}", "scope": scope, "strategy": strategy,
                   "committee_sizes": sizes, "mean": float(np.mean(values)), "std": float(np.std(values)),
                   "per_seed": values, "hit_rate": float(np.mean([r["hit_rate"] for r in runs])),
                   "router_mass_outside": float(np.mean([r["router_mass_outside"] for r in runs]))}
            rows.append(row)
            log(f"{row['method']}: {metric} {row['mean']:.4f} ± {row['std']:.4f} {values}")
    return {"metric": metric, "layer": layer, "seeds": seeds, "num_experts": num_experts, "rows": rows}


# ------------------------------------------------------------------------------------------------
# Report


def markdown(report: dict) -> str:
    loc, ex = report["locality"], report["exchangeability"]
    lines = [f"# Motivation-study observations: `{report['model']}`", "",
             f"Generated by `{report['command']}` ({report['seconds']:.0f} s, torch threads "
             f"{report['threads']}). Protocol: paper.md §1; script: `scripts/observations.py`.", "",
             "## 1. Temporal locality of expert activation", "",
             f"Input stream: {loc['stream']}. Policy `full` (unmasked routing). Heatmap: MoE layer(s) "
             f"{', '.join(map(str, loc.get('panels', [loc['layer']])))}, one row per window.", "",
             "![routing shares over time](locality.png)", "",
             "Share = the window's routing choices (token x top-k) that went to each expert. Entropy in bits "
             f"(max log2 N = {loc['layers'][0]['max_entropy_bits']:.2f}). Top-n overlap = |top-n(w) ∩ top-n(w')| / n "
             f"with n = N/2 = {loc['layers'][0]['top_n']}, for consecutive windows and for random "
             f"non-adjacent pairs (chance {loc['layers'][0]['chance_top_overlap']:.2f}).", "",
             "TV distance = total variation between two windows' share vectors (0 = same routing mix).", "",
             "| MoE layer | windows | mean window entropy | pooled entropy | top-n overlap, consecutive "
             "| top-n overlap, random pairs | TV distance, consecutive | TV distance, random pairs |",
             "|---|---|---|---|---|---|---|---|"]
    for i, s in enumerate(loc["layers"]):
        lines.append(f"| {i} | {s['windows']} | {s['mean_window_entropy_bits']:.3f} | {s['global_entropy_bits']:.3f} "
                     f"| {s['consecutive_top_overlap']:.3f} | {s['random_pair_top_overlap']:.3f} "
                     f"| {s['consecutive_tv_distance']:.3f} | {s['random_pair_tv_distance']:.3f} |")
    metric = ex["metric"]
    lines += ["", "## 2. Exchangeability and skippable computation (v1 Tables 1-2 protocol)", "",
              f"Policy `random-keep`: a random half of the experts kept in MoE layer {ex['layer']} only, or in every "
              f"MoE layer; a token whose expert was dropped either gets no expert output (skip) or is re-routed "
              f"to the best kept expert by masked gating (exchange). {ex['eval']}; mean ± std over seeds "
              f"{ex['seeds']}. Hit rate = share of routing choices whose expert was kept.", "",
              f"| Method | {metric} (mean ± std) | per seed | hit rate | router mass dropped |",
              "|---|---|---|---|---|"]
    for r in ex["rows"]:
        per = ", ".join(f"{v:.4f}" for v in r["per_seed"])
        lines.append(f"| {r['method']} | {r['mean']:.4f} ± {r['std']:.4f} | {per} | {r['hit_rate']:.3f} "
                     f"| {r['router_mass_outside']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="pcmoe checkpoint folder")
    ap.add_argument("--data", help="LM: text file of documents (required); vision: Fashion-MNIST folder (optional)")
    ap.add_argument("--layer", type=int, default=0,
                    help="MoE layer of the heatmap and of the one-layer experiments (default 0, as v1)")
    ap.add_argument("--out", type=Path, help="output folder (default docs/observations/<model folder name>)")
    ap.add_argument("--frames", type=int, default=2000, help="vision: frames in the locality stream")
    ap.add_argument("--frames-per-window", type=int, default=1, help="vision: frames per heatmap row")
    ap.add_argument("--locality-window", type=int, default=128, help="LM: tokens per heatmap row")
    ap.add_argument("--locality-tokens", type=int, default=65536, help="LM: tokens read for the locality study")
    ap.add_argument("--window", type=int, default=256, help="LM: perplexity window")
    ap.add_argument("--max-tokens", type=int, default=32768, help="LM: tokens scored per perplexity run")
    ap.add_argument("--test-images", type=int, help="vision: score the first n test images (default all 10,000)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="random-keep seeds")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = args.out or Path("docs/observations") / args.model.name
    model_type = json.loads((args.model / "config.json").read_text()).get("model_type")
    vision = model_type == "pcmoe_vit_moe"
    if not vision and not args.data:
        ap.error("a language model needs --data FILE.txt (documents separated by a blank line + '=====')")
    documents = None
    if not vision:
        from pcmoe.evaluate import read_documents

        documents = read_documents(args.data)

    with pcmoe.load(args.model, policy="full", progress=False, track_importance=True) as engine:
        if not 0 <= args.layer < len(engine.trackers):
            ap.error(f"--layer must be in 0..{len(engine.trackers) - 1}")
        block = engine.blocks[args.layer].block_name
        if vision:
            steps = vision_steps(engine, args.frames, per_window=args.frames_per_window, data=args.data)
            stream = (f"{args.frames} frames of the Fashion-MNIST test frame stream (seed 0: runs of 20-120 "
                      f"same-class frames, shifts ≤ 2 px, noise σ 0.05), {args.frames_per_window} frame(s) per window")
            tag_name = "class"
        else:
            steps = lm_steps(engine, documents, args.locality_window, args.locality_tokens)
            stream = (f"{args.data}: documents in file order, windows of {args.locality_window} tokens "
                      f"(at most {args.locality_tokens} tokens)")
            tag_name = "document"
        counts, tags = record_counts(engine, steps)                             # [W, L, N]
    layers = [locality_stats(counts[:, i]) for i in range(counts.shape[1])]
    L, N = counts.shape[1], counts.shape[2]
    panels = list(range(L)) if L * N <= 40 else sorted({args.layer, L // 2, L - 1})  # a readable width
    plot_heatmap(counts[:, panels], out / "locality.png",
                 [f"{args.model.name}: MoE layer {i}" for i in panels], tags, tag_name)
    s = layers[args.layer]
    print(f"locality (layer {args.layer}): entropy {s['mean_window_entropy_bits']:.3f} per window vs "
          f"{s['global_entropy_bits']:.3f} pooled bits; top-{s['top_n']} overlap {s['consecutive_top_overlap']:.3f} "
          f"consecutive vs {s['random_pair_top_overlap']:.3f} random pairs; TV distance "
          f"{s['consecutive_tv_distance']:.3f} vs {s['random_pair_tv_distance']:.3f}", flush=True)

    if vision:
        ex = exchangeability(args.model, lambda e: vision_accuracy(e, args.data, args.test_images), args.layer,
                             args.seeds, "accuracy", log=lambda m: print(m, flush=True))
        ex["eval"] = f"Accuracy on the Fashion-MNIST test set ({args.test_images or 10000} images)"
    else:
        ex = exchangeability(args.model, lambda e: lm_perplexity(e, documents, args.window, args.max_tokens),
                             args.layer, args.seeds, "ppl", log=lambda m: print(m, flush=True))
        ex["eval"] = (f"Perplexity on {args.data} (first {args.max_tokens} tokens, windows of {args.window})")

    report = {"model": str(args.model), "model_type": model_type,
              "command": "python scripts/observations.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "threads": args.threads, "seconds": time.perf_counter() - t0,
              "locality": {"stream": stream, "layer": args.layer, "panels": panels, "block": block, "layers": layers,
                           "tags": [int(t) for t in tags]},
              "exchangeability": ex}
    atomic_write_text(out / "observations.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(out / "README.md", markdown(report))
    print(f"wrote {out}/locality.png, observations.json, README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
