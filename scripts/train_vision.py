"""Train pcmoe's vision MoE on Fashion-MNIST (resumable), then export it with its model card.

  OMP_NUM_THREADS=1 python scripts/train_vision.py --work runs/vision --epochs 20     # train / resume
  OMP_NUM_THREADS=1 python scripts/train_vision.py --work runs/vision --epochs 20 --export models/pcmoe-vit
  python scripts/train_vision.py --card-only models/pcmoe-vit   # re-measure a model folder, rewrite its card
"""

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from pcmoe.system import atomic_write_text
from pcmoe.training.vision import VisionTrainConfig, export, measure, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/vision"), help="work directory (ckpt.pt, log.jsonl)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", help="folder of the Fashion-MNIST IDX .gz files (default: /usr/share/datasets/...)")
    ap.add_argument("--export", type=Path, help="write the trained model to this folder and evaluate it")
    ap.add_argument("--card-only", type=Path, metavar="FOLDER",
                    help="measure an exported model folder and write its card, without the training log")
    args = ap.parse_args()

    cfg = VisionTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, threads=args.threads,
                            seed=args.seed, data=args.data)
    if args.export or args.card_only:
        folder = args.export or args.card_only
        if args.export:
            info = export(args.work, args.export, cfg)
            info.update(_run_facts(args.work))
        else:
            info = measure(folder, cfg) | {"wall_hours": None, "epoch_accuracy": [], "step": None,
                                           "cpu": _cpu(), "exported": None}
        info["stream"] = _stream_metrics(folder, args.data)
        atomic_write_text(folder / "training_summary.json",
                          json.dumps({k: v for k, v in info.items() if k != "config"} | {"config": info["config"]},
                                     indent=1) + "\n")
        write_card(folder, info, args.epochs)
        print(json.dumps({k: v for k, v in info.items() if k not in ("expert_share", "config")}))
        return
    train(args.work, cfg, log=lambda m: print(m, flush=True))


def _run_facts(work: Path) -> dict:
    log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    # Wall time of the run: sum of the gaps between logged steps, so pauses between resumed sessions
    # (gaps over ten minutes) are not counted as training.
    gaps = [b["time"] - a["time"] for a, b in zip(log, log[1:])]
    accuracy = [(r["epoch"], r["test_accuracy"]) for r in log if "test_accuracy" in r]
    return {"wall_hours": sum(g for g in gaps if g < 600) / 3600, "epoch_accuracy": accuracy,
            "cpu": _cpu(), "exported": time.strftime("%Y-%m-%d")}


def _stream_metrics(folder: Path, data) -> dict:
    import pcmoe
    from pcmoe.models.vit_moe import evaluate_stream

    out = {}
    for policy, budget in (("full", None), ("committee", "50%experts")):
        with pcmoe.load(folder, policy=policy, budget=budget, progress=False) as engine:
            r = evaluate_stream(engine, data, frames=2000, seed=0, progress=False)
            st = engine.stats()
        out[policy] = {"accuracy": r["accuracy"], "frames": r["frames"], "frames_per_s": r["frames_per_s"],
                       "budget": budget or "100%", "hit_rate": st["hit_rate"], "swaps": st["swaps"]}
    return out


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def write_card(out: Path, info: dict, epochs: int) -> None:
    import pcmoe

    with pcmoe.load(out, policy="full", progress=False) as engine:
        sizes, cfg = engine.model_bytes, engine.config
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    c = info["config"]
    stream = info["stream"]
    if info["wall_hours"] is not None:
        curve = ", ".join(f"{e:.0f}: {a:.4f}" for e, a in info["epoch_accuracy"][::4] + info["epoch_accuracy"][-1:])
        run = (f"{info['step']} steps. Wall time {info['wall_hours'] * 60:.0f} min on a {info['cpu']} (2 vCPU; a "
               f"second training job shared the machine), exported {info['exported']} at commit {commit}.\n\n"
               f"Test accuracy by epoch: {curve}.")
    else:
        run = ("The training log of this checkpoint was lost with the machine it ran on (a session restart), so "
               "its wall time and accuracy curve are not reported; every metric below was measured on the "
               f"shipped files themselves at commit {commit} on an {info['cpu']}.")
    shares = info["expert_share"]
    options = ""
    if (out / "pcmoe_options.json").exists():  # committee knobs this model ships with
        shipped = json.loads((out / "pcmoe_options.json").read_text())
        knobs = ", ".join(f"`{k}={v}`" for k, v in shipped["options"].items())
        options = (f"Committee settings shipped in `pcmoe_options.json` (applied by `pcmoe.load` unless options "
                   f"are given): {knobs}. {shipped.get('why', '')}\n\n")
    share_rows = "\n".join(f"| {layer} | {min(s):.3f} | {max(s):.3f} |" for layer, s in enumerate(shares))
    card = f"""# pcmoe-vit

pcmoe's own small vision Mixture-of-Experts: a ViT whose every MLP is a sparse MoE block
(`pcmoe/models/vit_moe.py`, model type `{cfg.model_type}`), trained here from scratch on
Fashion-MNIST. It exists so that the Parameter Committee can be measured on a vision model and on
a frame stream with temporal locality (the paper's video setting), through the same engine,
committee, store and scheduler as the language models.

## Shape and bytes

| | |
|---|---|
| input | 28 x 28 grey images, 7 x 7 tokens from a convolutional stem (two stride-2 convolutions, {cfg.stem_channels} channels), learned position embeddings, mean-pooled for the classifier |
| layers | {cfg.num_layers}, every MLP a MoE block |
| experts | {cfg.num_experts} per layer, top-{cfg.num_experts_per_tok} (`norm_topk_prob={cfg.norm_topk_prob}`), SiLU-gated, width {cfg.moe_intermediate_size} |
| hidden | {cfg.hidden_size}, {cfg.num_heads} heads |
| classes | {cfg.num_classes} |
| precision | float32 safetensors |
| weights | {sizes.full / 1e6:.2f} MB: experts {sizes.all_experts / 1e6:.2f} MB ({sizes.all_experts / sizes.full:.1%}), the rest {sizes.nonexpert / 1e6:.2f} MB |
| one expert | {sizes.expert[0] / 1e3:.1f} kB |
| parameters | {info['parameters']:,} |

## Data and licence

Fashion-MNIST (Zalando Research, 2017; MIT/Expat licence) from the Debian package
`dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist`): 60,000 training and 10,000 test
images. Training uses the training images only, with random shifts of up to {c['max_shift']} pixels
and horizontal flips; every metric below is on the test images.

## Training

    OMP_NUM_THREADS=1 python scripts/train_vision.py --work runs/vision --epochs {epochs}
    OMP_NUM_THREADS=1 python scripts/train_vision.py --work runs/vision --epochs {epochs} --export models/pcmoe-vit

AdamW (lr {c['lr']}, cosine to {c['min_lr']}, {c['warmup_steps']} warm-up steps, weight decay
{c['weight_decay']}), batch {c['batch_size']}, {epochs} epochs, label smoothing {c['label_smoothing']},
Switch load-balancing loss x {cfg.router_aux_loss_coef}, seed {c['seed']}, one torch thread.
{run}

## Metrics

| | accuracy |
|---|---|
| test set (10,000 images, full model) | {info['test_accuracy']:.4f} |
| frame stream, 2000 frames, seed 0, `full` | {stream['full']['accuracy']:.4f} |
| frame stream, same, `committee` at 50 % of expert memory | {stream['committee']['accuracy']:.4f} (hit rate {stream['committee']['hit_rate']:.3f}, {stream['committee']['swaps']} swaps) |

The frame stream (`pcmoe eval --model models/pcmoe-vit`, `pcmoe.models.vit_moe.frame_stream`)
is built from the test images: runs of 20-120 frames of one class, each frame a random image of
that class shifted by up to 2 pixels with Gaussian noise (σ 0.05), one frame per forward.

{options}Load balance on the test set (share of each layer's top-{cfg.num_experts_per_tok} choices per expert; uniform = {1 / cfg.num_experts:.3f}):

| MoE layer | smallest expert share | largest expert share |
|---|---|---|
{share_rows}

## Files

`config.json`, `model.safetensors` (per-expert tensors `<block>.experts.<e>.{{gate,up,down}}_proj.weight`),
`training_summary.json` (everything above, machine-readable).
"""
    (out / "README.md").write_text(card)


if __name__ == "__main__":
    sys.exit(main())
