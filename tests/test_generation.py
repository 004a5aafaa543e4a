"""Generation and the runtime around it: exact on-demand at the model's own dtype, per-request
statistics, the step boundary on every path, long sequences, seq2seq, quantised swaps."""

from pathlib import Path

import pytest
import torch

import pcmoe
from pcmoe.generation import ContextError, fit_max_tokens

SHIPPED_LM = Path(__file__).resolve().parents[1] / "models" / "pcmoe-lm"


def _greedy(engine, prompt, n):
    return [s.token_id for s in engine.generate(prompt, max_new_tokens=n, stop_on_eos=False)]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "granitemoe"])
def test_on_demand_is_bit_identical_to_full_in_bfloat16(tiny_checkpoint, family):
    """'Exact' means the same bits: the same experts run and their outputs are combined in the same
    order whichever slots hold them, in prefill (rounds of loads) and in decode."""
    folder, _ = tiny_checkpoint(family)
    ids = list(range(3, 40, 3))
    runs = {}
    for policy, budget in (("full", None), ("on-demand", "30%experts")):
        with pcmoe.load(folder, budget=budget, policy=policy, dtype="bfloat16", progress=False) as engine:
            logits, state = engine.prefill(ids)
            steps = [logits]
            for t in (7, 19, 4, 55, 23):
                steps.append(engine.decode_step(state, t))
            runs[policy] = (torch.stack(steps), _greedy(engine, ids, 12), engine.stats()["misses"])
    assert runs["on-demand"][2] > 0
    assert torch.equal(runs["on-demand"][0], runs["full"][0])
    assert runs["on-demand"][1] == runs["full"][1]


@pytest.mark.skipif(not (SHIPPED_LM / "config.json").exists(), reason="the shipped LM is not in this checkout")
def test_shipped_lm_on_demand_generates_the_same_tokens_as_full():
    """Issue 11 #8: greedy 'import os' diverged after the first token in bfloat16."""
    outs = {}
    for policy, budget in (("full", None), ("on-demand", "50%experts")):
        with pcmoe.load(SHIPPED_LM, budget=budget, policy=policy, progress=False) as engine:
            assert engine.load_info["dtype"] == "bfloat16"
            outs[policy] = _greedy(engine, "import os", 24)
    assert outs["on-demand"] == outs["full"]


def test_per_request_statistics_are_that_requests_own(tiny_checkpoint):
    """Every router type: counts and router mass of two requests add up to the engine's totals, and
    each request's ratio comes from its own mass sums (DeepSeek's weights do not sum to 1)."""
    folder, _ = tiny_checkpoint("deepseek_v3")
    with pcmoe.load(folder, budget="50%experts", policy="committee", progress=False) as engine:
        a = list(engine.generate([5, 9, 33, 2], max_new_tokens=6, stop_on_eos=False))[-1].stats
        b = list(engine.generate([71, 4, 8, 100, 3, 12, 60], max_new_tokens=9, stop_on_eos=False))[-1].stats
        total = engine.stats()
    for key in ("choices", "hits", "misses", "exchanged", "skipped", "swaps", "bytes_read"):
        assert a[key] + b[key] == total[key], key
    assert a["mass_total"] + b["mass_total"] == pytest.approx(total["mass_total"])
    assert a["router_mass_outside"] == pytest.approx(a["mass_outside"] / a["mass_total"])
    assert b["router_mass_outside"] == pytest.approx(b["mass_outside"] / b["mass_total"])
    moe_layers = len(total["per_layer"])
    # each token of a request is routed once per MoE layer to top-2 experts
    assert b["choices"] == (7 + 9 - 1) * moe_layers * 2
    assert [row["choices"] for row in b["per_layer"]] == [(7 + 9 - 1) * 2] * moe_layers


def test_step_boundary_is_entered_once_per_pass_on_every_path(tiny_checkpoint):
    """The lean decoder, the transformers forward and a seq2seq encoder + decoder pass all reach
    the scheduler through the MoE blocks: one step per forward pass, every token counted."""
    folder, _ = tiny_checkpoint("qwen3_moe")
    with pcmoe.load(folder, budget="50%experts", update_every=10_000, progress=False) as engine:
        assert engine.fast is not None
        logits, state = engine.prefill([1, 2, 3, 4, 5])
        engine.decode_step(state, 6)
        assert (engine.scheduler.steps, engine.scheduler.units) == (2, 6)
        with torch.no_grad():
            engine.model(input_ids=torch.tensor([[1, 2, 3]]))        # the transformers forward
        assert (engine.scheduler.steps, engine.scheduler.units) == (3, 9)
    folder, _ = tiny_checkpoint("switch_transformers")
    with pcmoe.load(folder, budget="50%experts", update_every=10_000, progress=False) as engine:
        logits, state = engine.prefill([3, 4, 5, 6, 7, 8, 9])        # encoder (7 tokens) + first decoder pass
        assert engine.scheduler.steps == 1 and engine.scheduler.units == 7
        engine.decode_step(state, 11)
        assert engine.scheduler.steps == 2


def test_update_unit_inputs_counts_requests_not_passes(tiny_checkpoint):
    folder, _ = tiny_checkpoint("qwen3_moe")
    with pcmoe.load(folder, budget="50%experts", update_every=1000, update_unit="inputs", progress=False) as engine:
        for _ in range(3):
            list(engine.generate([1, 2, 3], max_new_tokens=5, stop_on_eos=False))
        assert engine.scheduler.units == 2   # the third input is complete only when the next begins


def test_seq2seq_generate_matches_transformers_greedy(tiny_checkpoint):
    folder, reference = tiny_checkpoint("switch_transformers")
    ids = [5, 17, 3, 99, 42, 8]
    with torch.no_grad():
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, min_new_tokens=8)
    with pcmoe.load(folder, policy="full", progress=False) as engine:
        got = _greedy(engine, ids, 8)
    assert got == expected[0, 1:].tolist()


def test_kv_cache_grows_past_its_first_capacity(tiny_lm):
    """The lean decoder's cache starts at 256 positions and doubles; the transformers forward (its
    slow twin) gives the same tokens over 300 positions."""
    prompt = list(range(3, 60))
    outs = []
    for fast in (True, False):
        with pcmoe.load(tiny_lm, policy="full", fast=fast, progress=False) as engine:
            assert (engine.fast is not None) == fast
            outs.append(_greedy(engine, prompt, 260))
    assert outs[0] == outs[1]


def test_quantised_committee_swaps_end_to_end(tiny_checkpoint):
    """int8 experts with swaps: after generation every slot holds the quantisation of its member's
    weights as read from disk, and outputs stay finite."""
    from pcmoe.moe import expert_buffer
    from pcmoe.quant import quantize_into

    folder, _ = tiny_checkpoint("qwen3_moe")
    with pcmoe.load(folder, budget="75%experts", policy="committee", quantize="int8", update_every=1,
                    margin=0.0, synchronous=True, progress=False) as engine:
        steps = list(engine.generate(list(range(5, 60, 2)), max_new_tokens=20, stop_on_eos=False))
        assert steps[-1].stats["swaps"] > 0
        for layer, (block, committee) in enumerate(zip(engine.blocks, engine.committees)):
            bank = block.experts
            for slot, expert in enumerate(committee.slot_to_expert):
                if expert < 0:
                    continue
                raw = expert_buffer(bank.kernel, bank.dtype)     # as the checkpoint holds it
                engine.store.read_source(layer, expert, raw)
                for name in bank.kernel.linear_weights:
                    held_q, held_s = bank.slot(slot)[name + ".q"], bank.slot(slot)[name + ".s"]
                    q, s = torch.empty_like(held_q), torch.empty_like(held_s)
                    quantize_into(raw[name], q, s, "int8")
                    assert torch.equal(q, held_q) and torch.equal(s, held_s)


def test_context_arithmetic():
    assert fit_max_tokens(10, 100) == 90
    assert fit_max_tokens(10, 100, default=16) == 16
    assert fit_max_tokens(10, None) == 256
    assert fit_max_tokens(10, 100, requested=200, clamp=True) == 90
    with pytest.raises(ContextError, match="at most 90") as e:
        fit_max_tokens(10, 100, requested=200)
    assert e.value.param == "max_tokens"
    with pytest.raises(ContextError, match="context is 10") as e:
        fit_max_tokens(10, 10)
    assert e.value.param == "prompt"


def test_plan_with_per_layer_precisions(tiny_checkpoint, tmp_path):
    """A plan may give each MoE layer its own expert precision; bytes and statistics follow."""
    from pcmoe.formats import write_plan

    folder, _ = tiny_checkpoint("qwen3_moe")
    plan = tmp_path / "plan.json"
    write_plan(plan, "qwen3_moe", [8, 8], [8, 4], precisions=["int8", "full"])
    with pcmoe.load(folder, policy="committee", plan=plan, progress=False) as engine:
        banks = [b.experts for b in engine.blocks]
        assert [b.quant for b in banks] == ["int8", None]
        st = engine.stats()
        assert [row["precision"] for row in st["per_layer"]] == ["int8", "full"]
        assert [row["resident_expert_bytes"] for row in st["per_layer"]] == \
            [b.slot_nbytes * n for b, n in zip(banks, [8, 4])]
        assert engine.model_bytes.expert[0] < engine.model_bytes.expert[1]
        list(engine.generate([1, 2, 3], max_new_tokens=3, stop_on_eos=False))
    write_plan(plan, "qwen3_moe", [8, 8], [8, 4], precisions=["int3", "full"])
    with pytest.raises(pcmoe.PcmoeError, match="'int3' is not one of full, int8, int4"):
        pcmoe.load(folder, plan=plan, progress=False)
