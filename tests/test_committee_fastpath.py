"""The committee's one-token decode shortcuts against their slow twins: the members list the
committee keeps against its mask, plan_swaps on Python floats against tensor indexing, the
lambda-free top-k order against the (-p, id) key, and the whole committee decode (tokens and
counters) with async swaps against sync ones."""

import random

import pytest
import torch

import pcmoe
from pcmoe.committee import LayerCommittee
from pcmoe.importance import plan_swaps, top_experts
from pcmoe.routing import softmax_topk_one


def _plan_swaps_twin(score, members, size, margin=0.0):
    """plan_swaps as it was, indexing the tensor per expert."""
    member_set = set(members)
    order = sorted(range(len(score)), key=lambda e: (-float(score[e]), e not in member_set, e))
    target = set(order[:size])
    incoming = [e for e in order if e in target and e not in member_set]
    outgoing = [e for e in reversed(order) if e in member_set and e not in target]
    swaps, free = [], size - len(members)
    for e in incoming:
        if float(score[e]) <= 0.0:
            break
        if free > 0:
            swaps.append((e, -1))
            free -= 1
            continue
        if not outgoing or float(score[e]) <= float(score[outgoing[0]]) * (1.0 + margin):
            break
        swaps.append((e, outgoing.pop(0)))
    return swaps


def test_member_list_follows_the_mask_through_every_change():
    rng = random.Random(0)
    c = LayerCommittee(num_experts=10, num_slots=6)
    for _ in range(300):
        members, free = c.members(), c.free_slots()
        outside = [e for e in range(10) if not c.is_member(e)]
        op = rng.choice(["install", "evict", "replace", "switch", "resize"])
        if op == "install" and free and outside:
            c.install(rng.choice(outside), free[0])
        elif op == "evict" and members:
            c.evict(rng.choice(members))
        elif op == "replace" and members and outside:
            c.replace(rng.choice(outside), rng.choice(members))
        elif op == "switch" and free and outside:
            c.reserve(free[0])
            c.switch(rng.choice(outside), rng.choice(members) if members else -1, free[0])
        elif op == "resize":
            slots = rng.randint(1, 8)
            c.resize(slots, rng.sample(members, min(len(members), slots, rng.randint(0, len(members)))))
        assert c.member_list == c.mask.tolist() == [s >= 0 for s in c.slot_list]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_plan_swaps_matches_its_tensor_indexing_twin(dtype):
    rng = random.Random(1)
    for _ in range(400):
        n = rng.randint(1, 12)
        # few distinct values: ties between members and candidates, zero scores
        score = torch.tensor([rng.choice([0.0, 0.5, 1.0, 1.05, 2.0, rng.random()]) for _ in range(n)], dtype=dtype)
        size = rng.randint(1, n)
        members = rng.sample(range(n), rng.randint(0, size))
        margin = rng.choice([0.0, 0.1])
        assert plan_swaps(score, members, size, margin) == _plan_swaps_twin(score, members, size, margin)
        assert top_experts(score, size) == sorted(sorted(range(n), key=lambda e: (-float(score[e]), e))[:size])


def test_topk_order_breaks_ties_to_the_lower_id_as_the_key_did():
    rng = random.Random(2)
    for _ in range(400):
        n = rng.randint(2, 12)
        values = [rng.choice([-1.0, 0.0, 0.0, 1.0, float("-inf"), rng.gauss(0, 1)]) for _ in range(n)]
        if max(values) == float("-inf"):
            values[0] = 0.0
        member = [rng.random() < 0.6 for _ in range(n)]
        member[rng.randrange(n)] = True
        for m in (None, member):
            for renorm in (True, False):
                idx, w, probs = softmax_topk_one(values, 2, True, m, renorm)
                if m is not None and renorm:
                    ranked = softmax_topk_one([v if keep else float("-inf") for v, keep in zip(values, m)],
                                              2, True)[2]
                else:
                    ranked = [p if m is None or m[e] else 0.0 for e, p in enumerate(probs)]
                order = sorted(range(n), key=lambda e: (-ranked[e], e))[:2]
                assert idx == [e if m is None or m[e] else -1 for e in order]


COUNTERS = ("choices", "hits", "exchanged", "skipped", "swaps", "updates", "swap_failures")


def _decode(folder, **options):
    with pcmoe.load(folder, budget="60%experts", policy="committee", update_every=2, margin=0.0,
                    progress=False, **options) as engine:
        steps = list(engine.generate(list(range(5, 40, 3)), max_new_tokens=24, stop_on_eos=False))
        stats = steps[-1].stats
        members = [c.members() for c in engine.committees]
        for c in engine.committees:
            assert c.member_list == c.mask.tolist()
        return [s.token_id for s in steps], {k: stats.get(k) for k in COUNTERS}, members


def test_committee_decode_async_equals_sync(tiny_checkpoint):
    folder, _ = tiny_checkpoint("qwen3_moe")
    tokens, counters, members = _decode(folder)
    assert counters["swaps"] > 0  # the committee changed while decoding
    assert (tokens, counters, members) == _decode(folder, synchronous=True)


def _softmax_topk_one_twin(logits, k, norm_topk, member=None, renorm=True):
    """softmax_topk_one as it was: two softmax passes for a masked route, the (-p, id) key."""
    import math

    def softmax(values):
        top = max(values)
        if top == float("-inf"):
            return [0.0] * len(values)
        exps = [math.exp(v - top) if v != float("-inf") else 0.0 for v in values]
        total = sum(exps)
        return [e / total for e in exps]

    probs_full = softmax(logits)
    if member is None:
        probs = probs_full
    elif renorm:
        probs = softmax([v if m else float("-inf") for v, m in zip(logits, member)])
    else:
        probs = [p if m else 0.0 for p, m in zip(probs_full, member)]
    order = sorted(range(len(probs)), key=lambda e: (-probs[e], e))[:k]
    idx = [e if member is None or member[e] else -1 for e in order]
    top = [probs[e] if i >= 0 else 0.0 for e, i in zip(order, idx)]
    if norm_topk:
        total = sum(top)
        top = [t / total for t in top] if total > 0 else top
    return idx, top, probs_full


def test_softmax_topk_one_matches_its_two_pass_twin_bit_for_bit():
    rng = random.Random(3)
    for _ in range(2000):
        n = rng.randint(1, 12)
        values = [rng.choice([-1.0, 0.0, 0.0, 2.5, float("-inf"), rng.gauss(0, 3), rng.gauss(0, 300)])
                  for _ in range(n)]
        member = [rng.random() < 0.6 for _ in range(n)]
        k = rng.randint(1, n)
        for m in (None, member, [False] * n):
            for renorm in (True, False):
                for norm in (True, False):
                    assert softmax_topk_one(values, k, norm, m, renorm) == \
                        _softmax_topk_one_twin(values, k, norm, m, renorm)
