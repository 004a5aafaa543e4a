"""Committee updates by amortised asynchronous swaps (paper.md §4).

Every `update_every` units (tokens, or inputs = requests/documents) the scheduler closes each
layer's importance window and plans swaps towards the most important experts. Loads then trickle
out at most `bytes_per_step` bytes per forward step (amortised over the following steps) and run
on a background thread while the model computes.

The schedule is deterministic: a load issued at the boundary before step k is switched in at the
boundary before step k+1, whether it ran on the I/O thread (async) or inline (sync). Async and sync
therefore give identical outputs; in async mode the main thread only waits if the disk was slower
than one step, and that wait is measured as stall time (the goal is zero).

Safety: a load only ever writes into a reserved empty slot that no member maps to; the committee
switch (slot table + routing mask) happens between forwards; the evicted expert's slot becomes free
only after the switch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from pcmoe.committee import LayerCommittee
from pcmoe.importance import ImportanceTracker, plan_swaps

UNITS = ("tokens", "inputs")


@dataclass
class _Job:
    layer: int
    incoming: int
    outgoing: int
    slot: int
    nbytes: int
    future: Future | None = None
    ok: bool = False


@dataclass
class SchedulerStats:
    updates: int = 0
    swaps: int = 0            # switched in
    swap_failures: int = 0    # loads that failed after retries (the old member stayed)
    bytes_issued: int = 0
    stall_s: float = 0.0      # time forward passes waited for swap I/O
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
    ):
        if unit not in UNITS:
            raise ValueError(f"update unit must be one of {UNITS}, not {unit!r}")
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

    def _issue(self) -> None:
        self.allowance = min(self.allowance + self.bytes_per_step, self.allowance_cap)
        keep = []
        for i, (layer, incoming, outgoing) in enumerate(self.pending):
            committee = self.committees[layer]
            if committee.is_member(incoming) or (outgoing >= 0 and not committee.is_member(outgoing)):
                continue  # stale
            free = committee.free_slots()
            if not free:
                keep.append((layer, incoming, outgoing))  # this layer's spare slot is busy
                continue
            nbytes = self.expert_bytes[layer]
            if nbytes > self.allowance:
                keep.extend(self.pending[i:])
                break
            self.allowance -= nbytes
            committee.reserve(free[0])
            job = _Job(layer, incoming, outgoing, free[0], nbytes)
            self.stats.bytes_issued += nbytes
            if self.synchronous:
                t0 = time.perf_counter()
                try:
                    job.ok = bool(self.load(layer, incoming, job.slot))
                except Exception:
                    job.ok = False
                waited = time.perf_counter() - t0
                self.stats.stall_s += waited
                self.stats.per_layer_stall_s[layer] += waited
            else:
                job.future = self._pool.submit(self.load, layer, incoming, job.slot)
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
            if job.ok:
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
