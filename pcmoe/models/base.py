"""What pcmoe needs to know about a MoE family: one registry entry (a Family subclass) per group
of HF `model_type`s.

A Family answers: which modules are MoE blocks, where the router and experts live, how the router
chooses (with a committee mask), what one expert computes, how its weights are laid out on disk,
how the block's output is assembled, whether the lean decoder (pcmoe.fast) runs it, and the tiny
config its tests are built from. The routing rule is bound once per block at load (`bind`), so the
controllers receive a plain `route(logits, mask)` and never call back into the block or family.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pcmoe.checkpoint import Checkpoint, CheckpointError
from pcmoe.models.activations import activation
from pcmoe.moe import GluKernel
from pcmoe.routing import Route, softmax_topk, softmax_topk_one
from pcmoe.store import Piece

# Shapes of the tiny test checkpoints: small, but with every structural feature (several MoE
# layers, top-k > 1, GQA).
TINY_COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                   max_position_embeddings=256, tie_word_embeddings=False)


@contextlib.contextmanager
def parameters_on_meta():
    """Parameters are created on the meta device (no memory); buffers stay real, so computed
    non-persistent buffers such as rotary frequencies keep their values."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@dataclass(frozen=True)
class BoundRouter:
    """A block's routing rule with its parameters bound. Dimension legend: T tokens, N experts.

    route(logits [T, N], mask [N] bool or None, batch=(B, S)) -> Route; mask None = the model's
    own routing. route_one(values [N] floats, member [N] bools or None) -> (idx, weights, probs):
    the same rule for one token in Python numbers (None where the family has no such twin)."""

    route: Callable[..., Route]
    route_one: Callable | None
    top_k: int
    renormalises: bool      # the router renormalises over the chosen experts (gating A == B)


@dataclass(frozen=True)
class BoundBlock:
    """The per-block computations around the experts, bound at load."""

    logits: Callable[[torch.Tensor], torch.Tensor]                 # x [T, H] -> [T, N]
    shared: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (x, y) -> y + shared experts
    pack: Callable[[torch.Tensor], object]                         # y [B, S, H] -> the block's output


class Family:
    model_types: tuple[str, ...] = ()
    block_classes: tuple[str, ...] = ()   # class names of the MoE blocks in the model
    router_attr = "gate"
    seq2seq = False
    lean_decoder = False                  # pcmoe.fast.FastDecoder runs it (llama-style decoders)
    qk_norm = None                        # lean decoder: None, "per_head" (Qwen3) or "projection" (OLMoE)
    # (model key fragment, disk key fragment): how the checkpoint names differ from the modules.
    disk_renames: tuple[tuple[str, str], ...] = ()
    # On-disk names of one expert's (gate, up, down) matrices.
    glu_names = ("gate_proj", "up_proj", "down_proj")
    # The tiny random checkpoint of this family's tests (pcmoe.testing); every entry needs one.
    tiny_config: dict | None = None

    def __init__(self, config):
        self.config = config

    # -- model and config -------------------------------------------------------------------

    @classmethod
    def load_config(cls, folder, config_dict: dict):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(folder)
        except Exception as e:  # a malformed config.json
            raise CheckpointError(f"cannot read {folder}/config.json: {e}") from None

    @classmethod
    def make_config(cls, **kwargs):
        """A config of this family from keyword values (the tiny test configs)."""
        from transformers import AutoConfig

        kwargs = dict(kwargs)
        return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)

    def build(self, dtype: torch.dtype):
        """The model of the config with random (or meta) parameters, in eval mode not yet set."""
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        auto = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
        return auto.from_config(self.config, dtype=dtype)

    # -- shape ------------------------------------------------------------------------------

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def top_k(self) -> int:
        return self.config.num_experts_per_tok

    @property
    def intermediate(self) -> int:
        return self.config.moe_intermediate_size

    def kernel(self):
        return GluKernel(self.config.hidden_size, self.intermediate, activation(self.config.hidden_act))

    # -- keys -------------------------------------------------------------------------------

    def disk_keys(self, model_key: str) -> list[str]:
        """Candidate checkpoint names of a module key (renamed first, then as is)."""
        for model_frag, disk_frag in self.disk_renames:
            if model_frag in model_key:
                return [model_key.replace(model_frag, disk_frag, 1), model_key]
        return [model_key]

    def expert_pieces(self, ckpt: Checkpoint, block_name: str, expert: int) -> list[Piece]:
        """Per-expert keys `<block>.experts.<e>.<gate|up|down>.weight`, or fused
        `<block>.experts.gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]` (save_original_format=False)."""
        I = self.intermediate
        gate, up, down = self.glu_names
        for prefix in self.disk_keys(block_name + "."):
            per = f"{prefix}experts.{expert}."
            if f"{per}{gate}.weight" in ckpt:
                return [Piece(ckpt[f"{per}{gate}.weight"], "gate_up", (0, I)),
                        Piece(ckpt[f"{per}{up}.weight"], "gate_up", (I, 2 * I)),
                        Piece(ckpt[f"{per}{down}.weight"], "down")]
            if f"{prefix}experts.gate_up_proj" in ckpt:
                return [Piece(ckpt[f"{prefix}experts.gate_up_proj"].slice0(expert), "gate_up"),
                        Piece(ckpt[f"{prefix}experts.down_proj"].slice0(expert), "down")]
        raise CheckpointError(f"{ckpt.folder}: no weights for expert {expert} of {block_name} "
                              f"(looked for {block_name}.experts.{expert}.{gate}.weight); the checkpoint "
                              "does not match its config.json")

    # -- computation, bound once per block ---------------------------------------------------

    def bind(self, block, linear_one=None) -> BoundBlock:
        """linear_one(x [1, H], W): a faster projection for one token (pcmoe.native), used for a
        router of the plain `x W^T` kind."""
        logits = lambda x: self.router_logits(block, x)  # noqa: E731
        if linear_one is not None and type(self).router_logits is Family.router_logits:
            weight = self.router(block).weight
            logits = lambda x: linear_one(x, weight) if x.shape[0] == 1 else F.linear(x, weight)  # noqa: E731
        return BoundBlock(logits, lambda x, y: self.add_shared(block, x, y), self.pack_output)

    def bind_router(self, block, renorm: bool, k: int | None = None) -> BoundRouter:
        """The routing rule of `block` with masked-gating arithmetic `renorm` (A: True, B: False) and
        k experts per token (None: the model's own)."""
        k = k or self.top_k
        norm = bool(getattr(self.config, "norm_topk_prob", True))

        def route(logits, mask, batch=None):
            return softmax_topk(logits, k, norm, mask, renorm, out_dtype=logits.dtype)

        def route_one(values, member=None):
            return softmax_topk_one(values, k, norm, member, renorm)

        return BoundRouter(route, route_one, k, self.renormalises)

    def router(self, block):
        return getattr(block, self.router_attr)

    def router_logits(self, block, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.router(block).weight)                                # [T, N]

    @property
    def renormalises(self) -> bool:
        """Whether the router renormalises over the chosen experts (then gating options A == B)."""
        return bool(getattr(self.config, "norm_topk_prob", True))

    def add_shared(self, block, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y

    def pack_output(self, y: torch.Tensor):
        return y
