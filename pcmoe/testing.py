"""Tiny random checkpoints of every supported family, for tests and for synthetic benchmarks.

`make_checkpoint("qwen3_moe", path)` builds the transformers model from a small config with seeded
random weights and writes it with `save_pretrained`, i.e. in the on-disk layout a real Hugging Face
checkpoint of that family has.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Shapes are small but keep every structural feature: several MoE layers, top-k > 1 (Switch: 1),
# shared experts, dense first layers (DeepSeek), router bias (gpt-oss), GQA.
_COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
               max_position_embeddings=256, tie_word_embeddings=False)

TINY_CONFIGS: dict[str, dict] = {
    "mixtral": dict(_COMMON, model_type="mixtral", num_hidden_layers=2, intermediate_size=32,
                    num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(_COMMON, model_type="qwen2_moe", num_hidden_layers=2, intermediate_size=64,
                      moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=False),
    "qwen3_moe": dict(_COMMON, model_type="qwen3_moe", num_hidden_layers=2, intermediate_size=64,
                      moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                      head_dim=16),
    "olmoe": dict(_COMMON, model_type="olmoe", num_hidden_layers=2, intermediate_size=32, num_experts=8,
                  num_experts_per_tok=2, num_key_value_heads=4, norm_topk_prob=False),
    "deepseek_v3": dict(_COMMON, model_type="deepseek_v3", num_hidden_layers=3, intermediate_size=64,
                        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                        topk_group=1, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                        q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                        routed_scaling_factor=2.5, norm_topk_prob=True),
    "phimoe": dict(_COMMON, model_type="phimoe", num_hidden_layers=2, intermediate_size=32,
                   num_local_experts=8, num_experts_per_tok=2),
    "gpt_oss": dict(_COMMON, model_type="gpt_oss", num_hidden_layers=2, intermediate_size=32,
                    num_local_experts=8, num_experts_per_tok=2, head_dim=16, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"]),
    "switch_transformers": dict(model_type="switch_transformers", vocab_size=128, d_model=64, d_kv=16,
                                d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4, num_experts=8,
                                encoder_sparse_step=1, decoder_sparse_step=2, expert_capacity=64,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
}

FAMILIES = tuple(TINY_CONFIGS)


def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    kwargs = dict(TINY_CONFIGS[family])
    kwargs.update(overrides)
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(model_type, **kwargs)


def build_model(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A transformers model of the config with seeded random weights (router weights made larger
    than the default init so that routing is not near-uniform)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if config.model_type == "switch_transformers" else AutoModelForCausalLM
    model = auto.from_config(config, dtype=dtype)
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
