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
from pcmoe.routing import GatingStats, Route, gate, gate_one, route_stats

MISS_ACTIONS = ("shadow", "wait", "exchange", "skip")   # what a (token, expert) miss can get
COMPUTED = ("shadow", "wait")                            # ... of which computed from the missing expert
DYNAMIC_POLICIES = ("committee",)       # refreshed by swaps: a scheduler (and staging buffers or spare slots)
ALL_RESIDENT_POLICIES = ("full", "topk-reduce")


class LayerController:
    """Shared state of one layer; subclasses implement `forward`. A controller gets the layer's
    bound routing rule (models.BoundRouter) at construction; forward(x, logits, experts, batch)
    returns the layer's expert output [T, H] computed by the slot bank `experts`."""

    def __init__(self, committee: LayerCommittee, tracker: ImportanceTracker, router, track: bool = True):
        self.committee = committee
        self.tracker = tracker
        self.router = router
        self.track = track      # accumulate importance (dynamic committees, profiles, user state)
        self.stats = GatingStats()
        self.stall_s = 0.0

    def _track(self, x: torch.Tensor, full: Route) -> None:
        if self.track:
            self.tracker.accumulate(x.float().norm(dim=-1), full.idx, full.weights)

    def _track_one(self, x: torch.Tensor, idx: list[int], weights: list[float]) -> None:
        if self.track:
            acc = None if x.dtype == torch.float64 else torch.float32  # at least float32, never narrowing
            self.tracker.accumulate_one(float(torch.linalg.vector_norm(x, dtype=acc)), idx, weights)

    def forward(self, x, logits, experts, batch) -> torch.Tensor:
        raise NotImplementedError


class MaskedGatingController(LayerController):
    """full, committee and the fixed-subset policies: route only to members (masked gating).
    With a `chooser` (shadow experts, pcmoe/shadow.py) each miss is answered by the chooser's action."""

    def __init__(self, committee, tracker, router, strategy="exchange", tau=0.0, track=True, chooser=None):
        super().__init__(committee, tracker, router, track)
        self.strategy, self.tau = strategy, tau
        self.chooser = chooser

    def forward(self, x, logits, experts, batch):
        if self.chooser is not None and not self.committee.complete:
            self.chooser.follow(self.committee, self.tracker.score)
            return self._forward_chosen(x, logits, experts, batch)
        if x.shape[0] == 1 and self.router.route_one is not None:
            return self._forward_one(x, logits, experts)
        route = lambda lg, mask: self.router.route(lg, mask, batch)  # noqa: E731
        if self.committee.complete:  # nothing to mask: the model's own routing, no counting ops
            exe = full = route(logits, None)
            pairs = full.idx.numel()
            stats = GatingStats(choices=pairs, hits=pairs, mass_total=float(full.weights.sum()))
        else:
            exe, full, stats = gate(route, logits, self.committee.mask, self.strategy, self.tau)
        self.stats.add(stats)
        self._track(x, full)
        return experts(x, self.committee.slots_of(exe.idx), exe.weights)

    def _forward_one(self, x, logits, experts):
        """One token, routed in Python numbers (routing.gate_one): the same decisions and weights as
        the tensor path, without a dozen tensor ops per layer."""
        committee = self.committee
        values = logits[0].tolist()
        if committee.complete:
            idx, weights, _ = self.router.route_one(values, None)
            f_idx, f_w = idx, weights
            stats = GatingStats(choices=sum(e >= 0 for e in idx), mass_total=sum(weights))
            stats.hits = stats.choices
        else:
            # committee.member_list: the members as Python bools, kept by the committee (not rebuilt per token)
            idx, weights, f_idx, f_w, stats = gate_one(values, self.router.route_one, committee.member_list,
                                                       self.strategy, self.tau)
        self.stats.add(stats)
        self._track_one(x, f_idx, f_w)
        slot_of = committee.slot_list
        return experts.forward_one(x, [slot_of[e] if e >= 0 else -1 for e in idx], weights)


    def _forward_chosen_one(self, x, logits, experts):
        """_forward_chosen for one token, in Python numbers (the same decisions)."""
        chooser, committee = self.chooser, self.committee
        slot_of = committee.slot_list
        values = logits[0].tolist()
        f_idx, f_w, _ = self.router.route_one(values, None)
        plan = chooser.plan(f_idx, f_w, slot_of)
        extra = [e for e, a in zip(f_idx, plan) if a in COMPUTED]
        if extra and all(a is None or a in COMPUTED for a in plan):   # every miss computed: the own route
            idx, weights = f_idx, f_w
            stats = GatingStats(choices=sum(e >= 0 for e in f_idx), mass_total=sum(f_w),
                                mass_outside=sum(w for e, w in zip(f_idx, f_w) if e >= 0 and slot_of[e] < 0))
            stats.hits = stats.choices - sum(1 for e in f_idx if e >= 0 and slot_of[e] < 0)
        else:
            member = [s >= 0 for s in slot_of]
            for e in extra:
                member[e] = True
            idx, weights, _, _, stats = gate_one(values, self.router.route_one, member, chooser.strategy_of(plan),
                                                 self.tau)
            n_extra = len(set(extra))  # computed misses counted as hits by the extended gating
            stats.hits -= n_extra
            stats.mass_outside += sum(w for e, w in zip(f_idx, f_w) if e in extra)
        self.stats.add(stats)
        self._track_one(x, f_idx, f_w)
        computed = {e: a for e, a in zip(f_idx, plan) if a in COMPUTED}
        return chooser.compute(x, [idx], [weights], [computed], experts, committee)

    def _forward_chosen(self, x, logits, experts, batch):
        """Misses answered per (token, expert) by the chooser (MissChooser.plan). A token none of
        whose misses is computed (shadow / exact load) is gated exactly as without shadows; one
        with every miss computed keeps the model's own route; otherwise the computed misses count
        as members and the others are dropped as MissChooser.strategy_of says."""
        if x.shape[0] == 1 and self.router.route_one is not None:
            return self._forward_chosen_one(x, logits, experts)
        chooser, committee = self.chooser, self.committee
        T = x.shape[0]
        full = self.router.route(logits, None, batch)
        full_idx, full_w = full.idx.tolist(), full.weights.float().tolist()
        slot_of = committee.slot_list
        plans = [chooser.plan(idx, w, slot_of) for idx, w in zip(full_idx, full_w)]   # per token, per choice
        # tokens grouped by (their computed misses, strategy): one gating per group
        groups: dict[tuple, list[int]] = {}
        exe_idx, exe_w = [None] * T, [None] * T
        dropped = 0
        for t, (idx, plan) in enumerate(zip(full_idx, plans)):
            extra = tuple(sorted({e for e, a in zip(idx, plan) if a in COMPUTED}))
            if extra and all(a is None or a in COMPUTED for a in plan):   # every miss computed: own route
                exe_idx[t], exe_w[t] = full_idx[t], full_w[t]
                continue
            strategy = chooser.strategy_of(plan)
            if strategy == "skip":  # gate()'s skip, token by token: the own route without the dropped misses
                keep = [e >= 0 and (slot_of[e] >= 0 or e in extra) for e in idx]
                exe_idx[t] = [e if k else -1 for e, k in zip(idx, keep)]
                exe_w[t] = [w if k else 0.0 for w, k in zip(full_w[t], keep)]
                dropped += sum(1 for e, k in zip(idx, keep) if e >= 0 and not k)
                continue
            groups.setdefault((extra, strategy), []).append(t)
        stats = GatingStats(skipped=dropped)
        route = lambda lg, m: self.router.route(lg, m, batch)  # noqa: E731
        for (extra, strategy), rows in groups.items():
            member = [s >= 0 for s in slot_of]
            for e in extra:
                member[e] = True
            # gated over all tokens (a rule may couple them: Switch's per-sequence capacity), the
            # routes kept for this group's tokens and counted as gate() counts them
            exe, _, _ = gate(route, logits, torch.tensor(member), strategy, self.tau)
            for r in rows:
                exe_idx[r], exe_w[r] = exe.idx[r].tolist(), exe.weights[r].float().tolist()
                chosen = set(full_idx[r])
                stats.exchanged += sum(1 for e in exe_idx[r] if e >= 0 and e not in chosen)
                stats.skipped += max(0, sum(e >= 0 for e in full_idx[r]) - sum(e >= 0 for e in exe_idx[r]))
        for idx, w in zip(full_idx, full_w):  # hits and mass against the committee itself
            stats.choices += sum(e >= 0 for e in idx)
            stats.hits += sum(1 for e in idx if e >= 0 and slot_of[e] >= 0)
            stats.mass_total += sum(w)
            stats.mass_outside += sum(v for e, v in zip(idx, w) if e >= 0 and slot_of[e] < 0)
        self.stats.add(stats)
        self._track(x, full)  # importance follows the unmasked route
        computed = [{e: a for e, a in zip(idx, plan) if a in COMPUTED} for idx, plan in zip(full_idx, plans)]
        return chooser.compute(x, exe_idx, exe_w, computed, experts, committee)


class MissChooser:
    """Per (token, expert) miss: compute its shadow, wait for an exact load, or drop it to the
    layer's strategy (exchange / skip / hybrid), by the smallest expected cost

        cost(action) = router weight x error[action] + time_cost x ms[action]

    error: the layer's measured relative output error of the answer (shadow: measured on profiling
    tokens, pcmoe.shadow.measure; wait: 0; drop: the measured error of the strategy's answer, 1 for
    a skip); ms: the milliseconds the answer adds to the step (the shadow's compute, the load).
    `force` makes one action the answer wherever it is available. `wait_above`: waiting is an
    option only for choices whose router weight reaches it (None = never wait)."""

    def __init__(self, layer: int, shadows, errors: dict, ms: dict, strategy: str, *, time_cost: float = 0.0,
                 force: str | None = None, wait_above: float | None = None, load_exact=None, exact_kernel=None):
        self.layer = layer
        self.shadows = shadows            # shadow.ShadowBank or None
        self.errors = dict(errors)        # action -> relative output error (this layer)
        self.ms = dict(ms)                # action -> milliseconds added per answer
        self.strategy = strategy
        self.time_cost = time_cost
        self.force = force
        self.wait_above = wait_above
        self.load_exact = load_exact      # load_exact(layer, expert) -> weights dict or None (failed)
        self.exact_kernel = exact_kernel
        self.source = None                # source(expert) -> a made shadow (the cache), for demoted members
        self._seen = None                 # the committee's slot table when the shadow rows last followed it
        self.reset()

    def follow(self, committee, score) -> None:
        """After swaps: the rows of experts promoted into the committee go to demoted ones (the most
        important first, by `score`), made from the cache; a row with no demoted taker stays."""
        seen = tuple(committee.slot_to_expert)
        if seen == self._seen or self.shadows is None or self.source is None:
            return
        self._seen = seen
        bank = self.shadows
        promoted = [e for e in bank.experts if committee.is_member(e)]
        if not promoted:
            return
        wanting = sorted((e for e in range(len(bank.row_of)) if bank.row_of[e] < 0 and not committee.is_member(e)),
                         key=lambda e: (-float(score[e]), e))
        for old, new in zip(promoted, wanting):
            t0 = time.perf_counter()
            state = self.source(new)
            self.stall_s += time.perf_counter() - t0   # a read of the cache, between two forwards
            if state is not None:
                bank.retarget(old, new, state)
                self.retargets += 1

    def reset(self) -> None:
        self.counts = dict.fromkeys(MISS_ACTIONS, 0)    # answers given, per action
        self.retargets = 0                              # shadow rows handed to demoted members
        self.stall_s = 0.0                              # waiting for exact loads

    def _drop(self) -> str:
        return "skip" if self.strategy == "skip" else "exchange"

    def choose(self, expert: int, weight: float) -> str:
        options = [self._drop()] if self.force in (None, self._drop()) else ["exchange", "skip"]
        if self.shadows is not None and self.shadows.has(expert):
            options.append("shadow")
        if self.load_exact is not None and self.wait_above is not None and weight >= self.wait_above:
            options.append("wait")
        if self.force in options:
            return self.force
        return min(options, key=self._cost(weight))

    def _cost(self, weight: float):
        return lambda a: (weight * self.errors.get(a, 1.0) + self.time_cost * self.ms.get(a, 0.0),
                          MISS_ACTIONS.index(a))

    def plan(self, idx: list[int], weights: list[float], slot_of: list[int]) -> list:
        """One token: the action for each choice (None = a hit or no expert), counted."""
        out = []
        for e, w in zip(idx, weights):
            if e < 0 or slot_of[e] >= 0:
                out.append(None)
                continue
            a = self.choose(e, w)
            self.counts[a] += 1
            out.append(a)
        return out

    def strategy_of(self, plan: list) -> str:
        """How a token's dropped misses are gated. A token with a computed miss (shadow, exact
        load) skips the others unless the layer's measured exchange error is below a skip's (1):
        beside a real answer a substitute adds more error than it recovers (the measured proxy
        is 1.02-1.18 on the shipped LM; ppl at 12 MB 20.1 skipping vs 22.8 exchanging). A token
        without one is gated as without shadows: skip if every drop chose skip, else the strategy."""
        if any(a in COMPUTED for a in plan):
            return self.strategy if self.errors.get("exchange", 1.0) < self.errors.get("skip", 1.0) else "skip"
        if any(a == "exchange" for a in plan):
            return self.strategy
        return "skip" if any(a == "skip" for a in plan) else self.strategy

    def _missing_output(self, x: torch.Tensor, expert: int, action: str) -> torch.Tensor | None:
        """The output [T, H] of a non-member for the rows x [T, H]: its shadow or its exact weights."""
        if action == "shadow":
            return self.shadows.forward_one(x, expert)
        t0 = time.perf_counter()
        weights = self.load_exact(self.layer, expert)
        self.stall_s += time.perf_counter() - t0
        return None if weights is None else self.exact_kernel(x, weights)

    def compute(self, x, exe_idx, exe_w, computed, experts, committee) -> torch.Tensor:
        """The layer output [T, H]: members from the slot bank, computed misses (computed[t]:
        expert -> action) from shadows or exact loads, combined in choice order."""
        slot_of = committee.slot_list
        if x.shape[0] == 1:
            idx, w = exe_idx[0], exe_w[0]
            slots = [slot_of[e] if e >= 0 and slot_of[e] >= 0 else -1 for e in idx]
            if not computed[0]:  # no miss computed: exactly the path without shadows
                return experts.forward_one(x, slots, w)
            ys = experts.outputs_one(x, slots)
            for j, e in enumerate(idx):
                if e < 0 or slots[j] >= 0:
                    continue
                row = experts.output_row(j)   # native bank: the computed miss joins its native combine
                if row is not None and computed[0][e] == "shadow":
                    ys[j] = self.shadows.forward_into(x, e, row)
                    continue
                y = self._missing_output(x, e, computed[0][e])
                if y is not None and row is not None:
                    y = row.copy_(y.reshape(-1))
                ys[j] = y
            return experts.combine_one(x, ys, [wj if y is not None else 0.0 for wj, y in zip(w, ys)])
        idx = torch.tensor(exe_idx)                                          # [T, k]
        weights = torch.tensor(exe_w, dtype=torch.float32)                   # [T, k]
        ys = experts.outputs(x, committee.slots_of(idx))                     # [T, k, H]
        pairs: dict[tuple[int, str], list[tuple[int, int]]] = {}
        for t, row in enumerate(exe_idx):
            for j, e in enumerate(row):
                if e >= 0 and slot_of[e] < 0:
                    pairs.setdefault((e, computed[t][e]), []).append((t, j))
        for (e, a), where in pairs.items():
            ts = torch.tensor([t for t, _ in where])
            js = torch.tensor([j for _, j in where])
            y = self._missing_output(x[ts], e, a)
            if y is None:
                weights[ts, js] = 0.0
            else:
                ys[ts, js] = y.to(ys.dtype)
        return experts.combine(ys, weights)


class TopkReduceController(LayerController):
    """Every token keeps its top-k' experts, weighted by the model's own rule over those k'
    (`reduced`: the same family rule bound with k')."""

    def __init__(self, committee, tracker, router, reduced, track=False):
        super().__init__(committee, tracker, router, track)
        self.reduced = reduced

    def forward(self, x, logits, experts, batch):
        full = self.router.route(logits, None, batch)
        self._track(x, full)
        kept = self.reduced.route(logits, None, batch)
        stats, _ = route_stats(full, None)
        stats.skipped = stats.choices - int((kept.idx >= 0).sum())
        self.stats.add(stats)
        return experts(x, self.committee.slots_of(kept.idx), kept.weights)


class OnDemandController(LayerController):
    """Exact: the model's own routing; missing experts are loaded from disk before they run, into
    free slots or those of the least recently used experts this step does not need (the wait is
    counted as stall). The outputs are combined exactly as the all-resident path combines them,
    so on-demand gives full's bits at every dtype; a step needing more experts than the layer has
    slots runs in rounds."""

    def __init__(self, committee, tracker, router, load, layer: int, track=False):
        super().__init__(committee, tracker, router, track)
        self.load = load     # load(layer, expert, slot) -> bool
        self.layer = layer
        self.lru: OrderedDict[int, None] = OrderedDict()  # resident experts, least recently used first
        self.failed = 0

    def forward(self, x, logits, experts, batch):
        if x.shape[0] == 1:  # one token: Python lists, routed and combined as full's decode does
            if self.router.route_one is not None:
                idx, weights, _ = self.router.route_one(logits[0].tolist(), None)
                self._track_one(x, idx, weights)
            else:
                full = self.router.route(logits, None, batch)
                self._track(x, full)
                idx, weights = full.idx[0].tolist(), full.weights[0].tolist()
            needed = [e for e in idx if e >= 0]
        else:
            full = self.router.route(logits, None, batch)
            self._track(x, full)
            idx, weights = full.idx, full.weights
            needed = torch.unique(full.idx[full.idx >= 0]).tolist()
        self.stats.add(self._count(idx, weights, set(needed)))
        ys, computed, lost = None, set(), set()
        while True:
            pending = [e for e in dict.fromkeys(needed) if e not in computed and e not in lost]
            slot_of = self.committee.slot_list
            resident = [e for e in pending if slot_of[e] >= 0]
            for e in pending:
                if slot_of[e] >= 0:
                    continue
                room = self._make_room(set(resident))
                if room is None:
                    break  # every slot holds an expert this round computes: the rest next round
                if self._fetch(e, *room):
                    resident.append(e)
                else:
                    lost.add(e)
            if not resident:
                break
            for e in resident:
                self.lru[e] = None
                self.lru.move_to_end(e)
            ys = self._outputs(x, idx, set(resident), experts, ys)
            computed.update(resident)
        if lost:
            self.stats.skipped += sum(1 for e in _flat(idx) if e in lost)
        if isinstance(idx, list):
            keep = [w if e in computed else 0.0 for e, w in zip(idx, weights)]
            return experts.combine_one(x, ys if ys is not None else [None] * len(idx), keep)
        kept = weights.masked_fill(~_isin(idx, computed), 0.0)
        return experts.combine(ys if ys is not None else experts.outputs(x, torch.full_like(idx, -1)), kept)

    def _outputs(self, x, idx, ready: set[int], experts, into):
        """Expert outputs of the choices whose expert is in `ready` (all resident now)."""
        slot_of = self.committee.slot_list
        if isinstance(idx, list):
            return experts.outputs_one(x, [slot_of[e] if e in ready else -1 for e in idx], into)
        slots = self.committee.slots_of(idx).masked_fill(~_isin(idx, ready), -1)
        return experts.outputs(x, slots, into)

    def _make_room(self, protected: set[int]) -> tuple[int, int | None] | None:
        """(slot, evicted expert or None): a free slot, or the slot of the least recently used
        expert outside `protected` (experts this step still needs); None when every slot holds
        such an expert (the rest waits for the next round)."""
        free = self.committee.free_slots()
        if free:
            return free[0], None
        # members the LRU order has not seen yet (installed before this controller ran) go first
        unseen = [e for e in self.committee.members() if e not in self.lru]
        for victim in unseen + list(self.lru):
            if victim not in protected:
                self.lru.pop(victim, None)
                return self.committee.evict(victim), victim
        return None

    def _fetch(self, expert: int, slot: int, victim: int | None) -> bool:
        t0 = time.perf_counter()
        ok = self._load(expert, slot)
        if not ok and victim is not None and self._load(victim, slot):
            self.committee.install(victim, slot)              # the failed read overwrote it: restore
            self.lru[victim] = None
            self.lru.move_to_end(victim, last=False)
        self.stall_s += time.perf_counter() - t0
        if not ok:  # serving goes on without this expert's contribution
            self.failed += 1
            return False
        self.committee.install(expert, slot)
        return True

    def _count(self, idx, weights, needed: set[int]) -> GatingStats:
        member = self.committee.mask
        if isinstance(idx, list):
            miss = [e >= 0 and not bool(member[e]) for e in idx]
            stats = GatingStats(choices=sum(e >= 0 for e in idx), mass_total=sum(weights),
                                mass_outside=sum(w for w, m in zip(weights, miss) if m))
            stats.hits = stats.choices - sum(miss)
            return stats
        return route_stats(Route(idx, weights, None), member)[0]

    def _load(self, expert: int, slot: int) -> bool:
        try:
            return bool(self.load(self.layer, expert, slot))
        except Exception:  # the store retried I/O errors; anything else is a failed load too
            return False


def _flat(idx) -> list[int]:
    return idx if isinstance(idx, list) else idx.reshape(-1).tolist()


def _isin(idx: torch.Tensor, experts: set[int]) -> torch.Tensor:
    """[T, k] bool: idx[t, j] is one of `experts`."""
    if not experts:
        return torch.zeros_like(idx, dtype=torch.bool)
    return torch.isin(idx, torch.tensor(sorted(experts), dtype=idx.dtype))
