"""The family registry: every entry carries a tiny config, and its tiny checkpoint loads and
reproduces the family's own model (all experts resident) and stays exact on demand."""

import pytest
import torch

import pcmoe
from pcmoe.models import REGISTRY
from pcmoe.models.vit_moe import VitMoeFamily
from pcmoe.testing import ALL_FAMILIES, FAMILIES

IDS = torch.tensor([[5, 17, 3, 99, 42, 8, 61, 23, 77, 12, 31, 90]])
DEC = torch.tensor([[0, 7, 19, 4, 55]])


def _logits(model, family):
    with torch.no_grad():
        if REGISTRY[family] is VitMoeFamily:
            pixels = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
            return model(pixel_values=pixels).logits
        if REGISTRY[family].seq2seq:
            return model(input_ids=IDS, decoder_input_ids=DEC).logits
        return model(input_ids=IDS).logits


def test_every_registered_family_has_a_tiny_config_and_is_tested():
    """Registry entry => test entry: the parity tests below run over testing.ALL_FAMILIES, which
    is the registry itself; an entry without a tiny config fails here."""
    assert set(ALL_FAMILIES) == set(REGISTRY)
    missing = [mt for mt, cls in REGISTRY.items() if not cls.tiny_config]
    assert not missing, f"registered families without a tiny test config: {missing}"
    assert set(FAMILIES) | {mt for mt, cls in REGISTRY.items() if cls is VitMoeFamily} == set(REGISTRY)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_registered_family_loads_and_matches_its_model(tiny_checkpoint, family):
    folder, reference = tiny_checkpoint(family)
    with pcmoe.load(folder, policy="full", progress=False) as engine:
        assert engine.family.model_types[0] == family or family in engine.family.model_types
        full = _logits(engine.model, family)
    with pcmoe.load(folder, budget="30%experts", policy="on-demand", progress=False) as engine:
        on_demand = _logits(engine.model, family)
        assert engine.stats()["misses"] > 0
    ref = _logits(reference, family)
    assert (full - ref).abs().max() <= 1e-5, family
    assert torch.equal(on_demand, full), family   # same experts, same combine order: the same bits


def test_granitemoe_multipliers_and_fused_experts_on_disk(tiny_checkpoint):
    """Granite differs from Mixtral by its multipliers (kept in the transformers forward) and its
    fused `input_linear` / `output_linear` expert tensors: both must reach pcmoe unchanged."""
    from safetensors import safe_open

    folder, reference = tiny_checkpoint("granitemoe")
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any("input_linear" in k or "gate_up_proj" in k for k in keys)
    with pcmoe.load(folder, budget="50%experts", policy="committee", progress=False) as engine:
        assert engine.fast is None            # not a lean-decoder family: the transformers forward
        assert engine.config.residual_multiplier == 0.5
        steps = list(engine.generate(list(IDS[0]), max_new_tokens=4, stop_on_eos=False))
        assert len(steps) == 4 and steps[-1].stats["choices"] > 0


def test_lean_decoder_flag_comes_from_the_registry(tiny_checkpoint):
    for family, cls in REGISTRY.items():
        if cls is VitMoeFamily or cls.seq2seq:
            continue
        folder, _ = tiny_checkpoint(family)
        with pcmoe.load(folder, policy="full", progress=False) as engine:
            lean = engine.fast is not None
        layer_types = getattr(engine.config, "layer_types", None) or ["full_attention"]
        assert lean == (cls.lean_decoder and all(t == "full_attention" for t in layer_types)), family
