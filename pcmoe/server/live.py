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

        def losses(candidates: list[list[int]]):
            return planner.quality(space.encode([Config(tuple(c), precisions, interval) for c in candidates]))

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
