"""A lean module skeleton for the families the lean decoder runs (Qwen3-MoE, Qwen2-MoE, Mixtral,
OLMoE), built from config.json without transformers' modeling code.

Serving through pcmoe.fast needs only the weights in modules that carry the same names as the
transformers model (so the checkpoint's keys, the loader and CommitteeMoE apply unchanged):
embed_tokens, per layer the attention projections and norms, the router and shared experts of each
MoE block, dense MLPs, the final norm, rotary frequencies and the LM head. Importing and building
the transformers model class costs ~30-80 MB of resident memory that serving never uses.

The transformers model stays the tested twin: calling the skeleton (`model(input_ids=...)`) or
asking it for anything it does not have (e.g. `.generate`) builds the transformers model once, on
the meta device, and moves the very same tensors and CommitteeMoE blocks into it, so both forwards
read the same numbers.

Dimension legend: T tokens, H hidden, D head dim, Hq / Hkv query / KV heads, N experts, I width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pcmoe.models.activations import activation
from pcmoe.models.base import parameters_on_meta


def lean_supported(config) -> str | None:
    """None where the skeleton reproduces the transformers model of `config`, else why not."""
    types = getattr(config, "layer_types", None) or ["full_attention"]
    if any(t != "full_attention" for t in types):
        return "sliding-window layers"
    if getattr(config, "use_sliding_window", None) is not False and getattr(config, "sliding_window", None):
        return "a sliding window"
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default" or "rope_theta" not in rope:
        return f"rope type {rope.get('rope_type')!r}"
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        return f"activation {config.hidden_act!r}"
    return None


def _weight(*shape: int) -> nn.Parameter:
    """An uninitialised parameter on the default device (meta while the loader builds): no init
    op runs, because the first init op on a meta tensor imports torch's decompositions and sympy
    (~75 MB resident)."""
    return nn.Parameter(torch.empty(shape), requires_grad=False)


class Linear(nn.Module):
    """x W^T + b with W [out, in], as nn.Linear computes it (without its init)."""

    def __init__(self, inputs: int, outputs: int, bias: bool):
        super().__init__()
        self.weight = _weight(outputs, inputs)
        self.bias = _weight(outputs) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.weight = _weight(vocab, hidden)      # [V, H]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    """transformers' RMSNorm of these families (float32 statistics, weight applied after rounding)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = _weight(size)
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class Rotary(nn.Module):
    """Default RoPE frequencies (a non-persistent float32 buffer) and cos/sin as transformers makes them."""

    def __init__(self, config, head_dim: int):
        super().__init__()
        base = config.rope_parameters["rope_theta"]
        steps = torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu")
        inv_freq = 1.0 / (base ** (steps / head_dim))                                    # [D/2], real memory
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_scaling = 1.0

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        freqs = position_ids[..., None].float() * self.inv_freq.to(dtype=torch.float)   # [1, n, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                                         # [1, n, D]
        return ((emb.cos() * self.attention_scaling).to(x.dtype),
                (emb.sin() * self.attention_scaling).to(x.dtype))


class GluMlp(nn.Module):
    """A dense SwiGLU MLP (dense layers, Qwen2-MoE's shared expert)."""

    def __init__(self, hidden: int, width: int, act):
        super().__init__()
        self.gate_proj = Linear(hidden, width, bias=False)
        self.up_proj = Linear(hidden, width, bias=False)
        self.down_proj = Linear(width, hidden, bias=False)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, experts: int, hidden: int):
        super().__init__()
        self.weight = _weight(experts, hidden)   # [N, H]


class SparseBlock(nn.Module):
    """The children of a transformers MoE block that CommitteeMoE keeps (the experts are its slot
    bank, read from disk by the loader; `experts` is an empty placeholder)."""

    def __init__(self, config, family):
        super().__init__()
        H = config.hidden_size
        self.gate = Router(family.num_experts, H)
        self.experts = nn.Module()
        if family.model_types[0] == "qwen2_moe":
            self.shared_expert = GluMlp(H, config.shared_expert_intermediate_size, activation(config.hidden_act))
            self.shared_expert_gate = Linear(H, 1, bias=False)


class Attention(nn.Module):
    def __init__(self, config, family, head_dim: int):
        super().__init__()
        H, D = config.hidden_size, head_dim
        Hq, Hkv = config.num_attention_heads, config.num_key_value_heads
        model_type = family.model_types[0]
        if model_type == "qwen2_moe":
            qkv_bias, o_bias = bool(config.qkv_bias), False
        elif model_type == "mixtral":
            qkv_bias = o_bias = False
        else:
            qkv_bias = o_bias = bool(getattr(config, "attention_bias", False))
        self.q_proj = Linear(H, Hq * D, bias=qkv_bias)
        self.k_proj = Linear(H, Hkv * D, bias=qkv_bias)
        self.v_proj = Linear(H, Hkv * D, bias=qkv_bias)
        self.o_proj = Linear(Hq * D, H, bias=o_bias)
        eps = config.rms_norm_eps
        if family.qk_norm == "per_head":          # Qwen3: over each head's D
            self.q_norm, self.k_norm = RMSNorm(D, eps), RMSNorm(D, eps)
        elif family.qk_norm == "projection":      # OLMoE: over the whole projection
            self.q_norm = RMSNorm(H, eps)
            self.k_norm = RMSNorm(H // Hq * Hkv, eps)
        self.scaling = D ** -0.5


class DecoderLayer(nn.Module):
    def __init__(self, config, family, index: int, head_dim: int):
        super().__init__()
        self.self_attn = Attention(config, family, head_dim)
        if _is_sparse(config, index):
            self.mlp = SparseBlock(config, family)
        else:
            self.mlp = GluMlp(config.hidden_size, config.intermediate_size, activation(config.hidden_act))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def _is_sparse(config, index: int) -> bool:
    """transformers' rule for which decoder layers have a MoE block (Qwen: mlp_only_layers and
    decoder_sparse_step; Mixtral and OLMoE: every layer)."""
    if index in (getattr(config, "mlp_only_layers", None) or []):
        return False
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (index + 1) % step == 0


class Backbone(nn.Module):
    def __init__(self, config, family, head_dim: int):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, family, i, head_dim)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Rotary(config, head_dim)


class LeanCausalLM(nn.Module):
    """The module tree of a transformers *ForCausalLM of a lean family, weights only, parameters on
    `device` (meta: the loader fills them from the checkpoint). `family` is the registry entry
    (pcmoe.models.Family) bound to `config`."""

    def __init__(self, config, family, dtype: torch.dtype, device: str = "meta"):
        super().__init__()
        self.config = config
        self._family = family
        self._twin = None
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # parameters at the weights' dtype, as from_config(dtype=...) makes them
        try:
            # Parameters are made on the meta device, never in memory: building the modules on the
            # CPU first and moving them costs ~70 MB of freed-but-kept heap on the shipped LM.
            with torch.device(device):  # a scoped default (set_default_device would leave a mode on every op)
                self.model = Backbone(config, family, head_dim)
                self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        finally:
            torch.set_default_dtype(previous)

    # -- what the loader asks of a transformers model ------------------------------------------------

    def get_expanded_tied_weights_keys(self, all_submodels: bool = True) -> dict:
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.config.tie_word_embeddings else {}

    def tie_weights(self, missing_keys=None, recompute_mapping: bool = True) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # -- the transformers twin -------------------------------------------------------------------------

    def transformers_model(self):
        """The transformers model holding this skeleton's tensors and blocks (built once)."""
        if self._twin is None:
            self._twin = _transplant(self)
        return self._twin

    def forward(self, *args, **kwargs):
        return self.transformers_model()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            return getattr(self.transformers_model(), name)


def _transplant(lean: LeanCausalLM):
    """Build the transformers model on the meta device and give it the skeleton's tensors: each MoE
    block is the skeleton's module (a CommitteeMoE after loading); every other parameter is the
    skeleton's Parameter object under the same name (so later in-place changes are shared)."""
    family = lean._family
    from pcmoe.models.config import LeanConfig

    if isinstance(family.config, LeanConfig):  # the twin needs transformers' config
        family = type(family)(family.config.transformers())
    with parameters_on_meta():
        twin = family.build(lean.model.embed_tokens.weight.dtype)
    twin.eval()
    blocks = [name for name, m in lean.named_modules() if _is_block(m)]
    for name in blocks:
        parent, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(parent), attr, lean.get_submodule(name))
    inside = tuple(name + "." for name in blocks)
    for name, param in lean.named_parameters(remove_duplicate=False):
        if not name.startswith(inside):
            parent, _, attr = name.rpartition(".")
            twin.get_submodule(parent)._parameters[attr] = param
    leftover = [n for n, p in twin.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise RuntimeError(f"the transformers twin kept a meta tensor {leftover[0]}")
    return twin


def _is_block(module) -> bool:
    return isinstance(module, SparseBlock) or type(module).__name__ == "CommitteeMoE"
