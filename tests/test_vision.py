"""The vision MoE: checkpoint layout, engine == plain model, frame stream, training, observations."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import pcmoe
from pcmoe.models.vit_moe import (
    FASHION_MNIST,
    VitMoeConfig,
    VitMoeForImageClassification,
    evaluate_stream,
    frame_stream,
    from_pretrained,
    save_pretrained,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "pcmoe-vit"
HAVE_DATA = (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST (dataset-fashion-mnist) is not installed")
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, num_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=16, stem_channels=8)


def _observations():
    spec = importlib.util.spec_from_file_location("observations", ROOT / "scripts" / "observations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    torch.manual_seed(0)
    model = VitMoeForImageClassification(VitMoeConfig(**TINY)).eval()
    with torch.no_grad():  # sharper routers than the init, so experts differ per token
        for layer in model.encoder.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("vit") / "tiny-vit"
    save_pretrained(model, folder)
    return folder


def _images(n=3, seed=0):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _assert_close(a, b, atol=1e-5):
    diff = (a - b).abs()
    assert diff.max() <= atol, f"max abs diff {diff.max():.3g}, mean {diff.mean():.3g}"


# -- checkpoint --------------------------------------------------------------------------------


def test_config_round_trip_and_layout(tiny_vit):
    data = json.loads((tiny_vit / "config.json").read_text())
    assert data["model_type"] == "pcmoe_vit_moe"
    assert VitMoeConfig.from_dict(data) == VitMoeConfig(**TINY)
    from safetensors import safe_open

    with safe_open(tiny_vit / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("encoder.layers.1.mlp.experts.7.gate_proj.weight").shape == (16, 32)   # [I, H]
        assert f.get_tensor("encoder.layers.1.mlp.experts.7.down_proj.weight").shape == (32, 16)   # [H, I]
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in keys)
    assert "encoder.layers.0.mlp.gate.weight" in keys
    assert not tiny_vit.with_name(tiny_vit.name + ".tmp").exists()


def test_full_policy_matches_plain_model(tiny_vit):
    x = _images()
    with torch.no_grad():
        ref = from_pretrained(tiny_vit)(pixel_values=x).logits
    with pcmoe.load(tiny_vit, policy="full", progress=False) as engine:
        with torch.no_grad():
            out = engine.model(pixel_values=x).logits
    assert out.shape == (3, 10)
    _assert_close(out, ref)


def test_on_demand_is_exact(tiny_vit):
    x = _images(seed=1)
    with torch.no_grad():
        ref = from_pretrained(tiny_vit)(pixel_values=x).logits
    with pcmoe.load(tiny_vit, budget="40%experts", policy="on-demand", progress=False) as engine:
        with torch.no_grad():
            out = engine.model(pixel_values=x).logits
        stats = engine.stats()
    assert stats["committee_sizes"] == [3, 3] and stats["misses"] > 0
    _assert_close(out, ref)


def test_committee_runs_and_reports(tiny_vit):
    with pcmoe.load(tiny_vit, budget="50%experts", policy="committee", progress=False, synchronous=True,
                    update_every=2) as engine:
        with torch.no_grad():
            for i in range(6):
                engine.begin_input()
                logits = engine.model(pixel_values=_images(1, seed=i)).logits
                assert logits.shape == (1, 10) and torch.isfinite(logits).all()
        engine.end_input()
        stats = engine.stats()
    assert all(n < 8 for n in stats["committee_sizes"])
    assert stats["choices"] == 6 * 49 * 2 * 2          # frames x tokens x k x layers
    assert 0 < stats["hit_rate"] < 1 and stats["updates"] > 0


# -- frame stream ------------------------------------------------------------------------------


def test_frame_stream_is_deterministic_with_runs():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(200, 28, 28), dtype=np.uint8)
    labels = np.arange(200) % 10

    def take(seed):
        return list(frame_stream(images, labels, 400, seed))

    a, b, c = take(3), take(3), take(4)
    assert len(a) == 400
    assert all(torch.equal(x, y) and la == lb for (x, la), (y, lb) in zip(a, b))
    assert any(not torch.equal(x, y) for (x, _), (y, _) in zip(a, c))
    frame = a[0][0]
    assert frame.shape == (1, 1, 28, 28) and frame.dtype == torch.float32
    assert 0.0 <= float(frame.min()) and float(frame.max()) <= 1.0
    seq = [label for _, label in a]
    starts = [0] + [i for i in range(1, len(seq)) if seq[i] != seq[i - 1]]
    lengths = np.diff(starts + [len(seq)])
    assert 2 <= len(starts) <= 400 // 20 + 1
    assert (lengths[:-1] >= 20).all() and (lengths <= 120).all()


@needs_data
def test_evaluate_stream(tiny_vit):
    with pcmoe.load(tiny_vit, budget="50%experts", policy="committee", progress=False) as engine:
        result = evaluate_stream(engine, None, frames=20, seed=0, progress=False)
    assert result["frames"] == 20 and 0.0 <= result["accuracy"] <= 1.0 and result["frames_per_s"] > 0


# -- training ----------------------------------------------------------------------------------


@needs_data
def test_tiny_training_lowers_the_loss_and_resumes(tmp_path):
    from pcmoe.training.vision import VisionTrainConfig, train

    cfg = VisionTrainConfig(model=TINY, epochs=4, batch_size=32, lr=3e-3, warmup_steps=3, train_limit=320,
                            test_limit=200, ckpt_every=5, log_every=1000)
    first = train(tmp_path, cfg, log=lambda m: None)
    assert first["step"] == 40
    assert np.mean(first["losses"][-5:]) < np.mean(first["losses"][:5]) - 0.1
    assert 0.0 <= first["test"]["accuracy"] <= 1.0
    cfg.epochs = 5
    logs = []
    second = train(tmp_path, cfg, log=logs.append)
    assert logs[0] == "resumed at step 40" and second["step"] == 50 and len(second["losses"]) == 10


# -- the shipped model -------------------------------------------------------------------------


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists(), reason="models/pcmoe-vit is not trained yet")
def test_shipped_checkpoint_loads():
    config = VitMoeConfig.from_dict(json.loads((SHIPPED / "config.json").read_text()))
    assert config.num_experts >= 8 and config.num_layers >= 4 and config.num_experts_per_tok in (1, 2)
    with pcmoe.load(SHIPPED, budget="50%experts", policy="committee", progress=False) as engine:
        with torch.no_grad():
            logits = engine.model(pixel_values=_images(4)).logits
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()


# -- observations script -----------------------------------------------------------------------


def test_locality_stats_closed_form():
    obs = _observations()
    counts = np.array([[4, 4, 0, 0], [4, 4, 0, 0], [0, 0, 4, 4], [0, 0, 4, 4]], dtype=float)
    s = obs.locality_stats(counts)
    assert s["mean_window_entropy_bits"] == pytest.approx(1.0)
    assert s["global_entropy_bits"] == pytest.approx(2.0)
    assert s["consecutive_top_overlap"] == pytest.approx(2 / 3)   # (1 + 0 + 1) / 3
    assert s["consecutive_tv_distance"] == pytest.approx(1 / 3)   # (0 + 1 + 0) / 3
    assert s["top_n"] == 2 and s["chance_top_overlap"] == 0.5


def test_observations_core_on_tiny_checkpoint(tiny_vit, tmp_path):
    obs = _observations()

    def steps(engine):
        with torch.no_grad():
            for i in range(5):
                engine.begin_input()
                engine.model(pixel_values=_images(1, seed=i))
                yield i % 2
        engine.end_input()

    with pcmoe.load(tiny_vit, policy="full", progress=False, track_importance=True) as engine:
        counts, tags = obs.record_counts(engine, steps(engine))
    assert counts.shape == (5, 2, 8) and tags == [0, 1, 0, 1, 0]
    assert (counts.sum(axis=2) == 49 * 2).all()                    # tokens x k per frame and layer
    obs.plot_heatmap(counts[:, 0], tmp_path / "locality.png", "tiny", tags, "class")
    assert (tmp_path / "locality.png").stat().st_size > 1000

    def accuracy(engine):
        with torch.no_grad():
            logits = engine.model(pixel_values=_images(8, seed=9)).logits
        return {"accuracy": float((logits.argmax(-1) == torch.arange(8)).float().mean())}

    ex = obs.exchangeability(tiny_vit, accuracy, layer=1, seeds=[0, 1], metric="accuracy", log=lambda m: None)
    rows = {r["method"]: r for r in ex["rows"]}
    assert len(rows) == 5 and rows["random skip, layer 1 only"]["committee_sizes"] == [8, 4]
    assert rows["random exchange, all layers"]["committee_sizes"] == [4, 4]
    assert rows["random skip, all layers"]["hit_rate"] < 1.0
    ex["eval"] = "test"
    report = {"model": "tiny", "command": "x", "seconds": 1.0, "threads": 1, "exchangeability": ex,
              "locality": {"stream": "s", "layer": 0, "block": "b",
                           "layers": [obs.locality_stats(counts[:, i]) for i in range(2)]}}
    text = obs.markdown(report)
    assert "| random exchange, all layers |" in text and "locality.png" in text
