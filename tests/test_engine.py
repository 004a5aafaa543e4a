"""The engine on tiny random checkpoints of every family, against transformers."""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

import pcmoe
from pcmoe import PcmoeError
from pcmoe.checkpoint import Checkpoint
from pcmoe.testing import FAMILIES

IDS = torch.tensor([[5, 17, 3, 99, 42, 8, 61, 23, 77, 12, 31, 90]])
DEC = torch.tensor([[0, 7, 19, 4, 55]])


def logits_of(model, family):
    with torch.no_grad():
        if family == "switch_transformers":
            return model(input_ids=IDS, decoder_input_ids=DEC).logits
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_all_experts_resident_reproduces_transformers(tiny_checkpoint, family):
    folder, reference = tiny_checkpoint(family)
    with pcmoe.load(folder, policy="full", progress=False) as engine:
        diff = (logits_of(engine.model, family) - logits_of(reference, family)).abs().max().item()
        assert engine.stats()["bytes_read"] == 0
    assert diff <= 1e-5, f"{family}: max abs diff {diff}"


@pytest.mark.parametrize("family", FAMILIES)
def test_on_demand_is_exact_at_a_small_budget(tiny_checkpoint, family):
    folder, reference = tiny_checkpoint(family)
    with pcmoe.load(folder, budget="30%experts", policy="on-demand", progress=False) as engine:
        assert max(engine.slots) < engine.model_bytes.num_experts[0]
        diff = (logits_of(engine.model, family) - logits_of(reference, family)).abs().max().item()
        stats = engine.stats()
    assert diff <= 1e-5, f"{family}: max abs diff {diff}"
    assert stats["misses"] > 0 and stats["bytes_read"] > 0 and stats["stall_s"] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_committee_of_all_experts_equals_full(tiny_checkpoint, family):
    folder, reference = tiny_checkpoint(family)
    with pcmoe.load(folder, budget="100%", policy="committee", progress=False) as engine:
        diff = (logits_of(engine.model, family) - logits_of(reference, family)).abs().max().item()
        assert engine.scheduler is None  # nothing to swap
    assert diff <= 1e-5


def test_masked_committee_changes_outputs_and_counts(tiny_checkpoint):
    folder, reference = tiny_checkpoint("olmoe")
    with pcmoe.load(folder, budget="50%experts", policy="magnitude-keep", progress=False) as engine:
        out = logits_of(engine.model, "olmoe")
        st = engine.stats()
    assert (out - logits_of(reference, "olmoe")).abs().max() > 1e-3
    assert st["misses"] > 0 and st["exchanged"] == st["misses"] and 0 < st["router_mass_outside"] < 1
    assert st["bytes_read"] == 0  # a static subset never reads after load


def test_store_reads_equal_safetensors(tiny_checkpoint):
    folder, _ = tiny_checkpoint("mixtral")
    ckpt = Checkpoint(folder)
    with safe_open(folder / "model.safetensors", "pt") as f:
        for name in list(f.keys())[:20]:
            assert torch.equal(ckpt.read(ckpt[name]), f.get_tensor(name))
    with pcmoe.load(folder, budget="50%experts", progress=False) as engine:
        layer, block = 1, engine.blocks[1]
        with safe_open(folder / "model.safetensors", "pt") as f:
            for slot, expert in enumerate(engine.committees[layer].slot_to_expert):
                if expert < 0:
                    continue
                pre = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
                w1, w3, w2 = (f.get_tensor(pre + n + ".weight") for n in ("w1", "w3", "w2"))
                assert torch.equal(block.experts.slot(slot)["gate_up"], torch.cat([w1, w3]))
                assert torch.equal(block.experts.slot(slot)["down"], w2)


def run_stream(folder, synchronous, steps=24, **kw):
    """Decode a fixed token sequence step by step (with a KV cache) under the committee policy."""
    from transformers import DynamicCache

    out = []
    with pcmoe.load(folder, budget="45%experts", policy="committee", update_every=2, synchronous=synchronous,
                    margin=0.0, progress=False, **kw) as engine:
        cache = DynamicCache(config=engine.config)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 128, (steps,), generator=gen)
        with torch.no_grad():
            for t in tokens:
                out.append(engine.model(input_ids=t.view(1, 1), cache=cache, use_cache=True).logits)
        st = engine.stats()
    return torch.cat(out), st


@pytest.mark.parametrize("spare_slots", [0, 1])  # 0: staged through shared buffers; 1: spare slot per layer
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_async_swaps_equal_sync_swaps(tiny_checkpoint, family, spare_slots):
    folder, _ = tiny_checkpoint(family)
    sync_logits, sync_stats = run_stream(folder, synchronous=True, spare_slots=spare_slots)
    async_logits, async_stats = run_stream(folder, synchronous=False, spare_slots=spare_slots)
    assert sync_stats["swaps"] > 0, "the test must exercise swaps"
    assert torch.equal(sync_logits, async_logits)
    assert sync_stats["swaps"] == async_stats["swaps"]
    timing = ("read_s", "stall_s", "bytes_read")  # a load issued at the last step may still be in flight
    assert [{k: v for k, v in layer.items() if k not in timing} for layer in sync_stats["per_layer"]] == \
        [{k: v for k, v in layer.items() if k not in timing} for layer in async_stats["per_layer"]]
    assert all(layer["skipped"] >= 0 for layer in sync_stats["per_layer"])


@pytest.mark.parametrize("spare_slots", [0, 1])
def test_after_swaps_every_slot_holds_its_members_weights(tiny_checkpoint, spare_slots):
    folder, _ = tiny_checkpoint("qwen3_moe")
    with pcmoe.load(folder, budget="45%experts", policy="committee", update_every=1, synchronous=True,
                    margin=0.0, spare_slots=spare_slots, progress=False) as engine:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _ in range(12):
                engine.model(input_ids=torch.randint(0, 128, (1, 3), generator=gen))
        assert engine.stats()["swaps"] > 0, "the test must exercise swaps"
        for layer, committee in enumerate(engine.committees):
            bank = engine.blocks[layer].experts
            for expert in committee.members():
                slot = bank.slot(int(committee.expert_to_slot[expert]))
                fresh = {name: torch.empty_like(t) for name, t in slot.items()}
                engine.store.read_expert(layer, expert, fresh)
                for name in slot:
                    assert torch.equal(slot[name], fresh[name]), (layer, expert, name)


@pytest.mark.parametrize("budget", ["35%experts", "50%experts", "75%", "0.45MB", 420_000])
@pytest.mark.parametrize("policy", ["committee", "random-keep", "on-demand"])
def test_resident_bytes_never_exceed_budget(tiny_checkpoint, budget, policy):
    folder, _ = tiny_checkpoint("qwen3_moe")
    with pcmoe.load(folder, budget=budget, policy=policy, progress=False) as engine:
        st = engine.stats()
        slot_bytes = sum(b.experts.slot_nbytes * b.experts.num_slots for b in engine.blocks)
        nonexpert = sum(p.numel() * p.element_size() for n, p in engine.model.named_parameters())
    assert st["resident_bytes"] <= st["budget_bytes"]
    # swaps without spare slots stage through shared buffers, which count as resident expert bytes
    assert st["swap_buffer_bytes"] == st["load"]["swap_buffer_bytes"]
    assert slot_bytes + st["swap_buffer_bytes"] == st["resident_expert_bytes"]
    assert nonexpert == st["nonexpert_bytes"]  # every parameter is a non-expert weight (experts are slots)


def test_plan_file_sets_per_layer_sizes(tiny_checkpoint, tmp_path):
    from pcmoe.formats import write_plan

    folder, _ = tiny_checkpoint("qwen3_moe")
    write_plan(tmp_path / "plan.json", "qwen3_moe", [8, 8], [3, 6], options={"update_every": 4})
    with pcmoe.load(folder, plan=tmp_path / "plan.json", progress=False) as engine:
        assert engine.committee_sizes == [3, 6] and engine.slots == [3, 6]  # staged swaps: no spare slot
        assert engine.options.update_every == 4
    with pcmoe.load(folder, plan=tmp_path / "plan.json", spare_slots=1, progress=False) as engine:
        assert engine.slots == [4, 7] and engine.stats()["swap_buffer_bytes"] == 0
    write_plan(tmp_path / "bad.json", "qwen3_moe", [8, 8], [3, 9])
    with pytest.raises(PcmoeError, match="1..8"):
        pcmoe.load(folder, plan=tmp_path / "bad.json", progress=False)


def test_injected_read_error_during_swap_keeps_serving(tiny_checkpoint, monkeypatch):
    folder, _ = tiny_checkpoint("qwen3_moe")
    engine = pcmoe.load(folder, budget="45%experts", policy="committee", update_every=1, synchronous=True,
                        margin=0.0, progress=False)
    members_before = [sorted(c.members()) for c in engine.committees]

    def broken(*args, **kwargs):
        raise OSError(5, "injected I/O error")

    monkeypatch.setattr(engine.store.checkpoint, "read_into", broken)
    with torch.no_grad():
        for _ in range(4):
            out = engine.model(input_ids=IDS).logits
    st = engine.stats()
    engine.close()
    assert torch.isfinite(out).all()
    assert st["swap_failures"] > 0 and st["read_errors"] >= 3 * st["swap_failures"] and st["swaps"] == 0
    assert [sorted(c.members()) for c in engine.committees] == members_before


def test_generate_is_deterministic_and_streams_stats(tiny_lm):
    # A static committee: with the committee policy the members (rightly) evolve between requests.
    with pcmoe.load(tiny_lm, budget="60%experts", policy="magnitude-keep", progress=False) as engine:
        a = [s.token_id for s in engine.generate("hello world", max_new_tokens=8, seed=1)]
        steps = list(engine.generate("hello world", max_new_tokens=8, seed=1))
        assert [s.token_id for s in steps] == a and len(a) == 8
        assert steps[-1].finish_reason == "length" and steps[-1].stats["choices"] > 0
        assert all(not s.stats for s in steps[:-1])
        # sampling with a seed is reproducible too
        s1 = [s.token_id for s in engine.generate("hello", max_new_tokens=6, temperature=1.0, seed=3)]
        s2 = [s.token_id for s in engine.generate("hello", max_new_tokens=6, temperature=1.0, seed=3)]
        assert s1 == s2
        # transformers' own generate runs on the committee model
        out = engine.model.generate(torch.tensor([engine.encode("hello")]), max_new_tokens=4, do_sample=False)
        assert out.shape[1] == len(engine.encode("hello")) + 4
        with pytest.raises(PcmoeError, match="context"):
            next(engine.generate("hello", max_new_tokens=10_000))


def test_state_round_trip_plans_warm_swaps(tiny_lm):
    with pcmoe.load(tiny_lm, budget="50%experts", update_every=10_000, progress=False) as engine:
        state = engine.save_state()
        target = [sorted(set(range(8)) - set(m))[:len(m)] for m in state["members"]]
        state["members"] = target
        engine.load_state(json.loads(json.dumps(state)))
        for _ in range(12):
            list(engine.generate("hello", max_new_tokens=1))
        assert [sorted(c.members()) for c in engine.committees] == target


# -- clear errors --------------------------------------------------------------------------------


def test_too_small_budget_states_the_minimum(tiny_checkpoint):
    folder, _ = tiny_checkpoint("qwen3_moe")
    with pytest.raises(PcmoeError, match=r"below the minimum .* raise the budget to at least \d+ bytes"):
        pcmoe.load(folder, budget="10%", progress=False)
    with pytest.raises(PcmoeError, match="keeps every expert resident"):
        pcmoe.load(folder, budget="50%", policy="full", progress=False)
    with pytest.raises(PcmoeError, match="cannot read budget"):
        pcmoe.load(folder, budget="lots", progress=False)


def test_missing_folder_and_bad_options(tmp_path, tiny_checkpoint):
    with pytest.raises(PcmoeError, match="does not exist"):
        pcmoe.load(tmp_path / "nope")
    folder, _ = tiny_checkpoint("qwen3_moe")
    with pytest.raises(PcmoeError, match="unknown policy"):
        pcmoe.load(folder, policy="magic", progress=False)
    with pytest.raises(PcmoeError, match="unknown load option"):
        pcmoe.load(folder, frobnicate=True, progress=False)
    with pytest.raises(PcmoeError, match="static-frequency needs a routing profile"):
        pcmoe.load(folder, budget="50%experts", policy="static-frequency", progress=False)


def test_dense_and_unsupported_checkpoints(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    with pytest.raises(PcmoeError, match="dense model"):
        pcmoe.load(tmp_path / "dense")
    os.makedirs(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "jamba", "num_experts": 4}))
    (tmp_path / "other" / "model.safetensors").write_bytes(b"")
    with pytest.raises(PcmoeError, match="does not support"):
        pcmoe.load(tmp_path / "other")


def test_truncated_and_missing_files(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("qwen3_moe")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PcmoeError, match="truncated"):
        pcmoe.load(broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(PcmoeError, match="no \\*.safetensors"):
        pcmoe.load(broken)
    (broken / "config.json").unlink()
    with pytest.raises(PcmoeError, match="no config.json"):
        pcmoe.load(broken)


def test_stop_strings_are_never_streamed_in_part(tiny_lm):
    from pcmoe.generation import StopStrings

    assert StopStrings(["world"])._prefix_overlap("hello wor") == 3
    assert StopStrings(["xyz"])._prefix_overlap("hello") == 0
    with pcmoe.load(tiny_lm, policy="full", progress=False) as engine:
        steps = list(engine.generate("hello", max_new_tokens=12, stop_on_eos=False))
        text = "".join(s.text for s in steps)
        assert len(text) > 4
        stop = text[2:5]  # a stop string somewhere inside what the model generates greedily
        streamed = [s.text for s in engine.generate("hello", max_new_tokens=12, stop=[stop], stop_on_eos=False)]
        assert "".join(streamed) == text[:text.find(stop)]
        assert not any(stop[:1] and piece.endswith(stop[:2]) for piece in streamed[:-1] if len(stop) > 2)
        ids = [s.token_id for s in steps]
        by_id = list(engine.generate("hello", max_new_tokens=12, stop_token_ids=[ids[3]], stop_on_eos=False))
        assert by_id[-1].finish_reason == "stop" and len(by_id) == ids.index(ids[3]) + 1


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"])
@pytest.mark.parametrize("policy", ["full", "magnitude-keep"])
def test_lean_decoder_equals_transformers_forward(tiny_checkpoint, family, policy):
    """pcmoe/fast.py against its slow twin, the transformers forward of the same engine: a prompt in
    one step, then a chunk of 3 after the cache, then single tokens."""
    from pcmoe import fast

    folder, _ = tiny_checkpoint(family)
    budget = None if policy == "full" else "50%experts"
    with pcmoe.load(folder, budget=budget, policy=policy, progress=False) as engine:
        assert engine.fast is not None and fast.supports(engine.model)
        state = engine.new_state()
        assert "fast" in state
        pieces = [IDS[:, :6], IDS[:, 6:9], IDS[:, 9:10], IDS[:, 10:11], IDS[:, 11:12]]
        with torch.no_grad():
            lean = torch.cat([engine.forward(p, state) for p in pieces])
            reference = engine.model(input_ids=IDS).logits[0]
            last = engine.forward(IDS[:, :1], engine.new_state(), last_only=True)
    diff = (lean - reference).abs().max().item()
    assert lean.shape == reference.shape and diff <= 1e-5, f"{family}/{policy}: max abs diff {diff}"
    assert last.shape == (1, reference.shape[-1])


def test_lean_decoder_can_be_turned_off(tiny_checkpoint):
    folder, _ = tiny_checkpoint("qwen3_moe")
    with pcmoe.load(folder, policy="full", fast=False, progress=False) as engine:
        assert engine.fast is None and "cache" in engine.new_state()


def test_model_options_file_sets_defaults_below_plan_and_keywords(tiny_checkpoint, tmp_path):
    import json
    import shutil

    from pcmoe.formats import write_plan

    shared, _ = tiny_checkpoint("qwen3_moe")
    folder = tmp_path / "model"  # a copy: the fixture's checkpoint is shared with other tests
    shutil.copytree(shared, folder)
    (folder / "pcmoe_options.json").write_text(json.dumps(
        {"format": "pcmoe-options/1", "options": {"update_every": 3, "ema_decay": 0.7}}))
    with pcmoe.load(folder, budget="50%experts", progress=False) as engine:
        assert engine.options.update_every == 3 and engine.options.ema_decay == 0.7
    with pcmoe.load(folder, budget="50%experts", update_every=5, progress=False) as engine:
        assert engine.options.update_every == 5 and engine.options.ema_decay == 0.7
    write_plan(tmp_path / "plan.json", "qwen3_moe", [8, 8], [4, 4], options={"update_every": 4})
    with pcmoe.load(folder, plan=tmp_path / "plan.json", progress=False) as engine:
        assert engine.options.update_every == 4 and engine.options.ema_decay == 0.7
    (folder / "pcmoe_options.json").write_text('{"options": 1}')
    with pytest.raises(PcmoeError, match="pcmoe options file"):
        pcmoe.load(folder, budget="50%experts", progress=False)
    (folder / "pcmoe_options.json").write_text(json.dumps({"format": "pcmoe-options/1", "options": {"nope": 1}}))
    with pytest.raises(PcmoeError, match="unknown pcmoe_options.json option"):
        pcmoe.load(folder, budget="50%experts", progress=False)
