"""The pure core: committee slot table, importance, swap planning and the amortised scheduler."""

import threading
import time

import pytest
import torch

from pcmoe.committee import LayerCommittee
from pcmoe.importance import ImportanceTracker, plan_swaps, top_experts
from pcmoe.scheduler import SwapScheduler

# -- committee -----------------------------------------------------------------------------------


def test_committee_switch_keeps_slots_consistent():
    c = LayerCommittee(num_experts=6, num_slots=3)
    c.install(4, 0)
    c.install(1, 1)
    assert c.members() == [4, 1] and c.free_slots() == [2]
    assert c.slots_of(torch.tensor([[4, 2, -1]])).tolist() == [[0, -1, -1]]
    c.reserve(2)
    assert c.free_slots() == []
    c.switch(incoming=5, outgoing=4, slot=2)
    assert sorted(c.members()) == [1, 5] and c.free_slots() == [0]
    assert c.mask.tolist() == [False, True, False, False, False, True]
    with pytest.raises(RuntimeError):
        c.install(3, 1)  # occupied


# -- importance ----------------------------------------------------------------------------------


def test_importance_is_paper_equation_one():
    norms = torch.tensor([1.0, 2.0, 3.0])
    t = ImportanceTracker(norms)
    x_norm = torch.tensor([2.0, 1.0])
    idx = torch.tensor([[0, 2], [2, -1]])
    w = torch.tensor([[0.75, 0.25], [1.0, 0.0]])
    t.accumulate(x_norm, idx, w)
    # expert 0: 2*0.75*1 = 1.5; expert 2: (2*0.25 + 1*1.0)*3 = 4.5; expert 1 never routed.
    assert t.close_window().tolist() == pytest.approx([1.5, 0.0, 4.5])
    assert t.counts.tolist() == [1, 0, 2]
    assert t.close_window().tolist() == [0, 0, 0]  # a new window starts empty


def test_importance_ema():
    t = ImportanceTracker(torch.ones(2), mode="ema", ema_decay=0.5)
    t.accumulate(torch.tensor([1.0]), torch.tensor([[0]]), torch.tensor([[1.0]]))
    assert t.close_window().tolist() == pytest.approx([0.5, 0.0])
    t.accumulate(torch.tensor([1.0]), torch.tensor([[1]]), torch.tensor([[2.0]]))
    assert t.close_window().tolist() == pytest.approx([0.25, 1.0])


def test_ema_prior_seeds_the_first_decision_but_not_a_restored_score():
    t = ImportanceTracker(torch.ones(2), mode="ema", ema_decay=0.5, prior=torch.tensor([1.0, 3.0]))
    t.accumulate(torch.tensor([1.0]), torch.tensor([[0]]), torch.tensor([[2.0]]))   # window [2, 0]
    # score 0 -> prior shares [0.25, 0.75] x window total 2, then the EMA step
    assert t.close_window().tolist() == pytest.approx([0.5 * 0.5 + 0.5 * 2.0, 0.5 * 1.5])
    restored = ImportanceTracker(torch.ones(2), mode="ema", ema_decay=0.5, prior=torch.tensor([1.0, 3.0]))
    restored.score = torch.tensor([4.0, 0.0], dtype=torch.float64)    # as Engine.load_state sets it
    restored.accumulate(torch.tensor([1.0]), torch.tensor([[0]]), torch.tensor([[2.0]]))
    assert restored.close_window().tolist() == pytest.approx([0.5 * 4.0 + 0.5 * 2.0, 0.0])


def test_plan_swaps_best_first_with_hysteresis():
    score = torch.tensor([5.0, 0.0, 4.0, 1.0, 3.0])
    assert plan_swaps(score, members=[1, 3], size=2) == [(0, 1), (2, 3)]
    # 3.0 vs member 2.9: within a 10 % margin, no swap; 4.0 beats 1.0 anyway.
    score = torch.tensor([2.9, 4.0, 3.0, 1.0])
    assert plan_swaps(score, members=[0, 3], size=2, margin=0.1) == [(1, 3)]
    assert plan_swaps(score, members=[0, 3], size=2, margin=0.0) == [(1, 3), (2, 0)]
    # Zero-score experts never come in, equal scores never swap.
    assert plan_swaps(torch.zeros(4), members=[0], size=1) == []
    assert plan_swaps(torch.tensor([1.0, 1.0]), members=[1], size=1) == []
    assert top_experts(torch.tensor([0.1, 0.9, 0.9, 0.5]), 2) == [1, 2]


# -- scheduler -----------------------------------------------------------------------------------


def make_scheduler(load, *, synchronous, bytes_per_step=100, update_every=1, unit="tokens", layers=2):
    committees, trackers = [], []
    for _ in range(layers):
        c = LayerCommittee(4, 3)
        c.install(0, 0)
        c.install(1, 1)
        committees.append(c)
        trackers.append(ImportanceTracker(torch.ones(4)))
    sched = SwapScheduler(committees, trackers, [2] * layers, [100] * layers, load, update_every=update_every,
                          unit=unit, bytes_per_step=bytes_per_step, synchronous=synchronous)
    return sched, committees, trackers


def want(trackers, experts):
    for t in trackers:
        t.accumulate(torch.ones(len(experts)), torch.tensor([[e] for e in experts]), torch.ones(len(experts), 1))


def test_switch_happens_one_step_after_issue():
    loads = []
    sched, committees, trackers = make_scheduler(lambda layer, e, slot: loads.append((layer, e, slot)) or True,
                                                 synchronous=True, update_every=2)
    sched.begin_step(tokens=2, new_input=True)            # step 0: nothing to plan yet
    want(trackers, [2, 2, 3])                              # experts 2 and 3 matter now
    sched.begin_step(tokens=1, new_input=False)           # update + issue loads of expert 2
    assert loads == [(0, 2, 2)]                            # 100 bytes per step: one expert
    assert committees[0].members() == [0, 1]               # not switched in yet
    sched.begin_step(tokens=1, new_input=False)           # apply layer 0, issue layer 1
    # members 0 and 1 tie at score 0: ties rank lower ids first, so the worst-ranked (1) goes out
    assert sorted(committees[0].members()) == [0, 2]
    assert loads[-1][0] == 1
    assert sched.stats.swaps == 1 and sched.stats.bytes_issued == 200


def test_allowance_accumulates_for_large_experts():
    loads = []
    sched, _, trackers = make_scheduler(lambda *a: loads.append(a) or True, synchronous=True, bytes_per_step=40,
                                        layers=1)
    sched.begin_step(1, True)
    want(trackers, [3])
    steps_until_load = 0
    while not loads:
        sched.begin_step(1, False)
        steps_until_load += 1
        assert steps_until_load < 10
    assert steps_until_load == 2  # 40 + 40 < 100 bytes, the third boundary has 120 >= 100 (cap 100)


def test_failed_load_keeps_old_member_and_frees_slot():
    sched, committees, trackers = make_scheduler(lambda *a: False, synchronous=True, layers=1)
    sched.begin_step(1, True)
    want(trackers, [3, 3])
    sched.begin_step(1, False)
    sched.begin_step(1, False)
    assert sorted(committees[0].members()) == [0, 1]
    assert committees[0].free_slots() == [2] and sched.stats.swap_failures == 1


def test_update_every_inputs():
    sched, _, trackers = make_scheduler(lambda *a: True, synchronous=True, update_every=2, unit="inputs")
    for new_input in (True, False, False, True, False):
        sched.begin_step(5, new_input)
    assert sched.stats.updates == 0
    sched.begin_step(5, True)  # the second input is complete
    assert sched.stats.updates == 1


def test_async_equals_sync_and_measures_stall():
    """The same importance sequence gives the same committee at every step in both modes, even
    when async loads are slow (then the main thread waits and the wait is counted as stall)."""
    def run(synchronous, delay):
        def load(layer, e, slot):
            time.sleep(delay)
            assert threading.current_thread() is not threading.main_thread() or synchronous
            return True
        sched, committees, trackers = make_scheduler(load, synchronous=synchronous, bytes_per_step=300)
        history = []
        for step in range(12):
            want(trackers, [(step // 3) % 4, (step // 3 + 1) % 4])
            sched.begin_step(1, step == 0)
            history.append([sorted(c.members()) for c in committees])
        sched.close()
        return history, sched.stats

    sync_hist, _ = run(True, 0.0)
    async_hist, st = run(False, 0.02)
    assert sync_hist == async_hist
    assert st.swaps > 2 and st.stall_s > 0  # loads slower than the (instant) steps: measured stall
    _, st_fast = run(False, 0.0)
    assert st_fast.swaps == st.swaps


def test_importance_survives_switching_inference_mode():
    """Windows made under torch.inference_mode and updated outside it (and back) stay usable."""
    tracker = ImportanceTracker(torch.ones(4))
    with torch.inference_mode():
        tracker.accumulate(torch.ones(2), torch.tensor([[0, 1], [1, 2]]), torch.ones(2, 2))
        tracker.close_window()
    with torch.no_grad():
        tracker.accumulate(torch.ones(1), torch.tensor([[3, 1]]), torch.ones(1, 2))
    tracker.accumulate_one(2.0, [0, -1], [0.5, 0.0])
    with torch.inference_mode():
        tracker.accumulate_one(1.0, [0, 1], [1.0, 1.0])
    assert tracker.window.tolist() == [2.0, 2.0, 0.0, 1.0]
    assert tracker.counts.tolist() == [3.0, 4.0, 1.0, 1.0]
