"""Train pcmoe's default language model: a small Qwen3-MoE on the offline technical-text corpus.

Stages (each resumable, each writes its outputs atomically under the work directory):
  corpus     -> <work>/corpus/{train,val}_<domain>.txt        (pcmoe.training.corpus)
  tokenizer  -> <work>/tokenizer/  byte-level BPE, ChatML-style chat template
  tokens     -> <work>/tokens/{train,val}_<domain>.u16        token ids, documents joined by EOS
  train      -> <work>/ckpt.pt (model + optimiser + step), <work>/log.jsonl
  export     -> <out>/  config.json, model.safetensors (bf16), tokenizer files

The model is a stock transformers `Qwen3MoeForCausalLM`, so the checkpoint loads with plain
`from_pretrained` and converts with llama.cpp's converter.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pcmoe.training.balance import expert_shares, load_balancing_loss
from pcmoe.training.corpus import DOC_SEPARATOR, DOMAINS, write_corpus

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class ModelShape:
    vocab_size: int = 8192
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    num_experts: int = 16
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 256
    max_position_embeddings: int = 1024
    router_aux_loss_coef: float = 0.01


@dataclass
class TrainConfig:
    shape: ModelShape = field(default_factory=ModelShape)
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 200
    max_steps: int = 6000
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_tokens: int = 32768  # per domain, for the periodic estimate; export evaluates everything
    ckpt_every: int = 50
    seed: int = 0
    threads: int = 1
    # bf16 autocast for the matmuls (fp32 master weights): 1.35x faster on CPUs with AVX-512 BF16.
    bf16: bool = True
    # Sampling weight of each domain's training tokens (None = proportional to size).
    domain_weights: dict | None = None


def build_config(shape: ModelShape):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.moe_intermediate_size * shape.num_experts_per_tok,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        num_experts=shape.num_experts,
        num_experts_per_tok=shape.num_experts_per_tok,
        moe_intermediate_size=shape.moe_intermediate_size,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        router_aux_loss_coef=shape.router_aux_loss_coef,
        output_router_logits=False,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
    )


# --------------------------------------------------------------------------------------------
# Tokenizer and token files


def train_tokenizer(corpus_dir: Path, out_dir: Path, vocab_size: int):
    """Byte-level BPE on the training split of every domain."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    files = [str(corpus_dir / f"train_{d}.txt") for d in DOMAINS]
    tok.train(files, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    fast.save_pretrained(tmp)
    os.replace(tmp, out_dir) if not out_dir.exists() else None
    return fast


def encode_documents(tokenizer, text: str) -> np.ndarray:
    """Token ids of a corpus file: each document followed by EOS."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    docs = text.split(DOC_SEPARATOR)
    ids: list[int] = []
    for batch_start in range(0, len(docs), 256):
        for enc in tokenizer(docs[batch_start:batch_start + 256], add_special_tokens=False)["input_ids"]:
            ids.extend(enc)
            ids.append(eos)
    return np.asarray(ids, dtype=np.uint16)


def prepare(work: Path, vocab_size: int) -> None:
    """Corpus, tokenizer and token files (skipping whatever already exists)."""
    from transformers import AutoTokenizer

    corpus = work / "corpus"
    if not (corpus / "manifest.json").exists():
        write_corpus(corpus)
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer(corpus, tok_dir, vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    tokens = work / "tokens"
    tokens.mkdir(exist_ok=True)
    for split in ("train", "val"):
        for domain in DOMAINS:
            out = tokens / f"{split}_{domain}.u16"
            if out.exists():
                continue
            ids = encode_documents(tokenizer, (corpus / f"{split}_{domain}.txt").read_text())
            tmp = out.with_suffix(".tmp")
            ids.tofile(tmp)
            os.replace(tmp, out)


def load_tokens(work: Path, split: str) -> dict[str, np.ndarray]:
    return {d: np.memmap(work / "tokens" / f"{split}_{d}.u16", dtype=np.uint16, mode="r") for d in DOMAINS}


# --------------------------------------------------------------------------------------------
# Training


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


class Batcher:
    """Random windows of seq_len+1 tokens; the domain is drawn by weight, then a uniform offset."""

    def __init__(self, tokens: dict[str, np.ndarray], cfg: TrainConfig, rng: random.Random):
        self.tokens = {d: t for d, t in tokens.items() if len(t) > cfg.seq_len + 1}
        weights = cfg.domain_weights or {d: len(t) for d, t in self.tokens.items()}
        self.domains = list(self.tokens)
        self.weights = [weights[d] for d in self.domains]
        self.cfg, self.rng = cfg, rng

    def next(self) -> torch.Tensor:
        rows = []
        for _ in range(self.cfg.batch_size):
            d = self.rng.choices(self.domains, self.weights)[0]
            t = self.tokens[d]
            start = self.rng.randrange(0, len(t) - self.cfg.seq_len - 1)
            rows.append(torch.from_numpy(t[start:start + self.cfg.seq_len + 1].astype(np.int64)))
        return torch.stack(rows)


@torch.no_grad()
def evaluate(model, tokens: dict[str, np.ndarray], seq_len: int, max_tokens: int | None) -> dict[str, float]:
    """Per-domain perplexity over non-overlapping windows (the first max_tokens tokens, or all)."""
    model.eval()
    out = {}
    for domain, t in tokens.items():
        n = len(t) if max_tokens is None else min(len(t), max_tokens)
        nll, count = 0.0, 0
        for start in range(0, n - 1, seq_len):
            chunk = torch.from_numpy(t[start:min(start + seq_len + 1, n)].astype(np.int64))[None]
            if chunk.shape[1] < 2:
                break
            logits = model(input_ids=chunk[:, :-1]).logits.float()
            nll += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
        out[domain] = math.exp(nll / count)
    model.train()
    return out


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(work: Path, cfg: TrainConfig, log=print) -> None:
    """Train (or resume) until cfg.max_steps; checkpoints every cfg.ckpt_every steps."""
    from transformers import Qwen3MoeForCausalLM

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model_cfg = build_config(cfg.shape)
    model = Qwen3MoeForCausalLM(model_cfg)
    model.config.output_router_logits = True  # adds the load-balancing loss
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    rng = random.Random(cfg.seed)
    step = 0
    ckpt_path = work / "ckpt.pt"
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        log(f"resumed at step {step}")
    train_tokens = load_tokens(work, "train")
    val_tokens = load_tokens(work, "val")
    batcher = Batcher(train_tokens, cfg, rng)
    log_path = work / "log.jsonl"
    model.train()
    t_last, tokens_since = time.time(), 0
    while step < cfg.max_steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = batcher.next()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            out = model(input_ids=batch[:, :-1])  # no labels: we compute the CE on all seq_len targets
            ce = torch.nn.functional.cross_entropy(
                out.logits.float().reshape(-1, out.logits.shape[-1]), batch[:, 1:].reshape(-1)
            )
            # Per-layer balance (not transformers' aux_loss, which balances all layers pooled).
            aux = load_balancing_loss(out.router_logits, cfg.shape.num_experts_per_tok)
            loss = ce + cfg.shape.router_aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        tokens_since += batch.shape[0] * (batch.shape[1] - 1)
        record = {"step": step, "ce": round(ce.item(), 4), "aux": round(aux.item(), 4), "balance": "per-layer",
                  "aux_coef": cfg.shape.router_aux_loss_coef, "lr": round(lr_at(step - 1, cfg), 6),
                  "time": time.time()}
        if step % 10 == 0:
            record["tok_s"] = round(tokens_since / (time.time() - t_last), 1)
            t_last, tokens_since = time.time(), 0
            log(f"step {step}/{cfg.max_steps} ce {record['ce']:.3f} aux {record['aux']:.3f} "
                f"lr {record['lr']:.2e} {record['tok_s']} tok/s")
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            ppl = evaluate(model, val_tokens, cfg.seq_len, cfg.eval_tokens)
            record["val_ppl"] = {k: round(v, 2) for k, v in ppl.items()}
            shares = expert_shares(out.router_logits, cfg.shape.num_experts_per_tok)    # this batch, [L, N]
            record["starved_experts"] = int((shares < 0.005).sum())
            record["expert_share_range"] = [round(float(shares.min()), 4), round(float(shares.max()), 4)]
            log(f"step {step} val ppl {record['val_ppl']} experts under 0.5 % of a layer's choices: "
                f"{record['starved_experts']}")
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            _atomic_torch_save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": rng.getstate(),
                                "torch_rng": torch.get_rng_state(), "step": step, "cfg": asdict(cfg)}, ckpt_path)


def export(work: Path, out_dir: Path, cfg: TrainConfig, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Write the trained model as a Hugging Face folder (bf16 safetensors + tokenizer)."""
    from transformers import AutoTokenizer, Qwen3MoeForCausalLM

    state = torch.load(work / "ckpt.pt", weights_only=False)
    model = Qwen3MoeForCausalLM(build_config(cfg.shape))
    model.load_state_dict(state["model"])
    model.eval()
    model = model.to(dtype)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(work / "tokenizer").save_pretrained(tmp)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return {"step": state["step"]}


# --------------------------------------------------------------------------------------------
# Shipping: held-out text, routing profile, expert norms, loss curve


def write_heldout(work: Path, out_dir: Path, chars_per_domain: int = 40_000, max_doc_chars: int = 6_000) -> dict:
    """A small held-out sample (validation documents only) shipped with the model for eval and
    benchmarks: eval/<domain>.txt and eval/heldout.txt (the domains one after another, so a stream
    switches topic twice)."""
    eval_dir = out_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    sizes, all_docs = {}, []
    for domain in DOMAINS:
        docs, total = [], 0
        for doc in (work / "corpus" / f"val_{domain}.txt").read_text().split(DOC_SEPARATOR):
            if len(doc) > max_doc_chars:  # cut at a line boundary
                doc = doc[:doc.rfind("\n", 0, max_doc_chars) if "\n" in doc[:max_doc_chars] else max_doc_chars]
            if doc.strip():
                docs.append(doc)
                total += len(doc)
            if total >= chars_per_domain:
                break
        (eval_dir / f"{domain}.txt").write_text(DOC_SEPARATOR.join(docs))
        all_docs += docs
        sizes[domain] = {"documents": len(docs), "chars": total}
    (eval_dir / "heldout.txt").write_text(DOC_SEPARATOR.join(all_docs))
    return sizes


def write_profile(work: Path, out_dir: Path, docs_per_domain: int = 40, max_tokens: int = 24_000) -> dict:
    """Routing profile of the full model on *training* documents (never the held-out ones): the
    warm start of `committee` and the subset of `static-frequency`."""
    import pcmoe
    from pcmoe.evaluate import perplexity

    docs = []
    for domain in DOMAINS:
        train_docs = (work / "corpus" / f"train_{domain}.txt").read_text().split(DOC_SEPARATOR)
        docs += [d[:6000] for d in train_docs[:docs_per_domain]]
    with pcmoe.load(out_dir, policy="full", track_importance=True, progress=False) as engine:
        result = perplexity(engine, docs, max_tokens=max_tokens, progress=False)
        profile = engine.importance_profile()
    profile.update(tokens=result["tokens"], source="training split sample (first documents of each domain)")
    (out_dir / "profile.json").write_text(json.dumps(profile))
    return {"tokens": result["tokens"], "ppl": result["ppl"]}


def write_expert_norms(out_dir: Path) -> None:
    """Ship ||E_i|| beside the checkpoint so a first load does not stream every expert."""
    import pcmoe

    with pcmoe.load(out_dir, policy="full", progress=False) as engine:
        data = {"fingerprint": engine.checkpoint.fingerprint(), "norms": [n.tolist() for n in engine.expert_norms]}
    (out_dir / "pcmoe_expert_norms.json").write_text(json.dumps(data))


def plot_loss(work: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    tokens_per_step = None
    cfg_path = work / "ckpt.pt"
    if cfg_path.exists():
        cfg = torch.load(cfg_path, weights_only=False)["cfg"]
        tokens_per_step = cfg["batch_size"] * cfg["seq_len"]
    x = [r["step"] * (tokens_per_step or 1) / 1e6 for r in log]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, [math.exp(min(r["ce"], 20)) for r in log], alpha=0.3, label="train ppl (batch)")
    for domain in DOMAINS:
        pts = [(r["step"] * (tokens_per_step or 1) / 1e6, r["val_ppl"][domain]) for r in log if "val_ppl" in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"held-out {domain}")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (M)" if tokens_per_step else "step")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def revive_dead_experts(work: Path, cfg: TrainConfig, threshold: float = 0.005, sample_tokens: int = 32768,
                        seed: int = 0) -> list[dict]:
    """Give experts the router has stopped choosing a second life: each expert with under
    `threshold` of a layer's top-k choices (on a sample of training text) becomes a perturbed copy of
    the busiest expert not already used as a donor, with a perturbed copy of its router row, so the
    two split that traffic and diverge. Their optimiser state is reset. Edits ckpt.pt in place (the
    previous one is kept as ckpt.before-revive.pt) and returns what was done."""
    from transformers import Qwen3MoeForCausalLM

    path = work / "ckpt.pt"
    state = torch.load(path, weights_only=False)
    model = Qwen3MoeForCausalLM(build_config(cfg.shape))
    model.load_state_dict(state["model"])
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    tokens = load_tokens(work, "train")
    L, E, k = cfg.shape.num_hidden_layers, cfg.shape.num_experts, cfg.shape.num_experts_per_tok
    counts = torch.zeros(L, E)
    with torch.no_grad():
        for t in tokens.values():
            for _ in range(sample_tokens // len(tokens) // cfg.seq_len):
                start = int(torch.randint(0, len(t) - cfg.seq_len, (1,), generator=gen))
                x = torch.from_numpy(t[start:start + cfg.seq_len].astype(np.int64))[None]
                for layer, logits in enumerate(model(input_ids=x, output_router_logits=True).router_logits):
                    counts[layer] += torch.bincount(logits.float().topk(k, dim=-1).indices.view(-1), minlength=E)
    share = counts / counts.sum(dim=1, keepdim=True)
    names = dict(model.named_parameters())
    # Optimiser state is indexed in parameter-group order: the decayed (>= 2-D) parameters, then the rest.
    params = [p for p in model.parameters() if p.ndim >= 2] + [p for p in model.parameters() if p.ndim < 2]
    index_of = {id(p): i for i, p in enumerate(params)}
    done = []
    with torch.no_grad():
        for layer in range(L):
            dead = [e for e in range(E) if share[layer, e] < threshold]
            donors = [int(e) for e in share[layer].argsort(descending=True) if share[layer, e] >= threshold]
            prefix = f"model.layers.{layer}.mlp."
            for d, j in zip(dead, donors):
                for name in ("experts.gate_up_proj", "experts.down_proj"):
                    w = names[prefix + name]
                    w[d] = w[j] + 0.01 * w[j].std() * torch.randn(w[j].shape, generator=gen)
                router = names[prefix + "gate.weight"]
                router[d] = router[j] + 0.1 * router[j].std() * torch.randn(router[j].shape, generator=gen)
                for name in ("experts.gate_up_proj", "experts.down_proj", "gate.weight"):
                    p_state = state["opt"]["state"].get(index_of[id(names[prefix + name])])
                    if p_state:
                        p_state["exp_avg"][d] = 0
                        p_state["exp_avg_sq"][d] = 0
                done.append({"layer": layer, "expert": d, "copied_from": j, "share": float(share[layer, d])})
    state["model"] = model.state_dict()
    state.setdefault("revivals", []).append({"step": state["step"], "experts": done})
    torch.save(torch.load(path, weights_only=False), work / "ckpt.before-revive.pt")
    _atomic_torch_save(state, path)
    return done
