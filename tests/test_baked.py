"""Baked routing (pcmoe.bench.baked): the built checkpoint routes by the designed token -> expert map,
in transformers, in pcmoe and (when llama-cpp-python and the converter are here) in llama.cpp."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from pcmoe.bench import baked, gguf, scaling
from pcmoe.replay import TRACE_FORMAT, Trace, map_trace, save

REPO = Path(__file__).resolve().parents[1]
EXPERTS = 16  # target: 2 layers x 16 experts top-2; trace: 3 layers x 8 experts top-2 (L'N' = 32 = dims: exact)


def _trace(tokens: np.ndarray, idx: np.ndarray) -> Trace:
    return Trace(idx.astype(np.int16), np.full(idx.shape, 0.5, np.float32), tokens.astype(np.int32), 8,
                 {"format": TRACE_FORMAT, "model_type": "qwen3_moe"})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    import torch

    from pcmoe.testing import make_checkpoint, make_tokenizer

    root = tmp_path_factory.mktemp("baked")
    tok = make_tokenizer(root / "src")
    make_checkpoint("qwen3_moe", root / "src", dtype=torch.float32, num_experts=EXPERTS, tie_word_embeddings=False,
                    **dict(scaling.SHAPES["tiny"], vocab_size=len(tok)))
    rng = np.random.default_rng(0)
    T, V = 3000, len(tok)
    tokens = rng.integers(0, V, T)
    # each token prefers a pair of experts per layer, chosen 70 % of the time (else a random pair)
    pref = rng.integers(0, 8, (3, V))
    idx = np.empty((3, T, 2), dtype=np.int64)
    for j in range(3):
        first = np.where(rng.random(T) < 0.7, pref[j, tokens], rng.integers(0, 8, T))
        idx[j] = np.stack([first, (first + 1 + rng.integers(0, 7, T)) % 8], 1)
    save(_trace(tokens, idx), root / "trace.npz")
    return root, tokens


def _hf_topk(folder: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_router_logits=True)
    return np.stack([torch.topk(r.reshape(len(ids), -1), 2).indices.numpy() for r in out.router_logits])


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (np.sort(a, 2) == np.sort(b, 2)).all(2)


def _twin(folder: Path, ids, alpha: float) -> np.ndarray:
    design = np.load(folder / "pcmoe_baked_design.npz")
    return baked.simulate(design["code"].astype(np.float64), design["projections"].astype(np.float64), ids, 2,
                          alpha, 256)


def test_token_only_routing_follows_the_designed_map(source):
    root, tokens = source
    note = baked.bake(root / "src", root / "b0", root / "trace.npz", alpha=0.0, dims=32, progress=False)
    assert note["exact"] and note["token_map_agreement"] > 0.99 and note["routing"].startswith(baked.BAKED)
    assert json.loads((root / "b0" / baked.DESIGN_FILE).read_text())["alpha"] == 0.0
    ids = tokens[:64].tolist()
    from pcmoe.replay import load_trace

    vocab = json.loads((root / "src" / "config.json").read_text())["vocab_size"]
    s = baked.scores(load_trace(root / "trace.npz"), vocab, 2, EXPERTS, 2)[:, ids]      # [L', T, N']
    designed = np.argsort(-s, axis=2)[:, :, :2]
    ranked = -np.sort(-s, axis=2)
    clear = ranked[:, :, 1] - ranked[:, :, 2] > 1e-4      # not a near tie between the 2nd and 3rd expert
    assert clear.mean() > 0.9
    assert _same(_hf_topk(root / "b0", ids), designed)[clear].all()


def test_context_heads_route_as_the_numpy_twin_in_transformers_and_pcmoe(source):
    import pcmoe
    from pcmoe import trace as tr

    root, tokens = source
    baked.bake(root / "src", root / "b2", root / "trace.npz", alpha=2.0, dims=32, progress=False)
    ids = tokens[:96].tolist()
    twin = _twin(root / "b2", ids, 2.0)
    assert not _same(twin, _twin(root / "b2", ids, 0.0)).all()  # the context moves some choices
    assert _same(_hf_topk(root / "b2", ids), twin).all()
    engine = pcmoe.load(root / "b2", policy="full", progress=False)
    try:
        got = tr.record(engine, [ids + [0]], window=256)
    finally:
        engine.close()
    assert _same(got.idx, twin).all()


def test_groups_are_replays(source):
    """With one choice per source expert and no shared expert between neighbours, map_trace's hash pick is
    the designed member: both use replay's seeded groups."""
    root, _ = source
    V = 64
    tokens = np.arange(V)
    idx = np.stack([np.stack([(2 * tokens) % 8, (2 * tokens + 1) % 8], 1)] * 3)  # neighbours disjoint
    trace = _trace(tokens, idx)
    mapped = map_trace(trace, 2, EXPERTS, 2, seed=3)
    designed = np.argsort(-baked.scores(trace, V, 2, EXPERTS, 2, seed=3), axis=2)[:, :, :2]
    assert _same(mapped.idx, designed).all()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert baked.main(["--trace", str(tmp_path / "none.npz"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: routing trace {tmp_path / 'none.npz'} does not exist"
    assert not (tmp_path / "out").exists()


def _converter():
    return gguf.converter_root(REPO / "data" / "llamacpp")


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or _converter() is None,
                    reason="llama-cpp-python or the GGUF converter is not here")
def test_llamacpp_routes_the_baked_checkpoint_the_same(source, tmp_path):
    root, tokens = source
    folder = root / "b2"
    if not folder.exists():
        baked.bake(root / "src", folder, root / "trace.npz", alpha=2.0, dims=32, progress=False)
    f = gguf.convert(folder, tmp_path / "baked-f32.gguf", "f32", src=_converter())
    ids = tokens[:48].tolist()
    assert _same(baked.llamacpp_routing(f, ids, 2), _hf_topk(folder, ids)).all()


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, runpy; sys.argv = ['baked', '--help']\n"
            "try:\n    runpy.run_module('pcmoe.bench.baked', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert "--alpha" in out.stdout and out.stdout.strip().endswith("False")
