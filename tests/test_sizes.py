"""pcmoe.sizes (headers only, torch-free) against its slow twin, the loader's meta skeleton."""

import json
import subprocess
import sys

import pytest

from pcmoe import sizes
from pcmoe.loader import inspect
from pcmoe.models import REGISTRY
from pcmoe.testing import ALL_FAMILIES

KEYS = ("model_type", "moe_layers", "experts_per_layer", "experts_per_token", "dtype", "nonexpert_bytes",
        "expert_bytes", "all_expert_bytes", "full_model_bytes", "minimum_budget", "swap_buffers",
        "minimum_budget_committee", "minimum_budget_static", "tokenizer")


def test_supported_types_are_the_registry():
    assert set(sizes.SUPPORTED_MODEL_TYPES) == set(REGISTRY)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_headers_agree_with_the_loader(tiny_checkpoint, family):
    folder, _ = tiny_checkpoint(family)
    fast, slow = sizes.describe(folder), inspect(folder)
    assert {k: fast[k] for k in KEYS} == {k: slow[k] for k in KEYS}


def test_headers_agree_in_bfloat16(tiny_checkpoint):
    import torch

    folder, _ = tiny_checkpoint("qwen2_moe", dtype=torch.bfloat16)
    fast, slow = sizes.describe(folder), inspect(folder)
    assert fast["dtype"] == "bfloat16" and {k: fast[k] for k in KEYS} == {k: slow[k] for k in KEYS}


def test_info_never_imports_torch(tiny_checkpoint):
    folder, _ = tiny_checkpoint("mixtral")
    code = ("import sys; from pcmoe.cli import main; rc = main(['info', '--json', '--model', sys.argv[1]]); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["model_type"] == "mixtral" and info["minimum_budget"] > info["minimum_budget_static"]
