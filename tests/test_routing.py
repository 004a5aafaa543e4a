"""Routing rules and masked gating against closed-form values on hand-built logits."""

import math

import pytest
import torch

from pcmoe.routing import gate, sigmoid_group_topk, softmax_topk, sparsemixer_top2, switch_top1, topk_softmax

# One token, four experts with probabilities 0.5, 0.3, 0.15, 0.05; expert 0 is not resident.
P = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
LOGITS = P.log()
MASK = torch.tensor([False, True, True, True])


def as_dict(route):
    return {int(i): round(float(w), 6) for i, w in zip(route.idx[0], route.weights[0]) if i >= 0}


def test_softmax_topk_unmasked_matches_definition():
    assert as_dict(softmax_topk(LOGITS, 2, norm_topk=False)) == {0: 0.5, 1: 0.3}
    assert as_dict(softmax_topk(LOGITS, 2, norm_topk=True)) == {0: 0.625, 1: 0.375}


@pytest.mark.parametrize("norm, renorm, expected", [
    (False, True, {1: 0.6, 2: 0.3}),         # option A: softmax over members 0.3/0.5, 0.15/0.5
    (False, False, {1: 0.3, 2: 0.15}),       # option B: the full-softmax probabilities
    (True, True, {1: 0.666667, 2: 0.333333}),  # A == B when the router renormalises over k
    (True, False, {1: 0.666667, 2: 0.333333}),
])
def test_masked_softmax_topk(norm, renorm, expected):
    assert as_dict(softmax_topk(LOGITS, 2, norm, MASK, renorm)) == expected


def test_fewer_members_than_k_leaves_empty_choices():
    route = softmax_topk(LOGITS, 2, True, torch.tensor([False, False, True, False]))
    assert route.idx.tolist() == [[2, -1]]
    assert route.weights.tolist() == [[1.0, 0.0]]


def select_olmoe_style(logits, mask):
    return softmax_topk(logits, 2, False, mask, True)


def test_gate_exchange_and_stats():
    exe, full, st = gate(select_olmoe_style, LOGITS, MASK, "exchange")
    assert as_dict(full) == {0: 0.5, 1: 0.3}
    assert as_dict(exe) == {1: 0.6, 2: 0.3}
    assert (st.choices, st.hits, st.exchanged, st.skipped) == (2, 1, 1, 0)
    assert st.mass_outside / st.mass_total == pytest.approx(0.5 / 0.8)


def test_gate_skip_keeps_original_weights_of_members():
    exe, _, st = gate(select_olmoe_style, LOGITS, MASK, "skip")
    assert as_dict(exe) == {1: 0.3}
    assert (st.exchanged, st.skipped) == (0, 1)


@pytest.mark.parametrize("tau, expected, exchanged", [(0.2, {1: 0.3}, 0), (0.1, {1: 0.6, 2: 0.3}, 1)])
def test_gate_hybrid_skips_weak_substitutes(tau, expected, exchanged):
    # The substitute (expert 2) has unmasked gate 0.15: exchanged above tau; below it the token is served as
    # skip serves it (the member keeps its original weight).
    exe, _, st = gate(select_olmoe_style, LOGITS, MASK, "hybrid", tau)
    assert as_dict(exe) == expected
    assert st.exchanged == exchanged and st.skipped == 1 - exchanged


@pytest.mark.parametrize("strategy", ["exchange", "skip", "hybrid"])
def test_gate_full_committee_is_the_unmasked_route(strategy):
    exe, full, st = gate(select_olmoe_style, LOGITS, torch.ones(4, dtype=torch.bool), strategy)
    assert torch.equal(exe.idx, full.idx) and torch.allclose(exe.weights, full.weights)
    assert st.hits == st.choices == 2 and st.mass_outside == 0


def test_unknown_strategy_is_an_error():
    with pytest.raises(ValueError, match="strategy"):
        gate(select_olmoe_style, LOGITS, MASK, "teleport")


def test_gpt_oss_softmax_over_chosen_logits():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    route = topk_softmax(logits, 2, MASK)
    z = math.exp(2.0) + math.exp(1.0)
    assert as_dict(route) == {1: round(math.exp(2.0) / z, 6), 2: round(math.exp(1.0) / z, 6)}


def test_switch_top1_capacity_and_mask():
    logits = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    route = switch_top1(logits, (1, 3), capacity=1)
    assert route.idx[:, 0].tolist() == [0, -1, 1]  # the second token overflows expert 0
    p = torch.softmax(logits[0], 0)
    masked = switch_top1(logits, (1, 3), capacity=8, mask=torch.tensor([False, True, True]), renorm=True)
    assert masked.idx[0, 0] == 1
    assert masked.weights[0, 0] == pytest.approx(0.5)                  # renormalised over members 1, 2
    original = switch_top1(logits, (1, 3), capacity=8, mask=torch.tensor([False, True, True]), renorm=False)
    assert original.weights[0, 0] == pytest.approx(float(p[1]))


def test_sigmoid_group_topk_masks_before_group_choice():
    # 4 experts in 2 groups {0,1} {2,3}; one group is chosen per token, then top-2 inside it.
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]])
    bias = torch.zeros(4)
    route = sigmoid_group_topk(logits, bias, 2, 2, 1, norm_topk=False, scale=1.0)
    assert sorted(route.idx[0].tolist()) == [0, 1]
    # With group {0,1} absent the other group must be chosen even though its scores are lower.
    masked = sigmoid_group_topk(logits, bias, 2, 2, 1, False, 1.0, torch.tensor([False, False, True, True]))
    assert sorted(masked.idx[0].tolist()) == [2, 3]
    assert masked.weights[0].sort().values.tolist() == pytest.approx(torch.tensor([-1.0, 0.0]).sigmoid().tolist())
    # A group with a single member still competes.
    single = sigmoid_group_topk(logits, bias, 2, 2, 1, False, 1.0, torch.tensor([True, False, True, True]))
    assert single.idx[0].tolist().count(0) == 1


def test_sparsemixer_masked_and_single_member():
    logits = torch.tensor([[3.0, 2.9, 0.0, -2.0]])
    route = sparsemixer_top2(logits, 0.01, MASK)
    assert route.idx[0].tolist() == [1, 2]
    alone = sparsemixer_top2(logits, 0.01, torch.tensor([False, False, True, False]))
    assert alone.idx[0].tolist() == [2, -1] and alone.weights[0, 1] == 0


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("strategy, tau", [("exchange", 0.0), ("skip", 0.0), ("hybrid", 0.08)])
@pytest.mark.parametrize("N, k, members", [(8, 2, 3), (16, 2, 8), (16, 4, 2), (6, 1, 3), (8, 2, 8)])
def test_single_token_routing_equals_the_tensor_path(norm, renorm, strategy, tau, N, k, members):
    """routing.gate_one (Python numbers, batch-1 decode) against gate + softmax_topk (tensors)."""
    from pcmoe.routing import gate_one, softmax_topk_one

    gen = torch.Generator().manual_seed(N * 100 + k * 10 + members)
    for trial in range(20):
        logits = torch.randn(1, N, generator=gen) * 2
        mask = torch.zeros(N, dtype=torch.bool)
        mask[torch.randperm(N, generator=gen)[:members]] = True
        exe, full, st = gate(lambda lg, m: softmax_topk(lg, k, norm, m, renorm), logits, mask, strategy, tau)
        route_one = lambda v, m: softmax_topk_one(v, k, norm, m, renorm)  # noqa: E731
        e_idx, e_w, f_idx, f_w, st1 = gate_one(logits[0].tolist(), route_one, mask.tolist(), strategy, tau)
        assert e_idx == exe.idx[0].tolist() and f_idx == full.idx[0].tolist(), trial
        assert e_w == pytest.approx(exe.weights[0].tolist(), abs=1e-6)
        assert f_w == pytest.approx(full.weights[0].tolist(), abs=1e-6)
        assert (st1.choices, st1.hits, st1.exchanged, st1.skipped) == (st.choices, st.hits, st.exchanged, st.skipped)
        assert st1.mass_outside == pytest.approx(st.mass_outside, abs=1e-6)
