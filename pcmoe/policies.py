"""Serving policies: how each MoE layer routes tokens and runs experts under its resident set.

A controller sits in every CommitteeMoE block. All policies share the slot bank, the committee
(slot table + mask) and the statistics; they differ in routing and in what happens on a miss.

  full              all experts resident, the model's own routing (reference)
  committee         the paper: masked gating to a dynamic committee refreshed by swaps
  random-keep       masked gating to a fixed random subset (v1 "Random keep")
  magnitude-keep    masked gating to the fixed largest-||E_i|| subset (ACL "Pruning")
  static-frequency  masked gating to the fixed most-used subset of a profiling text
  on-demand         exact: an LRU cache of experts, misses loaded from disk before they run
  topk-reduce       all experts resident, each token keeps only its top-k' experts
"""

from __future__ import annotations

import time
from collections import OrderedDict

import torch

from pcmoe.committee import LayerCommittee
from pcmoe.importance import ImportanceTracker
from pcmoe.routing import GatingStats, Route, gate, gate_one, route_stats, softmax_topk_one

DYNAMIC_POLICIES = ("committee",)       # need spare slots and a scheduler
STATIC_KEEP_POLICIES = ("random-keep", "magnitude-keep", "static-frequency")
ALL_RESIDENT_POLICIES = ("full", "topk-reduce")


class LayerController:
    """Shared state of one layer; subclasses implement `forward`."""

    def __init__(self, committee: LayerCommittee, tracker: ImportanceTracker, renorm: bool = True,
                 track: bool = True):
        self.committee = committee
        self.tracker = tracker
        self.renorm = renorm
        self.track = track      # accumulate importance (dynamic committees, profiles, user state)
        self.stats = GatingStats()
        self.stall_s = 0.0

    def _select(self, block, batch_shape, k=None):
        return lambda logits, mask: block.family.select(block, logits, mask, self.renorm, batch_shape, k)

    def _track(self, x: torch.Tensor, full: Route) -> None:
        if self.track:
            self.tracker.accumulate(x.float().norm(dim=-1), full.idx, full.weights)

    def forward(self, block, x, logits, batch_shape) -> torch.Tensor:
        raise NotImplementedError


class MaskedGatingController(LayerController):
    """full, committee and the fixed-subset policies: route only to members (masked gating)."""

    def __init__(self, committee, tracker, renorm=True, strategy="exchange", tau=0.0, track=True):
        super().__init__(committee, tracker, renorm, track)
        self.strategy, self.tau = strategy, tau

    def forward(self, block, x, logits, batch_shape):
        if x.shape[0] == 1 and block.family.host_routing:
            return self._forward_one(block, x, logits)
        select = self._select(block, batch_shape)
        if self.committee.complete:  # nothing to mask: the model's own routing, no counting ops
            exe = full = select(logits, None)
            pairs = full.idx.numel()
            stats = GatingStats(choices=pairs, hits=pairs, mass_total=float(full.weights.sum()))
        else:
            exe, full, stats = gate(select, logits, self.committee.mask, self.strategy, self.tau)
        self.stats.add(stats)
        self._track(x, full)
        return block.experts(x, self.committee.slots_of(exe.idx), exe.weights)


    def _forward_one(self, block, x, logits):
        """One token, routed in Python numbers (routing.gate_one): the same decisions and weights as
        the tensor path, without a dozen tensor ops per layer."""
        family, committee = block.family, self.committee
        values = logits[0].tolist()
        if committee.complete:
            idx, weights, _ = softmax_topk_one(values, family.top_k, family.renormalises)
            f_idx, f_w = idx, weights
            stats = GatingStats(choices=sum(e >= 0 for e in idx), mass_total=sum(weights))
            stats.hits = stats.choices
        else:
            member = [s >= 0 for s in committee.slot_list]
            idx, weights, f_idx, f_w, stats = gate_one(values, family.top_k, family.renormalises, member,
                                                       self.renorm, self.strategy, self.tau)
        self.stats.add(stats)
        if self.track:
            self.tracker.accumulate_one(float(torch.linalg.vector_norm(x, dtype=torch.float32)), f_idx, f_w)
        slot_of = committee.slot_list
        return block.experts.forward_one(x, [slot_of[e] if e >= 0 else -1 for e in idx], weights)


class TopkReduceController(LayerController):
    """Every token keeps its top-k' experts, weighted by the model's own rule over those k'."""

    def __init__(self, committee, tracker, k: int, track=False):
        super().__init__(committee, tracker, track=track)
        self.k = k

    def forward(self, block, x, logits, batch_shape):
        full = self._select(block, batch_shape)(logits, None)
        self._track(x, full)
        kept = self._select(block, batch_shape, self.k)(logits, None)
        stats, _ = route_stats(full, None)
        stats.skipped = stats.choices - int((kept.idx >= 0).sum())
        self.stats.add(stats)
        return block.experts(x, self.committee.slots_of(kept.idx), kept.weights)


class OnDemandController(LayerController):
    """Exact: the model's own routing; a miss evicts the least recently used expert of the layer
    and loads the needed one from disk before it runs (time counted as stall)."""

    def __init__(self, committee, tracker, load, layer: int, track=False):
        super().__init__(committee, tracker, track=track)
        self.load = load     # load(layer, expert, slot) -> bool
        self.layer = layer
        self.lru: OrderedDict[int, None] = OrderedDict((e, None) for e in committee.members())
        self.failed = 0

    def forward(self, block, x, logits, batch_shape):
        full = self._select(block, batch_shape)(logits, None)
        self._track(x, full)
        stats, miss = route_stats(full, self.committee.mask)
        self.stats.add(stats)
        resident = (full.idx >= 0) & ~miss
        slots = self.committee.slots_of(full.idx)                 # -1 for misses: computed below
        y = block.experts(x, slots, full.weights)
        for e in torch.unique(full.idx[resident]).tolist():
            self.lru.move_to_end(e)
        for e in torch.unique(full.idx[miss]).tolist():
            free = self.committee.free_slots()
            victim = None
            if free:
                slot = free[0]
            else:
                victim, _ = self.lru.popitem(last=False)          # its tokens were computed above
                slot = self.committee.evict(victim)
            t0 = time.perf_counter()
            ok = self._load(e, slot)
            if not ok and victim is not None and self._load(victim, slot):
                self.committee.install(victim, slot)              # the failed read overwrote it: restore
                self.lru[victim] = None
                self.lru.move_to_end(victim, last=False)
            self.stall_s += time.perf_counter() - t0
            if not ok:  # serving goes on without this expert's contribution
                self.failed += 1
                self.stats.skipped += int((full.idx == e).sum())
                continue
            self.committee.install(e, slot)
            self.lru[e] = None
            y = y + block.experts(x, torch.where(full.idx == e, slot, -1), full.weights)
        return y

    def _load(self, expert: int, slot: int) -> bool:
        try:
            return bool(self.load(self.layer, expert, slot))
        except Exception:  # the store retried I/O errors; anything else is a failed load too
            return False
