"""Tiny random checkpoints of every registered family, for tests and for synthetic benchmarks.

`make_checkpoint("qwen3_moe", path)` builds the model from the family's tiny config with seeded
random weights and writes it with `save_pretrained`, i.e. in the on-disk layout a real Hugging Face
checkpoint of that family has. `generate_with_budget_changes` drives live budget changes in tests.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pcmoe.models import REGISTRY
from pcmoe.models.vit_moe import VitMoeFamily

# The tiny configs live in the registry (Family.tiny_config): one per registered family.
FAMILIES = tuple(mt for mt, cls in REGISTRY.items() if cls is not VitMoeFamily)   # the transformers families
ALL_FAMILIES = tuple(REGISTRY)


def tiny_config(family: str, **overrides):
    cls = REGISTRY[family]
    if cls.tiny_config is None:
        raise ValueError(f"registered family {family} has no tiny_config")
    return cls.make_config(**{**cls.tiny_config, **overrides})


def build_model(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A model of the config with seeded random weights (router weights made larger than the
    default init so that routing is not near-uniform)."""
    torch.manual_seed(seed)
    model = REGISTRY[config.model_type](config).build(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight", "router.classifier.weight")):
                p.normal_(0, 0.5)
            elif name.endswith("e_score_correction_bias"):
                p.normal_(0, 0.1)
    model.eval()
    return model


def make_checkpoint(family: str, path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """Write a tiny random checkpoint of `family` to `path`; returns the in-memory model."""
    model = build_model(tiny_config(family, **overrides), seed=seed, dtype=dtype)
    if REGISTRY[family] is VitMoeFamily:
        from pcmoe.models.vit_moe import save_pretrained

        save_pretrained(model, path)
    else:
        model.save_pretrained(path)
    return model


def make_tokenizer(path: Path, vocab_size: int = 300):
    """A small byte-level BPE tokenizer (with a chat template) saved into `path`. Pair it with a
    checkpoint of the same vocabulary: make_checkpoint(family, path, vocab_size=len(tokenizer))."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pcmoe.training.lm import CHAT_TEMPLATE, EOS, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    sample = ["the quick brown fox jumps over the lazy dog", "def main():\n    return 0", "hello world"] * 20
    tok.train_from_iterator(sample, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def generate_with_budget_changes(engine, changes: dict, tokens: int, prompt=(5, 6, 7, 8)):
    """Greedy tokens; before step i, engine.set_budget(changes[i]). Returns the tokens and the
    engine's stats after each step (by step index)."""
    import contextlib

    out, seen = [], {}
    steps = engine.generate(list(prompt), max_new_tokens=tokens, temperature=0, stop_on_eos=False)
    with contextlib.closing(steps):
        for step in steps:
            out.append(step.token_id)
            if step.index in changes:
                engine.set_budget(changes[step.index])
            seen[step.index] = engine.stats()
    return out, seen
