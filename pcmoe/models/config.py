"""config.json as a plain attribute object, for the families the lean decoder serves, without
importing transformers (its package and config classes cost ~26 MB resident that serving never uses).

Only the values config.json states are used: where it lacks a field the lean path or the sizing
reads, `lean_config` returns None and the loader takes transformers' config (whose class defaults
then apply). transformers' config stays what the twin (LeanCausalLM.transformers_model) and every
other family are built from; tests check that each field read here equals transformers' value.
"""

from __future__ import annotations

from pathlib import Path

# Fields the lean skeleton, pcmoe.fast, the family's routing and the sizing read, per model_type;
# config.json must state every one (no transformers defaults are reproduced here).
_COMMON = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "vocab_size",
           "rms_norm_eps", "hidden_act", "rope_parameters", "num_experts_per_tok", "tie_word_embeddings",
           "max_position_embeddings", "intermediate_size", "eos_token_id")
_QWEN = ("num_experts", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
         "use_sliding_window", "sliding_window")
REQUIRED = {
    "qwen3_moe": _COMMON + _QWEN + ("head_dim", "attention_bias"),
    "qwen2_moe": _COMMON + _QWEN + ("shared_expert_intermediate_size", "qkv_bias"),
    "mixtral": _COMMON + ("num_local_experts", "sliding_window"),
    "olmoe": _COMMON + ("num_experts", "norm_topk_prob", "attention_bias", "clip_qkv"),
}
# transformers' attribute_map of these config classes: both names read the same value.
_ALIASES = {"num_experts": "num_local_experts", "num_local_experts": "num_experts"}


# Read with getattr defaults on the lean path: absent from config.json, they are absent (tests check
# transformers' config lacks them too), so serving never reaches transformers for them.
_LEAN_OPTIONAL = {"layer_types", "head_dim", "clip_qkv"}
_LEAN_FIELDS = {name for names in REQUIRED.values() for name in names} | _LEAN_OPTIONAL


class LeanConfig:
    """config.json's fields as attributes. Any other attribute (get_text_config, a class default the
    lean path never reads) comes from transformers' config of the same file, made on first use,
    so engine.config still answers what a transformers config answers."""

    def __init__(self, values: dict, folder: Path | None = None):
        self.__dict__.update(values)
        self._folder = folder
        self._full = None

    def __getattr__(self, name: str):
        if name.startswith("_") or name in _LEAN_FIELDS:
            raise AttributeError(name)
        if self._full is None:
            self._full = self.transformers()
        return getattr(self._full, name)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}  # config.json's fields

    def transformers(self):
        """transformers' config of the same config.json (for the twin; imports transformers)."""
        from transformers import AutoConfig

        if self._folder is not None:
            return AutoConfig.from_pretrained(self._folder)
        values = self.to_dict()
        return AutoConfig.for_model(values.pop("model_type"), **values)

    def __repr__(self) -> str:
        return f"LeanConfig({self.model_type})"


def lean_config(config_dict: dict, folder=None) -> LeanConfig | None:
    """The LeanConfig of a config.json that states every field its family's lean path reads, else None."""
    required = REQUIRED.get(config_dict.get("model_type"))
    if required is None:
        return None
    values = dict(config_dict)
    for name, alias in _ALIASES.items():
        if name not in values and alias in values:
            values[name] = values[alias]
    if any(k not in values for k in required):
        return None
    rope = values["rope_parameters"]
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return None
    return LeanConfig(values, Path(folder) if folder is not None else None)
