"""Runtime behaviour beyond parity: plan options, input validation, failure handling, statistics,
and policies checked against exact references built from transformers models."""

import json
import shutil

import pytest
import torch

import pcmoe
from pcmoe import PcmoeError
from pcmoe.formats import write_plan
from pcmoe.testing import build_model, tiny_config

IDS = torch.tensor([[5, 17, 3, 99, 42, 8, 61, 23, 77, 12, 31, 90]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _copy(folder, tmp_path, name="copy"):
    out = tmp_path / name
    shutil.copytree(folder, out)
    return out


# -- plan files -------------------------------------------------------------------------------


def test_plan_options_apply_before_sizing_and_explicit_options_win(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("qwen3_moe")
    write_plan(tmp_path / "p.json", "qwen3_moe", [8, 8], [3, 3], options={"spare_slots": 3, "quantize": "int8"})
    with pcmoe.load(folder, plan=tmp_path / "p.json", progress=False) as engine:
        assert engine.slots == [6, 6]
        st = engine.stats()
        banks = sum(b.experts.slot_nbytes * b.experts.num_slots for b in engine.blocks)
        assert st["resident_expert_bytes"] == banks        # sized as int8, as the banks hold them
    with pcmoe.load(folder, plan=tmp_path / "p.json", spare_slots=1, progress=False) as engine:
        assert engine.slots == [4, 4]


@pytest.mark.parametrize("options, message", [
    ({"strategy": "bogus"}, "unknown strategy"),
    ({"update_every": 0}, "update_every must be"),
    ({"update_every": "16"}, "update_every must be"),
    ({"tau": 2}, "tau must be"),
    ({"no_such_option": 1}, "unknown plan option"),
])
def test_bad_plan_options_are_clear_errors(tiny_checkpoint, tmp_path, options, message):
    folder, _ = tiny_checkpoint("qwen3_moe")
    write_plan(tmp_path / "p.json", "qwen3_moe", [8, 8], [3, 3], options=options)
    with pytest.raises(PcmoeError, match=message):
        pcmoe.load(folder, plan=tmp_path / "p.json", progress=False)


def test_plan_that_is_not_an_object(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("qwen3_moe")
    (tmp_path / "p.json").write_text("[1, 2]")
    with pytest.raises(PcmoeError, match="not a pcmoe plan"):
        pcmoe.load(folder, plan=tmp_path / "p.json", progress=False)


# -- checkpoints that do not match their config -------------------------------------------------


def test_config_that_disagrees_with_the_weights(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("qwen3_moe")
    for key, value, needle in (("vocab_size", 100, "embed_tokens"), ("moe_intermediate_size", 16, "expert tensor")):
        bad = _copy(folder, tmp_path, key)
        cfg = json.loads((bad / "config.json").read_text())
        cfg[key] = value
        (bad / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(PcmoeError, match=needle):
            pcmoe.load(bad, progress=False)


def test_corrupt_shard_index(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("mixtral")
    bad = _copy(folder, tmp_path)
    (bad / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(PcmoeError, match="index.json is corrupt"):
        pcmoe.load(bad, progress=False)


def test_failed_load_closes_the_checkpoint(tiny_checkpoint, monkeypatch):
    from pcmoe.checkpoint import Checkpoint

    folder, _ = tiny_checkpoint("qwen3_moe")
    closed = []
    original = Checkpoint.close
    monkeypatch.setattr(Checkpoint, "close", lambda self: (closed.append(True), original(self)))
    with pytest.raises(PcmoeError):
        pcmoe.load(folder, budget="1%", progress=False)
    assert closed


def test_inspect_reads_no_weights(tiny_checkpoint, monkeypatch):
    from pcmoe.checkpoint import Checkpoint
    from pcmoe.engine import inspect

    folder, _ = tiny_checkpoint("qwen3_moe")
    with pcmoe.load(folder, policy="full", progress=False) as engine:
        full = engine.model_bytes

    def no_reads(*args, **kwargs):
        raise AssertionError("inspect must not read weights")

    monkeypatch.setattr(Checkpoint, "read_into", no_reads)
    info = inspect(folder)
    assert info["full_model_bytes"] == full.full and info["all_expert_bytes"] == full.all_experts
    assert info["moe_layers"] == 2 and info["experts_per_layer"] == 8


# -- failures while serving ---------------------------------------------------------------------


def test_async_swap_that_raises_anything_keeps_serving(tiny_checkpoint, monkeypatch):
    folder, _ = tiny_checkpoint("qwen3_moe")
    engine = pcmoe.load(folder, budget="45%experts", policy="committee", update_every=1, margin=0.0,
                        progress=False)
    members_before = [sorted(c.members()) for c in engine.committees]

    def broken(*args, **kwargs):
        raise ValueError("not an I/O error")

    monkeypatch.setattr(engine.store, "read_expert", broken)
    with torch.no_grad():
        for _ in range(4):
            out = engine.model(input_ids=IDS).logits
    st = engine.stats()
    engine.close()
    assert torch.isfinite(out).all() and st["swap_failures"] > 0 and st["swaps"] == 0
    assert [sorted(c.members()) for c in engine.committees] == members_before


def test_on_demand_read_error_keeps_the_cache_full(tiny_checkpoint, monkeypatch):
    folder, _ = tiny_checkpoint("qwen3_moe")
    engine = pcmoe.load(folder, budget="30%experts", policy="on-demand", progress=False)
    sizes = [len(c.members()) for c in engine.committees]
    read = engine.store.read_expert
    resident = [set(c.members()) for c in engine.committees]

    def fail_absent(layer, expert, slot):
        if expert not in resident[layer]:
            raise OSError(5, "injected")
        return read(layer, expert, slot)

    monkeypatch.setattr(engine.store, "read_expert", fail_absent)
    with torch.no_grad():
        out = engine.model(input_ids=IDS).logits
    st = engine.stats()
    engine.close()
    assert torch.isfinite(out).all() and st["misses"] > 0 and st["skipped"] > 0
    assert [len(c.members()) for c in engine.committees] == sizes
    assert [set(c.members()) for c in engine.committees] == resident


# -- statistics ---------------------------------------------------------------------------------


def test_per_layer_statistics_add_up(tiny_checkpoint):
    folder, _ = tiny_checkpoint("qwen3_moe")
    with pcmoe.load(folder, budget="30%experts", policy="on-demand", progress=False) as engine:
        _logits(engine.model)
        st = engine.stats()
    layers = st["per_layer"]
    assert st["bytes_read"] == sum(layer["bytes_read"] for layer in layers) > 0
    assert st["read_s"] == pytest.approx(sum(layer["read_s"] for layer in layers))
    assert st["stall_s"] == pytest.approx(sum(layer["stall_s"] for layer in layers))
    assert st["resident_expert_bytes"] == sum(layer["resident_expert_bytes"] for layer in layers)


def test_expert_norm_is_the_frobenius_norm(tiny_checkpoint):
    folder, reference = tiny_checkpoint("mixtral")
    with pcmoe.load(folder, policy="full", progress=False) as engine:
        got = engine.store.expert_norm(1, 3, chunk_elements=100)
    experts = reference.model.layers[1].mlp.experts
    want = torch.cat([experts.gate_up_proj[3].flatten(), experts.down_proj[3].flatten()]).detach().double().norm()
    assert got == pytest.approx(float(want), rel=1e-6)


def test_expert_norms_are_cached_and_invalidated(tiny_checkpoint, tmp_path, monkeypatch):
    from pcmoe.store import ExpertStore

    folder, _ = tiny_checkpoint("qwen3_moe")
    copy = _copy(folder, tmp_path)
    calls = []
    original = ExpertStore.expert_norm
    monkeypatch.setattr(ExpertStore, "expert_norm", lambda self, *a, **k: (calls.append(a), original(self, *a, **k))[1])
    pcmoe.load(copy, policy="full", progress=False).close()
    assert len(calls) == 16
    pcmoe.load(copy, policy="full", progress=False).close()
    assert len(calls) == 16                                    # from the cache
    model = build_model(tiny_config("qwen3_moe"), seed=7)      # same shapes, other weights
    model.save_pretrained(copy)
    pcmoe.load(copy, policy="full", progress=False).close()
    assert len(calls) == 32                                    # the fingerprint changed


# -- policies against exact references --------------------------------------------------------


def test_topk_reduce_equals_the_model_with_fewer_experts_per_token(tiny_checkpoint):
    folder, _ = tiny_checkpoint("qwen3_moe")
    reference = build_model(tiny_config("qwen3_moe", num_experts_per_tok=1))
    reference.load_state_dict(build_model(tiny_config("qwen3_moe")).state_dict())
    with pcmoe.load(folder, policy="topk-reduce", topk=1, progress=False) as engine:
        diff = (_logits(engine.model) - _logits(reference)).abs().max().item()
        st = engine.stats()
    assert diff <= 1e-5 and st["skipped"] == st["choices"] // 2


def _zero_absent_experts(reference, engine):
    """A transformers model whose absent experts output zero: what `skip` computes when the router
    does not renormalise over the chosen experts (OLMoE)."""
    for layer, committee in enumerate(engine.committees):
        experts = reference.model.layers[layer].mlp.experts
        for e in range(committee.num_experts):
            if not committee.is_member(e):
                with torch.no_grad():
                    experts.down_proj[e].zero_()
    return reference


def test_skip_equals_zeroing_the_absent_experts(tiny_checkpoint):
    folder, _ = tiny_checkpoint("olmoe")
    with pcmoe.load(folder, budget="50%experts", policy="magnitude-keep", strategy="skip", progress=False) as engine:
        got = _logits(engine.model)
        reference = _zero_absent_experts(build_model(tiny_config("olmoe")), engine)
        st = engine.stats()
    assert st["skipped"] == st["misses"] > 0 and st["exchanged"] == 0
    assert (got - _logits(reference)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family, renorm", [("qwen3_moe", True), ("olmoe", False)])
@pytest.mark.parametrize("tau, same_as", [(0.0, "exchange"), (1.0, "skip")])
def test_hybrid_between_exchange_and_skip(tiny_checkpoint, family, renorm, tau, same_as):
    # (OLMoE with renormalised exchange weights rescales even tokens that miss nothing, so its skip
    # limit is checked with the original weights.)
    folder, _ = tiny_checkpoint(family)

    def run(**kw):
        with pcmoe.load(folder, budget="50%experts", policy="magnitude-keep", renorm=renorm, progress=False,
                        **kw) as engine:
            return _logits(engine.model), engine.stats()

    (hybrid, h), (other, o) = run(strategy="hybrid", tau=tau), run(strategy=same_as)
    assert torch.allclose(hybrid, other, atol=1e-6, rtol=0)
    assert (h["exchanged"], h["skipped"]) == (o["exchanged"], o["skipped"])


def test_hybrid_mixes_per_token(tiny_checkpoint):
    folder, _ = tiny_checkpoint("qwen3_moe")
    with pcmoe.load(folder, budget="50%experts", policy="magnitude-keep", strategy="hybrid", tau=0.02,
                    progress=False) as engine:
        _logits(engine.model)
        st = engine.stats()
    assert st["exchanged"] > 0 and st["skipped"] > 0 and st["exchanged"] + st["skipped"] == st["misses"]


def test_original_gate_weights_differ_from_renormalised_only_without_renorm(tiny_checkpoint):
    def run(family, renorm):
        folder, _ = tiny_checkpoint(family)
        with pcmoe.load(folder, budget="50%experts", policy="magnitude-keep", renorm=renorm, progress=False) as e:
            return _logits(e.model)

    assert (run("olmoe", True) - run("olmoe", False)).abs().max() > 1e-4      # norm_topk_prob=False
    assert torch.allclose(run("qwen3_moe", True), run("qwen3_moe", False), atol=1e-6)  # renormalising router


def test_initial_committee_from_a_profile(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("qwen3_moe")
    favourites = [[7, 6, 5], [0, 2, 4]]
    importance = [[10.0 if e in fav else 0.0 for e in range(8)] for fav in favourites]
    profile = {"format": "pcmoe-profile/1", "model_type": "qwen3_moe", "num_experts": [8, 8],
               "importance": importance, "counts": importance}
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    plan = {"format": "pcmoe-plan/1", "committee_sizes": [3, 3]}
    with pcmoe.load(folder, plan=plan, profile=str(tmp_path / "profile.json"), progress=False) as engine:
        assert [sorted(c.members()) for c in engine.committees] == [sorted(f) for f in favourites]


def test_io_bandwidth_emulation_slows_reads(tiny_checkpoint):
    folder, _ = tiny_checkpoint("qwen3_moe")
    with pcmoe.load(folder, budget="30%experts", policy="on-demand", io_bandwidth=2, progress=False) as engine:
        engine.reset_stats()
        _logits(engine.model)
        st = engine.stats()
    assert st["bytes_read"] > 0 and st["read_s"] >= st["bytes_read"] / 2e6 * 0.95


def test_reads_drop_the_page_cache(tiny_checkpoint, monkeypatch):
    import os

    folder, _ = tiny_checkpoint("qwen3_moe")
    calls = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise",
                        lambda fd, off, n, advice: (calls.append(advice), real(fd, off, n, advice)))
    pcmoe.load(folder, budget="50%experts", progress=False).close()
    assert calls.count(os.POSIX_FADV_DONTNEED) > 0
    calls.clear()
    pcmoe.load(folder, budget="50%experts", evict=False, progress=False).close()
    assert os.POSIX_FADV_DONTNEED not in calls


def test_close_stops_the_swap_thread(tiny_checkpoint):
    import threading

    folder, _ = tiny_checkpoint("qwen3_moe")
    engine = pcmoe.load(folder, budget="45%experts", update_every=1, margin=0.0, progress=False)
    _logits(engine.model)
    _logits(engine.model)
    assert any(t.name.startswith("pcmoe-swap") for t in threading.enumerate())
    engine.close()
    assert not any(t.name.startswith("pcmoe-swap") and t.is_alive() for t in threading.enumerate())


def test_update_unit_inputs_through_the_engine(tiny_checkpoint):
    folder, _ = tiny_checkpoint("qwen3_moe")
    with pcmoe.load(folder, budget="45%experts", update_every=2, update_unit="inputs", margin=0.0,
                    synchronous=True, progress=False) as engine:
        for _ in range(5):
            engine.begin_input()
            _logits(engine.model)
            _logits(engine.model)
        engine.end_input()
        assert engine.stats()["updates"] == 2


def test_switch_capacity_that_binds_matches_transformers(tiny_checkpoint):
    folder, reference = tiny_checkpoint("switch_transformers", expert_capacity=2)
    dec = torch.tensor([[0, 7, 19, 4, 55]])
    with pcmoe.load(folder, policy="full", progress=False) as engine, torch.no_grad():
        got = engine.model(input_ids=IDS, decoder_input_ids=dec).logits
        want = reference(input_ids=IDS, decoder_input_ids=dec).logits
    assert (got - want).abs().max().item() <= 1e-5


def test_python_dash_m(tiny_checkpoint):
    import subprocess
    import sys

    folder, _ = tiny_checkpoint("qwen3_moe")
    out = subprocess.run([sys.executable, "-m", "pcmoe", "info", "--model", str(folder), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout.splitlines()[-1])["moe_layers"] == 2
