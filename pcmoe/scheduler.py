"""Committee updates by amortised asynchronous swaps (paper.md §4).

Every `update_every` units (tokens, or inputs = requests/documents) the scheduler closes each
layer's importance window and plans swaps towards the most important experts. Loads then trickle
out at most `bytes_per_step` bytes per forward step (amortised over the following steps) and run
on a background thread while the model computes.

The schedule is deterministic: a load issued at the boundary before step k is switched in at the
boundary before step k+1, whether it ran on the I/O thread (async) or inline (sync). Async and sync
therefore give identical outputs; in async mode the main thread only waits if the disk was slower
than one step, and that wait is measured as stall time (the goal is zero).

Two ways to make room (both keep the old member serving until the switch, and keep it if the
load fails):
  staged (default, no spare slot)  loads go into one of a few staging buffers shared by all layers;
                                   at the switch the main thread copies the buffer into the outgoing
                                   member's slot. Costs a copy per swap, saves a slot per layer.
  spare slots (spare_slots >= 1)   loads go straight into a reserved empty slot of the layer.

Safety: a load only ever writes into a staging buffer or a reserved empty slot that no member maps
to; the committee switch (slot table + routing mask) happens between forwards; the evicted expert's
slot is reused (staged) or becomes free (spare) only at the switch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from pcmoe.committee import LayerCommittee
from pcmoe.importance import ImportanceTracker, plan_swaps
from pcmoe.options import UPDATE_UNITS


@dataclass
class _Job:
    layer: int
    incoming: int
    outgoing: int
    slot: int                 # reserved empty slot it loads into (-1 when staged)
    nbytes: int
    buffer: int = -1          # staging buffer it loads into (-1 when it loads into a slot)
    future: Future | None = None
    ok: bool = False


@dataclass
class SchedulerStats:
    updates: int = 0
    swaps: int = 0            # switched in
    swap_failures: int = 0    # loads that failed after retries (the old member stayed)
    bytes_issued: int = 0
    stall_s: float = 0.0      # time forward passes waited for swap I/O
    copy_s: float = 0.0       # staged swaps: time spent copying buffers into slots at switches
    per_layer_swaps: list[int] = field(default_factory=list)
    per_layer_stall_s: list[float] = field(default_factory=list)


class SwapScheduler:
    def __init__(
        self,
        committees: list[LayerCommittee],
        trackers: list[ImportanceTracker],
        sizes: list[int],
        expert_bytes: list[int],
        load: Callable[[int, int, int], bool],
        *,
        update_every: int,
        unit: str = "tokens",
        bytes_per_step: int,
        margin: float = 0.0,
        synchronous: bool = False,
        staging: tuple[Callable[[int, int, int], bool], Callable[[int, int, int], None], int] | None = None,
    ):
        """load(layer, expert, slot) reads an expert into an empty slot. staging = (load_buffer(layer,
        expert, buffer), commit(layer, buffer, slot), number of buffers) switches swaps through
        staging buffers instead of spare slots (see the module docstring)."""
        if unit not in UPDATE_UNITS:
            raise ValueError(f"update unit must be one of {UPDATE_UNITS}, not {unit!r}")
        if update_every < 1:
            raise ValueError("update_every must be at least 1")
        if bytes_per_step < 1:
            raise ValueError("bytes_per_step must be positive")
        self.committees, self.trackers, self.sizes = committees, trackers, sizes
        self.expert_bytes, self.load = expert_bytes, load
        self.update_every, self.unit, self.margin = update_every, unit, margin
        self.bytes_per_step = bytes_per_step
        # An expert larger than one step's bytes is issued once enough allowance has built up.
        self.allowance_cap = max(bytes_per_step, max(expert_bytes))
        self.synchronous = synchronous
        self.load_buffer, self.commit, buffers = staging if staging else (None, None, 0)
        self.free_buffers = list(range(buffers))
        self.allowance = 0
        self.units = 0
        self.steps = 0
        self.pending: list[tuple[int, int, int]] = []  # (layer, incoming, outgoing), in issue order
        self.inflight: list[_Job] = []
        self.stats = SchedulerStats(per_layer_swaps=[0] * len(committees),
                                    per_layer_stall_s=[0.0] * len(committees))
        self._pool = None if synchronous else ThreadPoolExecutor(1, thread_name_prefix="pcmoe-swap")

    # -- the step boundary ---------------------------------------------------------------------

    def begin_step(self, tokens: int, new_input: bool) -> None:
        """Call right before every forward pass of the model (never during one)."""
        self._apply_inflight()
        if self.unit == "inputs" and new_input and self.steps > 0:
            self.units += 1  # the previous input is complete
        if self.units >= self.update_every:
            self.units = 0
            self.update()
        self._issue()
        if self.unit == "tokens":
            self.units += tokens
        self.steps += 1

    def update(self) -> None:
        """Close the importance windows and plan swaps for every layer. A layer whose window saw
        no tokens keeps its pending plan (there is nothing new to decide on)."""
        self.stats.updates += 1
        per_layer = []
        for layer, (committee, tracker) in enumerate(zip(self.committees, self.trackers)):
            if not bool(tracker.window.any()):
                per_layer.append([p for p in self.pending if p[0] == layer])
                continue
            score = tracker.close_window()
            swaps = plan_swaps(score, committee.members(), self.sizes[layer], self.margin)
            # empty slots a grown budget gave stay planned for even where the window saw no traffic
            room = self.sizes[layer] - len(committee.members()) - sum(o < 0 for _, o in swaps)
            planned = {i for i, _ in swaps}
            swaps += [(i, -1) for lay, i, o in self.pending if lay == layer and o < 0 and i not in planned
                      and not committee.is_member(i)][:max(room, 0)]
            per_layer.append([(layer, i, o) for i, o in swaps])
        self.pending = _round_robin(per_layer)

    def plan_towards(self, targets: list[set[int]]) -> None:
        """Plan swaps that make each layer's committee the given member set (warm starts)."""
        per_layer = []
        for layer, committee in enumerate(self.committees):
            members = set(committee.members())
            incoming = sorted(targets[layer] - members)
            outgoing = sorted(members - targets[layer])
            per_layer.append([(layer, i, o) for i, o in zip(incoming, outgoing)])
        self.pending = _round_robin(per_layer)
        self.units = 0  # the new committee gets a full window before the next update

    # -- live budget changes (pcmoe.runtime.Engine.set_budget) ----------------------------------

    def drain(self) -> None:
        """Switch in (or give up) every in-flight load and forget the pending plan: the banks and
        staging buffers may then be reallocated. Called at a step boundary only."""
        self._apply_inflight()
        self.pending = []

    def resize(self, sizes: list[int], buffers: int, fills: list[list[int]]) -> None:
        """After drain() and the banks' resize: new committee sizes, `buffers` staging buffers, and
        loads of `fills[layer]` (best first) into the layers' empty slots, issued amortised like
        any swap from the next step on. Sync and async issue them at the same steps."""
        self.sizes = list(sizes)
        self.free_buffers = list(range(buffers))
        self.pending = _round_robin([[(layer, e, -1) for e in experts] for layer, experts in enumerate(fills)])

    def _issue(self) -> None:
        self.allowance = min(self.allowance + self.bytes_per_step, self.allowance_cap)
        keep = []
        loading = {(job.layer, job.incoming) for job in self.inflight}
        leaving = {(job.layer, job.outgoing) for job in self.inflight if job.outgoing >= 0}
        for i, (layer, incoming, outgoing) in enumerate(self.pending):
            committee = self.committees[layer]
            if committee.is_member(incoming) or (outgoing >= 0 and not committee.is_member(outgoing)) \
                    or (layer, incoming) in loading or (layer, outgoing) in leaving:
                continue  # stale, or already on its way in / out
            free = committee.free_slots()
            staged = not free and outgoing >= 0 and bool(self.free_buffers)
            if not free and not staged:
                keep.append((layer, incoming, outgoing))  # no spare slot / staging buffer free yet
                continue
            nbytes = self.expert_bytes[layer]
            if nbytes > self.allowance:
                keep.extend(self.pending[i:])
                break
            self.allowance -= nbytes
            if staged:
                job = _Job(layer, incoming, outgoing, -1, nbytes, buffer=self.free_buffers.pop(0))
                load, target = self.load_buffer, job.buffer
            else:
                committee.reserve(free[0])
                job = _Job(layer, incoming, outgoing, free[0], nbytes)
                load, target = self.load, job.slot
            loading.add((layer, incoming))
            if outgoing >= 0:  # (layer, -1) would mark every later fill of the layer as leaving
                leaving.add((layer, outgoing))
            self.stats.bytes_issued += nbytes
            if self.synchronous:
                t0 = time.perf_counter()
                try:
                    job.ok = bool(load(layer, incoming, target))
                except Exception:
                    job.ok = False
                waited = time.perf_counter() - t0
                self.stats.stall_s += waited
                self.stats.per_layer_stall_s[layer] += waited
            else:
                job.future = self._pool.submit(load, layer, incoming, target)
            self.inflight.append(job)
        self.pending = keep

    def _apply_inflight(self) -> None:
        for job in self.inflight:
            if job.future is not None:
                if not job.future.done():
                    t0 = time.perf_counter()
                    wait([job.future])  # never raises: a failed load is handled below
                    waited = time.perf_counter() - t0
                    self.stats.stall_s += waited
                    self.stats.per_layer_stall_s[job.layer] += waited
                try:
                    job.ok = bool(job.future.result())
                except Exception:  # whatever went wrong, keep serving with the old member
                    job.ok = False
            committee = self.committees[job.layer]
            if job.buffer >= 0:
                if job.ok and committee.is_member(job.outgoing) and not committee.is_member(job.incoming):
                    t0 = time.perf_counter()
                    slot = int(committee.expert_to_slot[job.outgoing])
                    self.commit(job.layer, job.buffer, slot)   # the outgoing member's weights are overwritten
                    committee.replace(job.incoming, job.outgoing)
                    self.stats.copy_s += time.perf_counter() - t0
                    self.stats.swaps += 1
                    self.stats.per_layer_swaps[job.layer] += 1
                elif not job.ok:
                    self.stats.swap_failures += 1
                self.free_buffers.append(job.buffer)
            elif job.ok:
                committee.switch(job.incoming, job.outgoing, job.slot)
                self.stats.swaps += 1
                self.stats.per_layer_swaps[job.layer] += 1
            else:
                committee.release(job.slot)
                self.stats.swap_failures += 1
        self.inflight = []

    def close(self) -> None:
        """Finish in-flight loads (switching them in) and stop the I/O thread."""
        self._apply_inflight()
        self.pending = []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _round_robin(per_layer: list[list]) -> list:
    """Interleave the layers' swap lists so every layer gets its most valuable swap early."""
    longest = max((len(p) for p in per_layer), default=0)
    return [p[rank] for rank in range(longest) for p in per_layer if rank < len(p)]
