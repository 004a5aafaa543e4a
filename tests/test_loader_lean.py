"""The lean build (pcmoe.models.lean): lean families are served without transformers' modeling
code, from a skeleton with the transformers model's names, and agree with the transformers build."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pcmoe
from pcmoe.models import REGISTRY
from pcmoe.models.lean import LeanCausalLM, lean_supported
from pcmoe.testing import build_model, tiny_config

REPO = Path(__file__).resolve().parents[1]
LEAN = tuple(mt for mt, cls in REGISTRY.items() if cls.lean_decoder)
IDS = [5, 17, 3, 99, 42, 8, 61, 23, 77, 12, 31, 90]
# Dense layers next to MoE ones (Qwen's mlp_only_layers / decoder_sparse_step).
DENSE = {"qwen3_moe": dict(decoder_sparse_step=2), "qwen2_moe": dict(decoder_sparse_step=2)}

PROBE = r"""
import json, re, sys
import torch, pcmoe
out = {}
for folder in sys.argv[1:]:
    with pcmoe.load(folder, policy="full", progress=False) as engine:
        with torch.inference_mode():
            logits, state = engine.prefill([3, 1, 4, 1, 5])
            engine.decode_step(state, int(logits.argmax()))
        out[folder] = type(engine.model).__name__
# Model code; models.auto.modeling_auto is only the name tables AutoTokenizer reads.
pattern = re.compile(r"^transformers\.(modeling_utils|activations|models\.(?!auto\.)[a-z0-9_]+\.modeling_)")
out["modules"] = sorted(m for m in sys.modules if pattern.match(m))
print(json.dumps(out))
"""


def test_lean_families_load_without_transformers_modeling_code(tiny_checkpoint, tiny_lm):
    folders = [str(tiny_lm)] + [str(tiny_checkpoint(f)[0]) for f in LEAN if f != "qwen3_moe"]
    p = subprocess.run([sys.executable, "-c", PROBE, *folders], capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out.pop("modules") == []
    assert set(out.values()) == {"LeanCausalLM"}


@pytest.mark.parametrize("family", LEAN)
def test_skeleton_has_the_transformers_names_and_shapes(family):
    config = tiny_config(family, **({"mlp_only_layers": [1]} if family == "qwen3_moe" else DENSE.get(family, {})))
    fam = REGISTRY[family](config)
    reference = {k: tuple(v.shape) for k, v in build_model(config).state_dict().items() if ".experts." not in k}
    lean = LeanCausalLM(config, fam, torch.float32)
    assert all(p.device.type == "meta" for p in lean.parameters())
    assert {k: tuple(v.shape) for k, v in lean.state_dict().items()} == reference


@pytest.mark.parametrize("family", LEAN)
def test_lean_build_matches_the_transformers_build(tiny_checkpoint, family):
    """fp32: the lean decoder on the skeleton against the transformers forward of a transformers
    build (fast=False), over a prefill and decode steps; the skeleton's own twin agrees too."""
    folder, reference = tiny_checkpoint(family, **DENSE.get(family, {}))
    ids = torch.tensor([IDS])
    with pcmoe.load(folder, policy="full", progress=False, kernel="eager") as lean, \
            pcmoe.load(folder, policy="full", progress=False, fast=False) as hf:
        assert isinstance(lean.model, LeanCausalLM) and not isinstance(hf.model, LeanCausalLM)
        # The meta build leaves no default device behind (a global mode would slow every op down).
        assert torch.get_default_device() == torch.device("cpu")
        assert not torch.overrides._get_current_function_mode_stack()
        with torch.inference_mode():
            a, sa = lean.prefill(IDS[:8])
            b, sb = hf.prefill(IDS[:8])
            steps = [(a, b)]
            for t in IDS[8:]:
                steps.append((lean.decode_step(sa, t), hf.decode_step(sb, t)))
            twin = lean.model(input_ids=ids).logits[0]
            expected = reference(input_ids=ids).logits[0]
        for x, y in steps:
            assert (x - y).abs().max().item() < 1e-5
        assert (twin - expected).abs().max().item() < 1e-5


def test_configs_the_skeleton_does_not_cover_use_transformers(tiny_checkpoint):
    assert lean_supported(tiny_config("qwen3_moe")) is None
    assert "rope" in lean_supported(tiny_config("qwen3_moe", rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}))
    assert "sliding" in lean_supported(tiny_config("mixtral", sliding_window=16))
    folder, _ = tiny_checkpoint("phimoe")  # not a lean family
    with pcmoe.load(folder, policy="full", progress=False) as engine:
        assert not isinstance(engine.model, LeanCausalLM)
