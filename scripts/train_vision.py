"""Train pcmoe's vision MoE on Fashion-MNIST (resumable). See models/pcmoe-vit/README.md for the run.

  OMP_NUM_THREADS=1 python scripts/train_vision.py --work runs/vision --epochs 20     # train / resume
  OMP_NUM_THREADS=1 python scripts/train_vision.py --work runs/vision --epochs 20 --export models/pcmoe-vit
"""

import argparse
import json
import sys
from pathlib import Path

from pcmoe.training.vision import VisionTrainConfig, export, train


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
    args = ap.parse_args()

    cfg = VisionTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, threads=args.threads,
                            seed=args.seed, data=args.data)
    if args.export:
        info = export(args.work, args.export, cfg)
        print(json.dumps({k: v for k, v in info.items() if k != "expert_share"}))
        return
    train(args.work, cfg, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    sys.exit(main())
