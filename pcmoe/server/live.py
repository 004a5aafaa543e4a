"""Live budget sizes in the planner's order: which layers give up (or get) members first.

Where the checkpoint has a device profile (pcmoe calibrate), a budget change keeps the engine's
precisions and update interval and walks the planner's quality model greedily: a shrink removes,
one member at a time, the member whose loss in predicted quality per byte freed is smallest; a grow
adds the one whose gain per byte is largest, until nothing more fits. The bytes are pcmoe.budget's
(size_committees checks the result). Without a profile, or when the profile does not fit the
engine, sizes are uniform (Engine.plan_budget's default).
"""

from __future__ import annotations

import logging

from pcmoe.budget import slots_for

log = logging.getLogger("pcmoe.server")


def planned_sizes(engine, budget) -> tuple[list[int] | None, str]:
    """(committee sizes for `budget` in the planner's order, or None for uniform; how they were chosen).
    Raises PcmoeError (through engine.plan_budget) for a budget that cannot be served at all."""
    uniform = engine.plan_budget(budget)  # the budget in bytes, the staging buffers, and the refusals
    if engine.policy != "committee":
        return None, "uniform"
    try:
        from pcmoe.planner.planning import Planner, profile_file, read_profile_data
        from pcmoe.planner.space import Config

        path = profile_file(engine.checkpoint.folder)
        if not path.exists():
            return None, "uniform (no device profile)"
        planner = Planner.from_data(read_profile_data(path), weights_only=True)
        space = planner.space
        if list(space.num_experts) != [c.num_experts for c in engine.committees]:
            return None, "uniform (the device profile is for another model)"
        precisions = tuple(layer.block.experts.quant or "full" for layer in engine.layers)
        interval = min(space.intervals, key=lambda f: abs(f - engine.options.update_every))

        nonexpert = engine.load_info.get("nonexpert_precision", "full") if space.nonexpert_precisions else None
        shadow = space.shadow_of(getattr(engine.options, "shadow", None))   # one form, or one per layer

        def losses(candidates: list[list[int]]):
            return planner.quality(space.encode([Config(tuple(c), precisions, interval, nonexpert, shadow)
                                                 for c in candidates]))

        return _greedy(engine, uniform, losses), "planner"
    except Exception as e:  # a profile that does not fit: plan uniformly, say why in the log
        log.warning("live budget: sizes uniform, the planner could not order them (%s: %s)", type(e).__name__, e)
        return None, f"uniform ({type(e).__name__})"


def _greedy(engine, uniform, losses) -> list[int]:
    sizes, bytes_ = engine.model_bytes, engine.model_bytes.expert
    spare, budget = engine.options.spare_slots, uniform.budget
    N = sizes.num_experts

    def need(c):
        return sizes.slots_bytes(slots_for(c, sizes, spare)) + uniform.buffer_bytes

    current = list(engine.committee_sizes)
    while need(current) > budget:  # shrink: the cheapest member per byte freed goes first
        options = [i for i in range(len(current)) if current[i] > 1]
        cands = [current[:i] + [current[i] - 1] + current[i + 1:] for i in options]
        base = float(losses([current])[0])
        worst = losses(cands)
        i = min(range(len(options)), key=lambda j: ((worst[j] - base) / bytes_[options[j]], options[j]))
        current = cands[i]
    while True:  # grow: the most valuable member per byte comes first, while one still fits
        options = [i for i in range(len(current)) if current[i] < N[i]]
        cands = [c for c in (current[:i] + [current[i] + 1] + current[i + 1:] for i in options) if need(c) <= budget]
        if not cands:
            return current
        base = float(losses([current])[0])
        better = losses(cands)
        gains = [(base - better[j]) / bytes_[next(i for i in range(len(c)) if c[i] != current[i])]
                 for j, c in enumerate(cands)]
        current = cands[max(range(len(cands)), key=lambda j: (gains[j], -j))]


# -- following the cgroup's own limit ----------------------------------------------------------

CGROUP_MEMORY = "/sys/fs/cgroup/memory"
UNLIMITED = 1 << 62  # cgroup v1 reports "no limit" as a number near 2**63


def own_memory_cgroup(proc_cgroup: str = "/proc/self/cgroup", root: str = CGROUP_MEMORY) -> str | None:
    """The folder of this process's cgroup v1 memory group, or None (no v1 memory controller)."""
    import os

    try:
        with open(proc_cgroup) as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if "memory" in controllers.split(","):
                    folder = os.path.join(root, path.lstrip("/"))
                    return folder if os.path.exists(os.path.join(folder, "memory.limit_in_bytes")) else None
    except (OSError, ValueError):
        pass
    return None


def budget_for_limit(limit: int, usage: int, resident_weights: int, headroom: int) -> int:
    """The weight budget that keeps the group `headroom` bytes under `limit`: what the group holds
    besides the weights (usage - resident weights: runtime, KV cache, page cache) stays as it is."""
    return limit - headroom - (usage - resident_weights)


def follow_cgroup(worker, folder: str, headroom: int, interval_s: float = 1.0, stop=None):
    """A daemon thread that polls the group's memory.limit_in_bytes; when the limit changes, the
    engine gets budget_for_limit(...) (refusals are logged, nothing changes). Returns the thread."""
    import os
    import threading

    def read(name: str) -> int:
        with open(os.path.join(folder, name)) as f:
            return int(f.read().split()[0])

    stop = stop if stop is not None else threading.Event()

    def run():
        last = None
        while not stop.wait(interval_s):
            try:
                limit = read("memory.limit_in_bytes")
                if limit == last:
                    continue
                usage = read("memory.usage_in_bytes")
            except (OSError, ValueError):  # mid-write or gone: read again next time
                continue
            last = limit
            if limit >= UNLIMITED:
                continue
            budget = budget_for_limit(limit, usage, worker.stats["resident_bytes"], headroom)
            try:
                summary, _ = worker.set_budget(max(budget, 1))
                log.warning("cgroup limit %d bytes: weight budget %s, committee sizes %s", limit, summary["budget"],
                            summary["committee_sizes"])
            except Exception as e:  # PcmoeError: below the minimum; keep serving as before
                log.error("cgroup limit %d bytes: %s", limit, e)

    thread = threading.Thread(target=run, daemon=True, name="pcmoe-cgroup")
    thread.start()
    return thread

