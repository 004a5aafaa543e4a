"""Train pcmoe's vision MoE (pcmoe.models.vit_moe) on Fashion-MNIST, resumably, on the CPU.

  train   -> <work>/ckpt.pt (model + optimiser + step), <work>/log.jsonl
  export  -> <out>/ config.json, model.safetensors (per-expert tensors), <work>/export.json

Loss: cross-entropy (label smoothing) + router_aux_loss_coef x the Switch load-balancing loss, so
every expert gets tokens. Augmentation: random shifts of up to 2 pixels and horizontal flips. Data
order and augmentation are functions of (seed, epoch, step), so a resumed run replays the same batches.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pcmoe.models.vit_moe import (
    VitMoeConfig,
    VitMoeForImageClassification,
    from_pretrained,
    load_fashion_mnist,
    save_pretrained,
    shift_images,
)
from pcmoe.training.balance import load_balancing_loss


@dataclass
class VisionTrainConfig:
    model: dict = field(default_factory=dict)  # VitMoeConfig overrides
    epochs: int = 20
    batch_size: int = 128
    lr: float = 2e-3
    min_lr: float = 2e-5
    warmup_steps: int = 300
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    max_shift: int = 2
    hflip: bool = True
    ckpt_every: int = 100        # steps
    log_every: int = 50          # steps
    seed: int = 0
    threads: int = 1
    train_limit: int | None = None  # train on the first n images only (smoke tests)
    test_limit: int | None = None   # evaluate on the first n test images only (smoke tests)
    data: str | None = None      # folder of the IDX .gz files (default: the Debian package's)


def lr_at(step: int, total: int, cfg: VisionTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def batch_at(images: np.ndarray, labels: np.ndarray, step: int, cfg: VisionTrainConfig):
    """The augmented batch of a global step: (pixels [B, 1, 28, 28] in [0, 1], labels [B])."""
    per_epoch = len(images) // cfg.batch_size
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng((cfg.seed, epoch)).permutation(len(images))
    pick = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
    rng = np.random.default_rng((cfg.seed, 1, step))
    x = images[pick]
    if cfg.max_shift:
        x = shift_images(x, *rng.integers(-cfg.max_shift, cfg.max_shift + 1, size=(2, len(pick))))
    if cfg.hflip:
        flip = rng.random(len(pick)) < 0.5
        x = np.where(flip[:, None, None], x[:, :, ::-1], x)
    pixels = torch.from_numpy(x.astype(np.float32) / 255.0)[:, None]
    return pixels, torch.from_numpy(labels[pick])


@torch.no_grad()
def evaluate(model, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> dict:
    """Test accuracy and each layer's share of routing choices per expert (load balance)."""
    was_training = model.training
    model.eval()
    correct, usage = 0, None
    for s in range(0, len(images), batch_size):
        x = torch.from_numpy(images[s:s + batch_size].astype(np.float32) / 255.0)[:, None]
        out = model(pixel_values=x, output_router_logits=True)
        correct += int((out.logits.argmax(-1).numpy() == labels[s:s + batch_size]).sum())
        k = model.config.num_experts_per_tok
        counts = torch.stack([torch.bincount(torch.topk(r, k).indices.flatten(), minlength=r.shape[-1])
                              for r in out.router_logits]).double()            # [layers, N]
        usage = counts if usage is None else usage + counts
    model.train(was_training)
    share = usage / usage.sum(dim=1, keepdim=True)
    return {"accuracy": correct / len(images), "expert_share": share.tolist(),
            "min_share": float(share.min()), "max_share": float(share.max())}


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(work: Path, cfg: VisionTrainConfig, log=print) -> dict:
    """Train (or resume) to cfg.epochs; returns {"step", "losses" (per step this call), "test"}."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    work.mkdir(parents=True, exist_ok=True)
    images, labels = load_fashion_mnist("train", cfg.data)
    if cfg.train_limit:
        images, labels = images[:cfg.train_limit], labels[:cfg.train_limit]
    test_images, test_labels = load_fashion_mnist("test", cfg.data)
    test_images, test_labels = test_images[:cfg.test_limit], test_labels[:cfg.test_limit]
    model = VitMoeForImageClassification(VitMoeConfig(**cfg.model))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
    step = 0
    ckpt_path = work / "ckpt.pt"
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log(f"resumed at step {step}")
    per_epoch = len(images) // cfg.batch_size
    total = cfg.epochs * per_epoch
    coef = model.config.router_aux_loss_coef
    model.train()
    losses, t_last, t_start = [], time.time(), time.time()
    result = {}
    while step < total:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, cfg)
        x, y = batch_at(images, labels, step, cfg)
        out = model(pixel_values=x, output_router_logits=True)
        ce = F.cross_entropy(out.logits, y, label_smoothing=cfg.label_smoothing)
        aux = load_balancing_loss(out.router_logits, model.config.num_experts_per_tok)
        loss = ce + coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        losses.append(ce.item())
        record = {"step": step, "epoch": round(step / per_epoch, 3), "ce": round(ce.item(), 4),
                  "aux": round(aux.item(), 4), "lr": round(lr_at(step - 1, total, cfg), 6), "time": time.time()}
        if step % cfg.log_every == 0:
            rate = cfg.log_every * cfg.batch_size / (time.time() - t_last)
            t_last = time.time()
            log(f"step {step}/{total} epoch {record['epoch']:.2f} ce {record['ce']:.3f} aux {record['aux']:.3f} "
                f"lr {record['lr']:.2e} {rate:.0f} img/s")
        if step % per_epoch == 0 or step == total:
            result = evaluate(model, test_images, test_labels)
            record["test_accuracy"] = result["accuracy"]
            record["expert_share_range"] = [round(result["min_share"], 4), round(result["max_share"], 4)]
            log(f"epoch {step // per_epoch} test accuracy {result['accuracy']:.4f} expert share "
                f"{result['min_share']:.3f}..{result['max_share']:.3f} ({time.time() - t_start:.0f} s this run)")
        with open(work / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if step % cfg.ckpt_every == 0 or step == total:
            _atomic_torch_save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                                "cfg": asdict(cfg)}, ckpt_path)
    return {"step": step, "losses": losses, "test": result}


def export(work: Path, out_dir: Path, cfg: VisionTrainConfig) -> dict:
    """Write the trained model as a pcmoe checkpoint folder (fp32) and evaluate the written files."""
    state = torch.load(work / "ckpt.pt", weights_only=False)
    model = VitMoeForImageClassification(VitMoeConfig(**cfg.model))
    model.load_state_dict(state["model"])
    save_pretrained(model.eval(), out_dir)
    info = measure(out_dir, cfg) | {"step": state["step"]}
    (work / "export.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def measure(out_dir: Path, cfg: VisionTrainConfig) -> dict:
    """Test accuracy, expert shares and sizes of a written model folder."""
    reloaded = from_pretrained(out_dir)
    test = evaluate(reloaded, *load_fashion_mnist("test", cfg.data))
    nbytes = {"experts": 0, "rest": 0}
    for key, p in reloaded.state_dict().items():
        nbytes["experts" if ".experts." in key else "rest"] += p.numel() * p.element_size()
    return {"test_accuracy": test["accuracy"], "expert_share": test["expert_share"],
            "parameters": sum(p.numel() for p in reloaded.parameters()), "weight_bytes": nbytes,
            "file_bytes": (out_dir / "model.safetensors").stat().st_size, "config": asdict(cfg)}
