"""Train pcmoe's default language model (resumable). See models/pcmoe-lm/README.md for the run.

  python scripts/train_lm.py --work data/lm --steps 5500 --threads 1      # train / resume
  python scripts/train_lm.py --work data/lm --export models/pcmoe-lm      # write the HF folder
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from pcmoe.training.lm import ModelShape, TrainConfig, evaluate, export, load_tokens, prepare, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("data/lm"), help="work directory (corpus, tokens, ckpt)")
    ap.add_argument("--steps", type=int, default=5500, help="total optimiser steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--no-bf16", action="store_true", help="train the matmuls in fp32 (slower on AVX-512 BF16 CPUs)")
    ap.add_argument("--export", type=Path, help="write the trained model to this folder and evaluate it")
    args = ap.parse_args()

    cfg = TrainConfig(shape=ModelShape(), seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                      max_steps=args.steps, threads=args.threads, bf16=not args.no_bf16)
    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args.work, cfg.shape.vocab_size)
    if args.export:
        info = export(args.work, args.export, cfg)
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(args.threads)
        model = AutoModelForCausalLM.from_pretrained(args.export, dtype=torch.float32)
        ppl = evaluate(model, load_tokens(args.work, "val"), cfg.seq_len, None)
        info["val_ppl"] = ppl
        info["val_ppl_mean"] = sum(ppl.values()) / len(ppl)
        info["config"] = dataclasses.asdict(cfg)
        (args.export / "training_summary.json").write_text(json.dumps(info, indent=1))
        print(json.dumps(info))
        return
    train(args.work, cfg, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    sys.exit(main())
