"""The supported transformers MoE families (each differs from `Family` in a few lines)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pcmoe.checkpoint import CheckpointError
from pcmoe.models.activations import activation
from pcmoe.models.base import TINY_COMMON, BoundRouter, Family
from pcmoe.moe import GptOssKernel, MlpKernel
from pcmoe.routing import (
    Route,
    sigmoid_group_topk,
    softmax_topk,
    softmax_topk_one,
    sparsemixer_top2,
    switch_top1,
    topk_softmax,
)
from pcmoe.store import Piece


class LocalExperts(Family):
    """Configs that count `num_local_experts` of `intermediate_size`, whose routers renormalise
    over the chosen experts (Mixtral, PhiMoE, gpt-oss, Granite)."""

    @property
    def num_experts(self):
        return self.config.num_local_experts

    @property
    def intermediate(self):
        return self.config.intermediate_size

    @property
    def renormalises(self):
        return True


class Qwen3Moe(Family):
    model_types = ("qwen3_moe",)
    block_classes = ("Qwen3MoeSparseMoeBlock",)
    lean_decoder = True
    qk_norm = "per_head"
    tiny_config = dict(TINY_COMMON, model_type="qwen3_moe", num_hidden_layers=2, intermediate_size=64,
                       moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                       head_dim=16)


class Olmoe(Family):
    model_types = ("olmoe",)
    block_classes = ("OlmoeSparseMoeBlock",)
    lean_decoder = True
    qk_norm = "projection"
    tiny_config = dict(TINY_COMMON, model_type="olmoe", num_hidden_layers=2, intermediate_size=32, num_experts=8,
                       num_experts_per_tok=2, num_key_value_heads=4, norm_topk_prob=False)

    @property
    def intermediate(self):
        return self.config.intermediate_size


class Qwen2Moe(Family):
    """Qwen2-MoE: a sigmoid-gated shared expert that is always resident."""

    model_types = ("qwen2_moe",)
    block_classes = ("Qwen2MoeSparseMoeBlock",)
    lean_decoder = True
    tiny_config = dict(TINY_COMMON, model_type="qwen2_moe", num_hidden_layers=2, intermediate_size=64,
                       moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
                       num_experts_per_tok=2, norm_topk_prob=False)

    def add_shared(self, block, x, y):
        return y + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)


class Mixtral(LocalExperts):
    model_types = ("mixtral",)
    block_classes = ("MixtralSparseMoeBlock",)
    lean_decoder = True
    disk_renames = ((".mlp.", ".block_sparse_moe."),)
    glu_names = ("w1", "w3", "w2")
    tiny_config = dict(TINY_COMMON, model_type="mixtral", num_hidden_layers=2, intermediate_size=32,
                       num_local_experts=8, num_experts_per_tok=2)


    def bind_router(self, block, renorm, k=None):
        k = k or self.top_k

        def route(logits, mask, batch=None):
            return softmax_topk(logits, k, True, mask, renorm)

        def route_one(values, member=None):
            return softmax_topk_one(values, k, True, member, renorm)

        return BoundRouter(route, route_one, k, True)


class Phimoe(Mixtral):
    """PhiMoE: Mixtral layout, sparsemixer top-2 routing; the router is `mlp.router` in memory
    and `block_sparse_moe.gate` on disk."""

    model_types = ("phimoe",)
    block_classes = ("PhimoeSparseMoeBlock",)
    lean_decoder = False  # sparsemixer routing and its own attention: the transformers forward
    router_attr = "router"
    disk_renames = ((".mlp.router.", ".block_sparse_moe.gate."), (".mlp.", ".block_sparse_moe."))
    tiny_config = dict(TINY_COMMON, model_type="phimoe", num_hidden_layers=2, intermediate_size=32,
                       num_local_experts=8, num_experts_per_tok=2)

    def bind_router(self, block, renorm, k=None):
        jitter = self.config.router_jitter_noise

        def route(logits, mask, batch=None):
            r = sparsemixer_top2(logits, jitter, mask)
            if k == 1:  # topk-reduce: keep the first choice with its own weight
                r.idx, r.weights = r.idx[:, :1], r.weights[:, :1]
            return r

        return BoundRouter(route, None, k or self.top_k, True)


class DeepseekV3(Family):
    """DeepSeek-V3: sigmoid router with selection bias and group-limited top-k, a scaling factor,
    shared experts (always resident), dense first layers."""

    model_types = ("deepseek_v3",)
    block_classes = ("DeepseekV3MoE",)
    tiny_config = dict(TINY_COMMON, model_type="deepseek_v3", num_hidden_layers=3, intermediate_size=64,
                       moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                       topk_group=1, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                       q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                       routed_scaling_factor=2.5, norm_topk_prob=True)

    @property
    def num_experts(self):
        return self.config.n_routed_experts

    def router_logits(self, block, x):
        return F.linear(x.float(), block.gate.weight.float())

    def bind_router(self, block, renorm, k=None):
        c, bias, k = self.config, block.gate.e_score_correction_bias, k or self.top_k

        def route(logits, mask, batch=None):
            return sigmoid_group_topk(logits, bias, k, c.n_group, c.topk_group, c.norm_topk_prob,
                                      c.routed_scaling_factor, mask)

        return BoundRouter(route, None, k, self.renormalises)

    def add_shared(self, block, x, y):
        return y + block.shared_experts(x)


class GptOss(LocalExperts):
    """gpt-oss: experts fused on disk ([E, H, 2I] etc., read one slice per expert), router with a
    bias, softmax over the top-k logits, clamped SwiGLU with biases."""

    model_types = ("gpt_oss",)
    block_classes = ("GptOssMLP",)
    router_attr = "router"
    tiny_config = dict(TINY_COMMON, model_type="gpt_oss", num_hidden_layers=2, intermediate_size=32,
                       num_local_experts=8, num_experts_per_tok=2, head_dim=16, sliding_window=16,
                       layer_types=["sliding_attention", "full_attention"])


    def kernel(self):
        return GptOssKernel(self.config.hidden_size, self.intermediate, self.config.swiglu_alpha,
                            self.config.swiglu_limit)

    def expert_pieces(self, ckpt, block_name, expert):
        pre = f"{block_name}.experts."
        names = {"gate_up": "gate_up_proj", "gate_up_bias": "gate_up_proj_bias", "down": "down_proj",
                 "down_bias": "down_proj_bias"}
        missing = [n for n in names.values() if pre + n not in ckpt]
        if missing:
            raise CheckpointError(f"{ckpt.folder}: {pre}{missing[0]} is missing (gpt-oss MXFP4 checkpoints "
                                  "are not supported; dequantise to bf16 first)")
        return [Piece(ckpt[pre + n].slice0(expert), dest) for dest, n in names.items()]

    def router_logits(self, block, x):
        return F.linear(x, block.router.weight, block.router.bias)

    def bind_router(self, block, renorm, k=None):
        k = k or self.top_k
        return BoundRouter(lambda logits, mask, batch=None: topk_softmax(logits, k, mask), None, k, True)

    def pack_output(self, y):
        return y, None  # the decoder layer discards the router scores


class SwitchTransformers(Family):
    """Switch Transformers (encoder-decoder, T5): top-1 routing with expert capacity, ModuleDict
    experts `expert_<e>.{wi,wo}`; routing in float32."""

    model_types = ("switch_transformers",)
    block_classes = ("SwitchTransformersSparseMLP",)
    router_attr = "router"
    seq2seq = True
    tiny_config = dict(model_type="switch_transformers", vocab_size=128, d_model=64, d_kv=16, d_ff=48,
                       num_layers=2, num_decoder_layers=2, num_heads=4, num_experts=8, encoder_sparse_step=1,
                       decoder_sparse_step=2, expert_capacity=64, decoder_start_token_id=0, pad_token_id=0,
                       eos_token_id=1)

    @property
    def top_k(self):
        return 1

    @property
    def intermediate(self):
        return self.config.d_ff

    @property
    def renormalises(self):
        return False

    def kernel(self):
        return MlpKernel(self.config.d_model, self.intermediate, activation(self.config.dense_act_fn))

    def expert_pieces(self, ckpt, block_name, expert):
        pre = f"{block_name}.experts.expert_{expert}."
        if pre + "wi.weight" not in ckpt:
            raise CheckpointError(f"{ckpt.folder}: {pre}wi.weight is missing; the checkpoint does not match "
                                  "its config.json")
        return [Piece(ckpt[pre + "wi.weight"], "wi"), Piece(ckpt[pre + "wo.weight"], "wo")]

    def router_logits(self, block, x):
        classifier = block.router.classifier
        bias = None if classifier.bias is None else classifier.bias.float()
        return F.linear(x.float(), classifier.weight.float(), bias)

    def bind_router(self, block, renorm, k=None):
        capacity = block.router.expert_capacity

        def route(logits, mask, batch=None):
            return switch_top1(logits, batch or (1, logits.shape[0]), capacity, mask, renorm)

        return BoundRouter(route, None, 1, False)


class GraniteMoe(LocalExperts):
    """IBM Granite 3.x MoE: experts fused on disk (`input_linear` [E, 2I, H], `output_linear`
    [E, H, I]), router `router.layer` on disk, top-k of float32 logits then a softmax over the k;
    embedding / residual / attention / logits multipliers stay in the transformers forward."""

    model_types = ("granitemoe",)
    block_classes = ("GraniteMoeMoE",)
    router_attr = "router"
    disk_renames = ((".block_sparse_moe.router.weight", ".block_sparse_moe.router.layer.weight"),)
    tiny_config = dict(TINY_COMMON, model_type="granitemoe", num_hidden_layers=2, intermediate_size=32,
                       num_local_experts=8, num_experts_per_tok=2, embedding_multiplier=4.0,
                       residual_multiplier=0.5, attention_multiplier=0.125, logits_scaling=2.0,
                       tie_word_embeddings=True)


    def expert_pieces(self, ckpt, block_name, expert):
        for gate_up, down in (("input_linear.weight", "output_linear.weight"), ("experts.gate_up_proj",
                                                                                 "experts.down_proj")):
            if f"{block_name}.{gate_up}" in ckpt:
                return [Piece(ckpt[f"{block_name}.{gate_up}"].slice0(expert), "gate_up"),
                        Piece(ckpt[f"{block_name}.{down}"].slice0(expert), "down")]
        raise CheckpointError(f"{ckpt.folder}: no weights for the experts of {block_name} (looked for "
                              f"{block_name}.input_linear.weight); the checkpoint does not match its config.json")

    def router_logits(self, block, x):
        return F.linear(x, block.router.weight).float()

    def bind_router(self, block, renorm, k=None):
        k = k or self.top_k

        def route(logits, mask, batch=None):
            r = topk_softmax(logits, k, mask)
            return Route(r.idx, r.weights.to(block.router.weight.dtype), r.gates)

        return BoundRouter(route, None, k, True)


TRANSFORMERS_FAMILIES: dict[str, type[Family]] = {
    mt: cls for cls in (Qwen3Moe, Qwen2Moe, Olmoe, Mixtral, Phimoe, DeepseekV3, GptOss, SwitchTransformers, GraniteMoe)
    for mt in cls.model_types
}
