"""Shared fixtures: tiny random checkpoints of every family, made once per test session."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(family, **config_overrides) -> (folder, transformers model); cached per args."""
    from pcmoe.testing import make_checkpoint

    made = {}

    def make(family: str, **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(family)
            made[key] = (folder, make_checkpoint(family, folder, **overrides))
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A tiny qwen3_moe checkpoint with a byte-level BPE tokenizer and a chat template."""
    from pcmoe.testing import make_checkpoint, make_tokenizer

    folder = tmp_path_factory.mktemp("tiny_lm")
    tok = make_tokenizer(folder)
    make_checkpoint("qwen3_moe", folder, vocab_size=len(tok), max_position_embeddings=512)
    return folder


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PCMOE_CACHE", str(tmp_path / "pcmoe-cache"))
    monkeypatch.setenv("PCMOE_GGUF_DIR", str(tmp_path / "gguf"))  # never the repository's data/
