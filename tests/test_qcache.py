"""Quantised expert copies (pcmoe.qcache): the store reads int8/int4 experts as the bank holds
them. Against quantising on the fly: the same slot bits, the same tokens, bytes that follow the
precision; stale copies are rebuilt, a read-only checkpoint folder falls back to the cache."""

import warnings

import pytest
import torch

import pcmoe
from pcmoe import qcache
from pcmoe.testing import make_checkpoint

SHAPE = dict(hidden_size=64, moe_intermediate_size=64)   # int4: groups of 32 columns, blocks of 64 rows


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "model"
    make_checkpoint("qwen3_moe", folder, dtype=torch.bfloat16, **SHAPE)
    return folder


def _banks(folder, quant, copy: bool, monkeypatch, **kw):
    """Every slot tensor after a full load (and the load's info)."""
    monkeypatch.setenv("PCMOE_QUANT_COPY", "1" if copy else "0")
    with pcmoe.load(folder, policy="full", quantize=quant, progress=False, **kw) as engine:
        banks = [{k: t.clone() for k, t in b.experts.bank.items()} for b in engine.blocks]
        return banks, engine.load_info, engine.store.stats


def _same(a, b):
    return all(a[i].keys() == b[i].keys() and all(torch.equal(a[i][k], b[i][k]) for k in a[i]) for i in range(len(a)))


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_the_copy_gives_the_same_slots_as_quantising_on_the_fly(model, quant, monkeypatch):
    fly, info_fly, _ = _banks(model, quant, False, monkeypatch)
    built, info_built, _ = _banks(model, quant, True, monkeypatch)
    found, info_found, _ = _banks(model, quant, True, monkeypatch)
    assert info_fly["quant_copy"] == "none"
    assert info_built["quant_copy"].endswith("built 2") and "built" not in info_found["quant_copy"]
    assert sorted(p.name for p in (model / qcache.FOLDER).iterdir()) == \
        [f"experts-{quant}-bfloat16-layer00{i}.safetensors" for i in (0, 1)]
    assert _same(fly, built) and _same(fly, found)


def _tokens(folder, monkeypatch, copy, **kw):
    monkeypatch.setenv("PCMOE_QUANT_COPY", "1" if copy else "0")
    with pcmoe.load(folder, progress=False, **kw) as engine:
        out = [s.token_id for s in engine.generate([3, 1, 4, 1, 5], max_new_tokens=12, stop_on_eos=False)]
        return out, engine.stats(), engine.store.stats, engine.blocks


@pytest.mark.parametrize("quant, full_over", [("int8", 1.9), ("int4", 3.0)])
def test_swaps_read_bytes_at_the_committees_precision(model, quant, full_over, monkeypatch):
    """A committee with swaps through the staging buffers: the same tokens as on the fly, and
    every read is one quantised slot's bytes (on the fly it was the full-precision expert). The
    committees are fixed by a plan: at one budget, copies' smaller staging buffers leave room for
    more members."""
    kw = dict(policy="committee", budget="60%experts", quantize=quant, update_every=1, margin=0.0)
    fly, st_fly, io_fly, _ = _tokens(model, monkeypatch, False, **kw)
    kw = dict(policy="committee", update_every=1, margin=0.0,
              plan={"format": "pcmoe-plan/1", "model_type": "qwen3_moe", "num_experts": [8, 8],
                    "committee_sizes": st_fly["committee_sizes"], "precisions": [quant] * 2})
    assert _tokens(model, monkeypatch, False, **kw)[0] == fly
    runs = [_tokens(model, monkeypatch, True, synchronous=s, **kw) for s in (True, False)]
    (sync, st, io, blocks), (asyn, _, _, _) = runs
    assert st["swaps"] > 0 and sync == fly == asyn
    slot = blocks[0].experts.slot_nbytes
    assert io.reads == io_fly.reads and io.bytes_read == io.reads * slot
    assert io_fly.bytes_read >= full_over * io.bytes_read


def test_on_demand_reads_the_copy_and_stays_exact(model, monkeypatch):
    kw = dict(policy="on-demand", budget="30%experts", quantize="int4")
    fly, _, io_fly, _ = _tokens(model, monkeypatch, False, **kw)
    full, _, _, _ = _tokens(model, monkeypatch, True, policy="full", quantize="int4")
    od, st, io, blocks = _tokens(model, monkeypatch, True, **kw)
    assert st["misses"] > 0 and od == fly == full
    assert io.bytes_read == io.reads * blocks[0].experts.slot_nbytes < io_fly.bytes_read


def test_per_layer_precisions_copy_only_the_quantised_layers(model, tmp_path, monkeypatch):
    from pcmoe.formats import write_plan

    plan = tmp_path / "plan.json"
    write_plan(plan, "qwen3_moe", [8, 8], [8, 4], precisions=["full", "int4"])
    monkeypatch.setenv("PCMOE_QUANT_COPY", "1")
    with pcmoe.load(model, policy="committee", plan=plan, progress=False) as engine:
        assert [b.experts.stored_quantised for b in engine.blocks] == [False, True]
        assert [engine.store.expert_nbytes(i) for i in (0, 1)] == [b.experts.slot_nbytes for b in engine.blocks]
    assert [p.name for p in (model / qcache.FOLDER).iterdir()] == ["experts-int4-bfloat16-layer001.safetensors"]


def test_a_stale_copy_is_rebuilt(model, monkeypatch):
    _banks(model, "int8", True, monkeypatch)
    make_checkpoint("qwen3_moe", model, seed=1, dtype=torch.bfloat16, **SHAPE)    # new weights, same shapes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rebuilt, info, _ = _banks(model, "int8", True, monkeypatch)
    assert [str(w.message) for w in caught if "quantised expert copy" in str(w.message)] == \
        ["the quantised expert copy of layer(s) 0, 1 no longer matched its checkpoint and was rebuilt"]
    assert info["quant_copy"].endswith("built 2")
    fly, _, _ = _banks(model, "int8", False, monkeypatch)
    assert _same(rebuilt, fly)


def test_a_read_only_checkpoint_folder_falls_back_to_the_cache(model, tmp_path, monkeypatch):
    real = qcache._create

    def read_only(path):
        if model in path.parents:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(qcache, "_create", read_only)
    got, info, _ = _banks(model, "int4", True, monkeypatch)
    cache = tmp_path / "pcmoe-cache"                                  # conftest's $PCMOE_CACHE
    assert str(cache) in info["quant_copy"] and "built 2" in info["quant_copy"]
    assert not list((model / qcache.FOLDER).glob("*.safetensors"))
    _, again, _ = _banks(model, "int4", True, monkeypatch)
    assert str(cache) in again["quant_copy"] and "built" not in again["quant_copy"]
    # nowhere to write: one warning, quantised on the fly, the same slots
    monkeypatch.setattr(qcache, "_create", lambda path: (_ for _ in ()).throw(PermissionError(13, "denied")))
    monkeypatch.setenv("PCMOE_CACHE", str(tmp_path / "other-cache"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fly, info, _ = _banks(model, "int4", True, monkeypatch)
    assert len([w for w in caught if "no writable place" in str(w.message)]) == 1
    assert info["quant_copy"].startswith("on the fly") and _same(fly, got)


def test_a_copy_missing_an_expert_is_not_used(model, monkeypatch):
    _banks(model, "int8", True, monkeypatch)
    path = next((model / qcache.FOLDER).iterdir())
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)                       # a torn file (not our atomic writes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, info, _ = _banks(model, "int8", True, monkeypatch)
    assert info["quant_copy"].endswith("built 1")
    assert any("was rebuilt" in str(w.message) for w in caught)


def test_carve_places_a_quantised_slot_in_a_full_precision_buffer():
    from pcmoe.store import carve

    storage = {"a": torch.empty(100, dtype=torch.bfloat16), "b": torch.empty(10, dtype=torch.bfloat16)}
    views = carve(storage, {"q": torch.empty(3, 20, dtype=torch.int8), "s": torch.empty(3, dtype=torch.float32)})
    assert views["q"].shape == (3, 20) and views["s"].dtype == torch.float32
    views["q"].fill_(1)
    views["s"].fill_(2.0)
    assert views["q"].sum() == 60 and views["s"].sum() == 6.0        # disjoint: s did not overwrite q
    with pytest.raises(ValueError, match="too small"):
        carve(storage, {"q": torch.empty(300, dtype=torch.int8)})


def test_copies_can_be_written_ahead(model, monkeypatch, capsys):
    from pcmoe.qcache_build import main

    assert main([str(model), "--quantize", "int4", "--quiet"]) == 0
    assert capsys.readouterr().out.strip().endswith("built 2")
    _, info, _ = _banks(model, "int4", True, monkeypatch)
    assert "built" not in info["quant_copy"] and str(model / qcache.FOLDER) in info["quant_copy"]
    assert main([str(model), "--quantize", "int3"]) == 2
    assert main([str(model / "nowhere")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_staging_buffers_hold_an_expert_as_the_layers_read_it(model, quant, monkeypatch):
    """Read from copies, swaps stage quantised bytes: the shared buffers shrink to a quantised slot
    (and the budget counts that); quantised on the fly, they hold a full-precision expert."""
    from pcmoe.store import layout_nbytes, staged_layout

    sizes = {}
    for copy in (False, True):
        monkeypatch.setenv("PCMOE_QUANT_COPY", "1" if copy else "0")
        with pcmoe.load(model, policy="committee", budget="60%experts", quantize=quant, progress=False) as engine:
            bank, st = engine.blocks[0].experts, engine.stats()
            assert engine.io.buffer_nbytes == layout_nbytes(staged_layout(bank))
            assert st["swap_buffer_bytes"] == len(engine.io.buffers) * engine.io.buffer_nbytes > 0
            sizes[copy] = (engine.io.buffer_nbytes, bank.slot_nbytes, st["committee_sizes"])
    (fly_buf, slot, fly_sizes), (copy_buf, slot2, copy_sizes) = sizes[False], sizes[True]
    assert copy_buf == slot == slot2 < fly_buf
    assert sum(copy_sizes) >= sum(fly_sizes)   # the bytes saved go to members


def test_a_copy_that_cannot_be_written_gets_full_size_staging_and_says_so(model, monkeypatch):
    """The budget counted int4 staging buffers; with no copy (nowhere to write one) the layers stage
    full-precision experts: the buffers grow, one warning says by how much, the stats count it."""
    monkeypatch.setenv("PCMOE_QUANT_COPY", "1")
    monkeypatch.setattr(qcache, "ensure", lambda *a, **k: qcache.Copies(missing=[0, 1]))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        engine = pcmoe.load(model, policy="committee", budget="60%experts", quantize="int4", progress=False)
    said = [str(w.message) for w in seen]
    assert any("no writable place for a quantised expert copy" in m for m in said)      # attach's line
    assert sum("staging buffers hold full-precision experts" in m for m in said) == 1
    with engine:
        st = engine.stats()
        full = engine.blocks[0].experts.kernel.tensors
        full_bytes = sum(torch.Size(s).numel() * 2 for s in full.values())   # bf16
        assert engine.io.buffer_nbytes >= full_bytes
        assert st["swap_buffer_bytes"] == len(engine.io.buffers) * engine.io.buffer_nbytes
        assert [b.experts.stored_quantised for b in engine.blocks] == [False, False]
