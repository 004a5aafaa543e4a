"""What a checkpoint weighs, from config.json and the safetensors headers only (torch-free).

`pcmoe info` answers in a fraction of a second from here; the loader's numbers (a meta-device
skeleton of the model, pcmoe.loader.inspect) are the slow twin, and tests keep the two equal on
every registered family. Expert tensors are recognised by their names on disk:

  per expert   <block>.experts.<e>.<name>          (Mixtral, Qwen, OLMoE, DeepSeek, PhiMoE, ViT)
               <block>.experts.expert_<e>.<name>   (Switch Transformers)
  fused        <block>.experts.{gate_up,down}_proj[_bias] [E, ...]   (gpt-oss, save_original_format=False)
               <block>.{input,output}_linear.weight [E, ...]         (Granite MoE)

Every other tensor counts as non-expert weight, converted to the compute dtype (the commonest
floating dtype on disk) as the loader converts it.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path

from pcmoe.budget import ModelBytes, minima, nonexpert_nbytes_at
from pcmoe.checkpoint import DTYPES, Checkpoint, CheckpointError, read_config_dict

# The registry's model types (pcmoe.models.REGISTRY, which imports torch); tests keep them equal.
SUPPORTED_MODEL_TYPES = ("deepseek_v3", "gpt_oss", "granitemoe", "mixtral", "olmoe", "pcmoe_vit_moe", "phimoe",
                         "qwen2_moe", "qwen3_moe", "switch_transformers")

_PER_EXPERT = re.compile(r"^(?P<block>.+)\.experts\.(?:expert_)?(?P<e>\d+)\.")
_FUSED = re.compile(r"^(?P<block>.+?)\.(?:experts\.(?:gate_up|down)_proj(?:_bias)?|(?:input|output)_linear\.weight)$")

# Families the lean decoder serves (pcmoe.models registry, lean_decoder=True): only they can hold
# quantised non-expert weights (pcmoe.nonexpert). Tests keep this equal to the registry.
LEAN_MODEL_TYPES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
NONEXPERT_MODES = ("int8", "int4")


def model_bytes(ckpt: Checkpoint) -> tuple[ModelBytes, str]:
    """(ModelBytes, compute dtype name) of a checkpoint as the loader would hold it, all resident."""
    tensors = ckpt.tensors
    codes = Counter(t.dtype_code for t in tensors.values() if t.is_floating_point)
    compute = max(codes, key=codes.get) if codes else "F32"
    itemsize = DTYPES[compute][1]

    def as_compute(t) -> int:
        return t.nbytes // t.itemsize * itemsize if t.is_floating_point else t.nbytes

    experts: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))   # block -> expert -> bytes
    expert_keys = set()
    for name, t in tensors.items():
        m = _PER_EXPERT.match(name)
        if m:
            experts[m["block"]][int(m["e"])] += as_compute(t)
            expert_keys.add(name)
            continue
        m = _FUSED.match(name)
        if m and t.shape:
            for e in range(t.shape[0]):
                experts[m["block"]][e] += as_compute(t) // t.shape[0]
            expert_keys.add(name)
    if not experts:
        raise CheckpointError(f"{ckpt.folder}: no expert tensors found on disk; is it a MoE checkpoint?")
    blocks = sorted(experts, key=_natural)
    nonexpert = sum(as_compute(t) for name, t in tensors.items() if name not in expert_keys)
    per_layer = [experts[b] for b in blocks]
    sizes = ModelBytes(nonexpert, [max(layer.values()) for layer in per_layer], [len(layer) for layer in per_layer])
    return sizes, DTYPES[compute][0]


def describe(folder: str | Path, bytes_per_step: int | None = None) -> dict:
    """What `pcmoe info` prints: the same keys as pcmoe.loader.inspect (its slow twin)."""
    folder = Path(folder)
    config = read_config_dict(folder)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        # the slow path names what is wrong (dense model, unsupported MoE family)
        from pcmoe.loader import inspect

        return inspect(folder)
    ckpt = Checkpoint(folder, config)
    sizes, dtype = model_bytes(ckpt)
    quantized = {}
    if model_type in LEAN_MODEL_TYPES:   # what --quantize-nonexpert would hold
        itemsize = DTYPES[next(code for code, v in DTYPES.items() if v[0] == dtype)][1]
        tensors = {n: t for n, t in ckpt.tensors.items()
                   if not (_PER_EXPERT.match(n) or (_FUSED.match(n) and t.shape))}
        shapes = {n: tuple(t.shape) for n, t in tensors.items()}
        sizes_of = {n: itemsize if t.is_floating_point else t.itemsize for n, t in tensors.items()}
        quantized = {m: nonexpert_nbytes_at(shapes, sizes_of, m) for m in NONEXPERT_MODES}
    return {
        "model": str(folder), "model_type": model_type, "moe_layers": len(sizes.expert),
        "experts_per_layer": sizes.num_experts[0], "experts_per_token": config.get("num_experts_per_tok", 1),
        "dtype": dtype, "quantize": None,
        "nonexpert_bytes": sizes.nonexpert, "expert_bytes": sizes.expert[0],
        "nonexpert_bytes_quantized": quantized,
        "all_expert_bytes": sizes.all_experts, "full_model_bytes": sizes.full,
        # staging buffers hold one expert at full precision: the default load is unquantised
        **minima(sizes, max(sizes.expert), bytes_per_step),
        "tokenizer": (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists(),
    }


def _natural(name: str):
    """model.layers.10 after model.layers.9: layer order, not string order."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
