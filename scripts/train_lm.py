"""Train pcmoe's default language model (resumable), then export it with its model card.

  python scripts/train_lm.py --work data/lm --steps 5500 --threads 1      # train / resume
  python scripts/train_lm.py --work data/lm --export models/pcmoe-lm      # ship it

The corpus comes from Debian packages (apt-get install python3.11-doc linux-doc-6.1) and the
Python standard library; see pcmoe/training/corpus.py.
"""

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from pcmoe.training.lm import (
    ModelShape,
    TrainConfig,
    evaluate,
    export,
    load_tokens,
    plot_loss,
    prepare,
    revive_dead_experts,
    train,
    write_expert_norms,
    write_heldout,
    write_profile,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("data/lm"), help="work directory (corpus, tokens, ckpt)")
    ap.add_argument("--steps", type=int, default=5500, help="total optimiser steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--aux-coef", type=float, default=0.02, help="per-layer load-balancing loss coefficient")
    ap.add_argument("--no-bf16", action="store_true", help="train the matmuls in fp32 (slower on AVX-512 BF16 CPUs)")
    ap.add_argument("--export", type=Path, help="write the trained model to this folder and evaluate it")
    ap.add_argument("--revive-dead-experts", action="store_true",
                    help="re-seed experts the router no longer chooses as copies of busy ones (edits ckpt.pt)")
    args = ap.parse_args()

    cfg = TrainConfig(shape=ModelShape(router_aux_loss_coef=args.aux_coef), seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                      max_steps=args.steps, threads=args.threads, bf16=not args.no_bf16)
    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args.work, cfg.shape.vocab_size)
    if args.export:
        ship(args, cfg)
        return
    if args.revive_dead_experts:
        done = revive_dead_experts(args.work, cfg)
        print(json.dumps(done))
        return
    train(args.work, cfg, log=lambda m: print(m, flush=True))


def ship(args, cfg) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    info = export(args.work, args.export, cfg)
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.export, dtype=torch.float32)
    ppl = evaluate(model, load_tokens(args.work, "val"), cfg.seq_len, None)
    val_tokens = {d: len(t) for d, t in load_tokens(args.work, "val").items()}
    train_tokens = {d: len(t) for d, t in load_tokens(args.work, "train").items()}
    log = [json.loads(line) for line in (args.work / "log.jsonl").read_text().splitlines()]
    ckpt_cfg = torch.load(args.work / "ckpt.pt", weights_only=False)["cfg"]
    coefs = [r.get("aux_coef") for r in log]
    info["aux_coef_schedule"] = [(r["step"], c) for i, (r, c) in enumerate(zip(log, coefs))
                                 if i == 0 or c != coefs[i - 1]]
    info["starved_experts"] = [(r["step"], r["starved_experts"]) for r in log if "starved_experts" in r]
    info["revivals"] = [{"step": r["step"], "experts": len(r["experts"])}
                        for r in torch.load(args.work / "ckpt.pt", weights_only=False).get("revivals", [])]
    info.update(val_ppl=ppl, val_ppl_mean=sum(ppl.values()) / len(ppl), val_tokens=val_tokens,
                train_tokens=train_tokens, tokens_seen=info["step"] * ckpt_cfg["batch_size"] * ckpt_cfg["seq_len"],
                config=ckpt_cfg, wall_hours=(log[-1]["time"] - log[0]["time"]) / 3600,
                cpu=_cpu(), exported=time.strftime("%Y-%m-%d"))
    info["heldout_sample"] = write_heldout(args.work, args.export)
    info["profile"] = write_profile(args.work, args.export)
    write_expert_norms(args.export)
    plot_loss(args.work, Path("docs/lm_training.png"))
    info["manifest"] = json.loads((args.work / "corpus" / "manifest.json").read_text())
    (args.export / "training_summary.json").write_text(json.dumps(info, indent=1))
    write_card(args.export, info)
    print(json.dumps({k: info[k] for k in ("step", "val_ppl", "val_ppl_mean", "tokens_seen", "wall_hours")}))


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def write_card(out: Path, info: dict) -> None:
    import pcmoe

    with pcmoe.load(out, policy="full", progress=False) as engine:
        sizes, cfg = engine.model_bytes, engine.config
    m = info["manifest"]["domains"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    c = info["config"]
    schedule = info.get("aux_coef_schedule") or [(1, c["shape"]["router_aux_loss_coef"])]
    aux = ", then ".join(f"{coef} from step {step}" for step, coef in schedule)
    starved = info.get("starved_experts") or []
    starved_text = (f" Experts under 0.5 % of their layer's choices (on the training batch at each evaluation): "
                    f"{starved[0][1]} at step {starved[0][0]}, {starved[-1][1]} at step {starved[-1][0]} "
                    f"(of {cfg.num_experts * cfg.num_hidden_layers})." if starved else "")
    revived = "".join(f" At step {r['step']}, {r['experts']} experts that the router no longer chose (under 0.5 % of a "
                      f"layer's choices) were re-seeded as perturbed copies of busy experts "
                      f"(`--revive-dead-experts`), and training resumed." for r in info.get("revivals", []))
    rows = "\n".join(
        f"| {d} | {m[d]['train']['documents']} / {m[d]['val']['documents']} | {m[d]['train']['bytes'] / 1e6:.1f} MB "
        f"| {info['train_tokens'][d] / 1e6:.2f} M | {info['val_tokens'][d] / 1e3:.0f} k | {info['val_ppl'][d]:.2f} |"
        for d in ("pydoc", "linuxdoc", "stdlib"))
    card = f"""# pcmoe-lm

A small Mixture-of-Experts language model (transformers `Qwen3MoeForCausalLM`) that pcmoe trained
itself, from scratch, on offline technical English and Python source, so that the Parameter
Committee has real routing structure to work with. It is the default model of pcmoe's demo,
benchmarks and tests. It writes plausible-looking documentation and Python; it knows nothing
useful, follows no instructions and must not be relied on for anything.

## Shape and bytes

| | |
|---|---|
| layers | {cfg.num_hidden_layers}, every one a MoE layer |
| experts | {cfg.num_experts} per layer, top-{cfg.num_experts_per_tok} (`norm_topk_prob=True`), expert width {cfg.moe_intermediate_size} |
| hidden | {cfg.hidden_size}, {cfg.num_attention_heads} heads ({cfg.num_key_value_heads} KV heads) x {cfg.head_dim} |
| vocabulary | {cfg.vocab_size} (byte-level BPE), tied input/output embeddings |
| context | trained on {c['seq_len']}-token windows; `max_position_embeddings` {cfg.max_position_embeddings} |
| precision | bfloat16 safetensors (trained with fp32 master weights, bf16 autocast) |
| weights | {sizes.full / 1e6:.1f} MB: experts {sizes.all_experts / 1e6:.1f} MB ({sizes.all_experts / sizes.full:.1%}), the rest {sizes.nonexpert / 1e6:.1f} MB |
| one expert | {sizes.expert[0] / 1e3:.0f} kB |

## Data and licences

Three domains, de-duplicated by content hash; 2 % of the *documents* of each domain held out (by a
stable hash of the document), never trained on.

| domain | documents train / held out | train text | train tokens | held-out tokens | held-out ppl |
|---|---|---|---|---|---|
{rows}

- `pydoc`: the reStructuredText sources of the Python 3.11 documentation, Debian package
  `python3.11-doc` (PSF License 2.0).
- `linuxdoc`: `Documentation/**/*.rst|txt` of Debian package `linux-doc-6.1` (GPL-2.0).
- `stdlib`: the `.py` files of the CPython 3.11 standard library (PSF License 2.0).

`eval/` holds a small sample of held-out documents ({sum(v['chars'] for v in info['heldout_sample'].values()) / 1e3:.0f} k
characters; same licences) used by `pcmoe eval` examples and `pcmoe bench`. `profile.json` is the
full model's routing on the first documents of each domain's *training* split ({info['profile']['tokens']} tokens),
used by the `static-frequency` policy and as a warm start. `pcmoe_expert_norms.json` caches the
experts' Frobenius norms.

## Tokenizer

Byte-level BPE with {cfg.vocab_size} tokens trained on the training split (`tokenizers`), special tokens
`<|endoftext|>` (end of document, also padding), `<|im_start|>`, `<|im_end|>`, and a ChatML chat
template (the model never saw chat data: chat endpoints work but answer like a document).

## Training

```bash
python scripts/train_lm.py --work data/lm --steps {c['max_steps']} --threads {c['threads']} --aux-coef {schedule[-1][1]}   # resumable
python scripts/train_lm.py --work data/lm --export models/pcmoe-lm
```

AdamW (betas 0.9/0.95, weight decay {c['weight_decay']}), peak learning rate {c['lr']} with {c['warmup_steps']} warm-up steps and cosine
decay to {c['min_lr']}, batches of {c['batch_size']} x {c['seq_len']} tokens, a Switch load-balancing loss computed per
MoE layer and averaged (`pcmoe/training/balance.py`; transformers' own `aux_loss` pools all layers, which let a first
run starve half of some layers' experts) with coefficient {aux}, gradient clipping {c['grad_clip']}, bf16 autocast, seed {c['seed']}. {info['step']} steps = {info['tokens_seen'] / 1e6:.1f} M
tokens (about one epoch).{starved_text}{revived} {info['wall_hours']:.1f} h wall clock on {c['threads']} thread(s) of an {info['cpu']} (2 vCPUs,
shared with other work during training, so the time is an upper bound). Exported {info['exported']} at commit {commit}.

![training curve](../../docs/lm_training.png)

## Metrics

Held-out perplexity (all held-out documents, non-overlapping {c['seq_len']}-token windows, fp32):
**mean over the domains {info['val_ppl_mean']:.2f}** (pydoc {info['val_ppl']['pydoc']:.2f}, linuxdoc {info['val_ppl']['linuxdoc']:.2f},
stdlib {info['val_ppl']['stdlib']:.2f}). Quality under memory budgets: see BENCHMARKS.md.

## Use

```bash
pcmoe generate --model models/pcmoe-lm --budget 50%experts --prompt "import os"
pcmoe eval --model models/pcmoe-lm --budget 50%experts --data models/pcmoe-lm/eval/heldout.txt
```

```python
from transformers import AutoModelForCausalLM, AutoTokenizer   # plain transformers works too
model = AutoModelForCausalLM.from_pretrained("models/pcmoe-lm")
```
"""
    (out / "README.md").write_text(card)


if __name__ == "__main__":
    sys.exit(main())
