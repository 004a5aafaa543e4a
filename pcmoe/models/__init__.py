"""The family registry: HF `model_type` -> the Family that carries everything pcmoe knows about it.

Every entry must have a tiny test config (`Family.tiny_config`); tests/test_registry.py fails for
an entry that has none or whose tiny checkpoint does not build and load.
"""

from __future__ import annotations

from pcmoe.checkpoint import CheckpointError
from pcmoe.models.base import BoundBlock, BoundRouter, Family
from pcmoe.models.families import TRANSFORMERS_FAMILIES
from pcmoe.models.vit_moe import VitMoeFamily

REGISTRY: dict[str, type[Family]] = {**TRANSFORMERS_FAMILIES,
                                     **{mt: VitMoeFamily for mt in VitMoeFamily.model_types}}
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")

__all__ = ["REGISTRY", "BoundBlock", "BoundRouter", "Family", "family_class", "load_family"]


def family_class(config_dict: dict, folder="the checkpoint") -> type[Family]:
    """The registry entry of a config.json, or a one-line CheckpointError naming what is supported."""
    model_type = config_dict.get("model_type")
    if model_type in REGISTRY:
        return REGISTRY[model_type]
    supported = ", ".join(sorted(REGISTRY))
    if any(k in config_dict for k in _MOE_KEYS):
        raise CheckpointError(f"model_type {model_type!r} is a MoE family pcmoe does not support yet "
                              f"(supported: {supported})")
    raise CheckpointError(f"{folder} holds a dense model (model_type {model_type!r}, no MoE layers); "
                          f"pcmoe serves MoE checkpoints ({supported})")


def load_family(folder, config_dict: dict) -> Family:
    """The Family of a checkpoint folder, bound to its parsed config."""
    cls = family_class(config_dict, folder)
    return cls(cls.load_config(folder, config_dict))
