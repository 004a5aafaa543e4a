"""What pcmoe needs to know about a transformers MoE family.

A Family answers: which modules are MoE blocks, where the router and experts live, how the router
chooses (with a committee mask), what one expert computes, how its weights are laid out on disk,
and how the block's output is assembled. Subclasses are small; one per HF `model_type` group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from pcmoe.checkpoint import Checkpoint, CheckpointError
from pcmoe.moe import GluKernel
from pcmoe.routing import Route, softmax_topk
from pcmoe.store import Piece


class Family:
    model_types: tuple[str, ...] = ()
    block_classes: tuple[str, ...] = ()   # class names of the MoE blocks in transformers
    router_attr = "gate"
    seq2seq = False
    # (model key fragment, disk key fragment): how the checkpoint names differ from the modules.
    disk_renames: tuple[tuple[str, str], ...] = ()
    # On-disk names of one expert's (gate, up, down) matrices.
    glu_names = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, config):
        self.config = config

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
        return GluKernel(self.config.hidden_size, self.intermediate, ACT2FN[self.config.hidden_act])

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

    # -- computation ------------------------------------------------------------------------

    def router(self, block):
        return getattr(block, self.router_attr)

    def router_logits(self, block, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.router(block).weight)                                # [T, N]

    def select(self, block, logits, mask, renorm: bool, batch_shape, k: int | None = None) -> Route:
        norm = getattr(self.config, "norm_topk_prob", True)
        return softmax_topk(logits, k or self.top_k, norm, mask, renorm, out_dtype=logits.dtype)

    # Whether select() is softmax_topk, so single tokens can be routed in Python (routing.gate_one).
    host_routing = True

    @property
    def renormalises(self) -> bool:
        """Whether the router renormalises over the chosen experts (then gating options A == B)."""
        return bool(getattr(self.config, "norm_topk_prob", True))

    def add_shared(self, block, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y

    def pack_output(self, y: torch.Tensor):
        return y
