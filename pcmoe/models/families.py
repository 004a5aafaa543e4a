"""The supported transformers MoE families (each differs from `Family` in a few lines)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from pcmoe.checkpoint import CheckpointError
from pcmoe.models.base import Family
from pcmoe.moe import GptOssKernel, MlpKernel
from pcmoe.routing import sigmoid_group_topk, softmax_topk, sparsemixer_top2, switch_top1, topk_softmax
from pcmoe.store import Piece


class Qwen3Moe(Family):
    model_types = ("qwen3_moe",)
    block_classes = ("Qwen3MoeSparseMoeBlock",)


class Olmoe(Family):
    model_types = ("olmoe",)
    block_classes = ("OlmoeSparseMoeBlock",)

    @property
    def intermediate(self):
        return self.config.intermediate_size


class Qwen2Moe(Family):
    """Qwen2-MoE: a sigmoid-gated shared expert that is always resident."""

    model_types = ("qwen2_moe",)
    block_classes = ("Qwen2MoeSparseMoeBlock",)

    def add_shared(self, block, x, y):
        return y + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)


class Mixtral(Family):
    model_types = ("mixtral",)
    block_classes = ("MixtralSparseMoeBlock",)
    disk_renames = ((".mlp.", ".block_sparse_moe."),)
    glu_names = ("w1", "w3", "w2")

    @property
    def num_experts(self):
        return self.config.num_local_experts

    @property
    def intermediate(self):
        return self.config.intermediate_size

    @property
    def renormalises(self):
        return True

    def select(self, block, logits, mask, renorm, batch_shape, k=None):
        return softmax_topk(logits, k or self.top_k, True, mask, renorm)


class Phimoe(Mixtral):
    """PhiMoE: Mixtral layout, sparsemixer top-2 routing; the router is `mlp.router` in memory
    and `block_sparse_moe.gate` on disk."""

    host_routing = False
    model_types = ("phimoe",)
    block_classes = ("PhimoeSparseMoeBlock",)
    router_attr = "router"
    disk_renames = ((".mlp.router.", ".block_sparse_moe.gate."), (".mlp.", ".block_sparse_moe."))

    def select(self, block, logits, mask, renorm, batch_shape, k=None):
        route = sparsemixer_top2(logits, self.config.router_jitter_noise, mask)
        if k == 1:  # topk-reduce: keep the first choice with its own weight
            route.idx, route.weights = route.idx[:, :1], route.weights[:, :1]
        return route


class DeepseekV3(Family):
    """DeepSeek-V3: sigmoid router with selection bias and group-limited top-k, a scaling factor,
    shared experts (always resident), dense first layers."""

    host_routing = False
    model_types = ("deepseek_v3",)
    block_classes = ("DeepseekV3MoE",)

    @property
    def num_experts(self):
        return self.config.n_routed_experts

    def router_logits(self, block, x):
        return F.linear(x.float(), block.gate.weight.float())

    def select(self, block, logits, mask, renorm, batch_shape, k=None):
        c = self.config
        return sigmoid_group_topk(logits, block.gate.e_score_correction_bias, k or self.top_k, c.n_group,
                                  c.topk_group, c.norm_topk_prob, c.routed_scaling_factor, mask)

    def add_shared(self, block, x, y):
        return y + block.shared_experts(x)


class GptOss(Family):
    """gpt-oss: experts fused on disk ([E, H, 2I] etc., read one slice per expert), router with a
    bias, softmax over the top-k logits, clamped SwiGLU with biases."""

    host_routing = False
    model_types = ("gpt_oss",)
    block_classes = ("GptOssMLP",)
    router_attr = "router"

    @property
    def num_experts(self):
        return self.config.num_local_experts

    @property
    def intermediate(self):
        return self.config.intermediate_size

    @property
    def renormalises(self):
        return True

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

    def select(self, block, logits, mask, renorm, batch_shape, k=None):
        return topk_softmax(logits, k or self.top_k, mask)

    def pack_output(self, y):
        return y, None  # the decoder layer discards the router scores


class SwitchTransformers(Family):
    """Switch Transformers (encoder-decoder, T5): top-1 routing with expert capacity, ModuleDict
    experts `expert_<e>.{wi,wo}`; routing in float32."""

    host_routing = False
    model_types = ("switch_transformers",)
    block_classes = ("SwitchTransformersSparseMLP",)
    router_attr = "router"
    seq2seq = True

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
        return MlpKernel(self.config.d_model, self.intermediate, ACT2FN[self.config.dense_act_fn])

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

    def select(self, block, logits, mask, renorm, batch_shape, k=None):
        return switch_top1(logits, batch_shape, block.router.expert_capacity, mask, renorm)


FAMILIES: dict[str, type[Family]] = {
    mt: cls for cls in (Qwen3Moe, Qwen2Moe, Olmoe, Mixtral, Phimoe, DeepseekV3, GptOss, SwitchTransformers)
    for mt in cls.model_types
}
