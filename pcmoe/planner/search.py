"""Choosing a configuration: the best predicted quality within a memory (and latency) limit.

Hard constraints: predicted memory <= limit, predicted latency <= limit when one is given.
Objective: lowest predicted loss, then lowest latency, then lowest memory (losses closer than
`quality_tol` count as equal: no predictor is that accurate, so the faster one should win).

`genetic` is the paper's solver (§6.5) with its gaps filled as follows. A population sorted best
first; parents by rank tournament; a child is a per-layer crossover, a per-gene average (randomly
rounded) or a copy, and every child then has exactly one parameter mutated. Parents and children
are merged, duplicates removed, and the best `population` kept: violators rank after every feasible
configuration (by how far they overshoot), so they are dropped as soon as enough feasible ones
exist but can lead the way while none does. Stops after `patience` generations without a new best.
Seeded numpy only, so a seed gives the same plan. `exhaustive` enumerates a small space and is the
reference the tests hold the GA to; `pareto` plans one configuration per memory point.

An impossible constraint raises InfeasibleError naming the least memory and latency any
configuration has (exact: the predictors are separable per layer) or, when each limit alone can be
met but not both, what the search found within each limit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pcmoe.budget import format_bytes
from pcmoe.planner.moves import children, fit_to_limits, layer_moves
from pcmoe.planner.predict import LatencyModel, MemoryModel
from pcmoe.planner.space import NO_SHADOW, Batch, Config, PlanError, SearchSpace, shadow_setting

OBJECTIVES = ("quality", "latency", "memory")


class InfeasibleError(PlanError):
    """No configuration meets the constraints; least_memory / least_latency say what can be met."""

    def __init__(self, message: str, least_memory: float, least_latency: float | None):
        super().__init__(message)
        self.least_memory, self.least_latency = least_memory, least_latency


@dataclass(frozen=True)
class Problem:
    space: SearchSpace
    memory: MemoryModel                          # batch -> [P] bytes, with least()
    quality: Callable[[Batch], np.ndarray]       # batch -> [P] predicted loss, lower is better
    latency: LatencyModel | None = None          # batch -> [P] seconds per token, with least()

    def evaluate(self, batch: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lat = self.latency(batch) if self.latency is not None else np.zeros(len(batch))
        return self.memory(batch), lat, np.asarray(self.quality(batch), dtype=np.float64)


@dataclass(frozen=True)
class Plan:
    config: Config
    memory: float              # predicted bytes of the whole process
    latency: float | None      # predicted seconds per token (None without a latency model)
    quality: float             # predicted loss
    method: str                # "genetic" | "exhaustive"
    evaluated: int             # configurations evaluated

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "predicted": {"memory_bytes": int(self.memory),
                "latency_s": self.latency, "loss": self.quality}, "method": self.method, "evaluated": self.evaluated}


def _order(values, memory_limit, latency_limit, objective, quality_tol) -> np.ndarray:
    """Indices best first: feasible before violators (by overshoot), then the objective's keys."""
    mem, lat, q = values
    over = np.zeros(len(mem))
    if memory_limit is not None:
        over += np.maximum(mem / memory_limit - 1.0, 0.0)
    if latency_limit is not None:
        over += np.maximum(lat / latency_limit - 1.0, 0.0)
    qkey = np.round(q / quality_tol) if quality_tol > 0 else q
    keys = {"quality": (qkey, lat, mem), "latency": (lat, mem, qkey), "memory": (mem, lat, qkey)}[objective]
    return np.lexsort(tuple(reversed((over > 0, over, *keys))))


def _check(problem, memory_limit, latency_limit, objective):
    if objective not in OBJECTIVES:
        raise PlanError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
    if (latency_limit is not None or objective == "latency") and problem.latency is None:
        raise PlanError("a latency limit needs a latency model (the profile's \"latency\" section)")
    for name, value in (("memory", memory_limit), ("latency", latency_limit)):
        if value is not None and not value > 0:
            raise PlanError(f"the {name} limit must be positive, got {value}")
    least_mem, mem_cfg = problem.memory.least()
    least_lat, lat_cfg = problem.latency.least() if problem.latency is not None else (None, None)
    if memory_limit is not None and memory_limit < least_mem:
        tail = f"; the least latency is {_ms(least_lat)}" if least_lat is not None else ""
        raise InfeasibleError(f"no configuration fits in {format_bytes(memory_limit)}: the least memory any "
                              f"configuration needs is {format_bytes(least_mem)}{tail}", least_mem, least_lat)
    if latency_limit is not None and latency_limit < least_lat:
        raise InfeasibleError(f"no configuration runs in {_ms(latency_limit)}: the least latency any configuration "
                              f"has is {_ms(least_lat)} (it needs {format_bytes(problem.memory(lat_cfg)[0])}); the "
                              f"least memory is {format_bytes(least_mem)}", least_mem, least_lat)
    return [mem_cfg] + ([lat_cfg] if lat_cfg is not None else [])


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3g} ms/token"


def _joint_infeasible(problem, memory_limit, latency_limit, search) -> InfeasibleError:
    """Each limit alone can be met, both together were not: say what each limit allows."""
    if memory_limit is None or latency_limit is None:   # a single limit is met by its exact least configuration
        raise AssertionError("only two limits together can be infeasible after _check")
    fastest = search(problem, memory_limit, None, objective="latency")
    smallest = search(problem, None, latency_limit, objective="memory")
    least_mem, least_lat = problem.memory.least()[0], problem.latency.least()[0]
    return InfeasibleError(f"no configuration found within both {format_bytes(memory_limit)} and {_ms(latency_limit)}"
                           f": within {format_bytes(memory_limit)} the fastest takes {_ms(fastest.latency)}, within "
                           f"{_ms(latency_limit)} the smallest needs {format_bytes(smallest.memory)}",
                           least_mem, least_lat)


def _plan(problem, batch, values, i, method, evaluated) -> Plan:
    mem, lat, q = values
    config = problem.space.decode(batch, i)
    if config.shadow is not None:   # a full layer has no non-member to shadow: "none" there
        forms = [NO_SHADOW if n == N else f for n, N, f in
                 zip(config.sizes, problem.space.num_experts, config.layer_shadows(problem.space.layers))]
        config = dataclasses.replace(config, shadow=shadow_setting(forms))
    return Plan(config=config, memory=float(mem[i]),
                latency=float(lat[i]) if problem.latency is not None else None, quality=float(q[i]),
                method=method, evaluated=evaluated)


def _feasible(values, i, memory_limit, latency_limit) -> bool:
    mem, lat, _ = values
    return (memory_limit is None or mem[i] <= memory_limit) and (latency_limit is None or lat[i] <= latency_limit)


# -- genetic search ---------------------------------------------------------------------------------


def _select(problem, batch, limits, objective, tol, keep) -> tuple[Batch, tuple, int]:
    g = np.ascontiguousarray(batch.genomes())
    _, first = np.unique(g.view(np.dtype((np.void, g.dtype.itemsize * g.shape[1]))), return_index=True)
    batch = batch.take(np.sort(first))
    values = problem.evaluate(batch)
    order = _order(values, *limits, objective, tol)[:keep]
    return batch.take(order), tuple(v[order] for v in values), len(first)


def genetic(problem: Problem, memory_limit: float | None, latency_limit: float | None = None, *, seed: int = 0,
            objective: str = "quality", population: int = 64, generations: int = 1000, patience: int = 100,
            quality_tol: float = 1e-4, polish: bool = True) -> Plan:
    """The best configuration found (see the module docstring); `polish` ends with `_polish`."""
    anchors = _check(problem, memory_limit, latency_limit, objective)
    rng = np.random.default_rng(seed)
    space, limits = problem.space, (memory_limit, latency_limit)
    shuffled = lambda count: np.argsort(rng.random((count, space.layers)), axis=1)  # noqa: E731  layer orders
    randoms = space.random(rng, 2 * population)
    randoms = Batch.concat([randoms, fit_to_limits(problem, randoms, limits, shuffled(len(randoms)),
                                                   np.full(len(randoms), -1))])
    # The exact least-memory and least-latency configurations keep the start feasible when anything is.
    pop, values, evaluated = _select(problem, Batch.concat([*anchors, space.all_resident(), randoms]), limits,
                                     objective, quality_tol, population)
    best, stale = pop.genomes()[0], 0
    for _ in range(generations):
        kids, changed = children(space, pop, population, rng)
        kids = Batch.concat([kids, fit_to_limits(problem, kids, limits, shuffled(len(kids)), changed)])
        pop, values, n = _select(problem, Batch.concat([pop, kids]), limits, objective, quality_tol, population)
        evaluated += n
        stale = stale + 1 if np.array_equal(pop.genomes()[0], best) else 0
        best = pop.genomes()[0]
        if stale >= patience:
            break
    if not _feasible(values, 0, memory_limit, latency_limit):
        raise _joint_infeasible(problem, memory_limit, latency_limit, genetic)
    if polish and objective == "quality":
        pop, values, n = _polish(problem, pop.take([0]), limits, objective, quality_tol)
        evaluated += n
    return _plan(problem, pop, values, 0, "genetic", evaluated)


def _polish(problem, first: Batch, limits, objective, tol, rounds: int = 100):
    """Descent from the GA's best over compound moves: change one layer (or F, or the non-expert
    precision) to any value, then repair or fill the other layers in the order of their marginal
    loss per byte at the current point (the paper's "drop experts from the layers with the lowest
    predicted marginal accuracy"). Deterministic; ends at a local optimum of these moves."""
    space, L, cur, evaluated = problem.space, problem.space.layers, first, 0
    N, layers = np.array(space.num_experts), np.arange(L)
    for _ in range(rounds):
        g = cur.genomes()[0]
        down, up = np.repeat(g[None, :], L, axis=0), np.repeat(g[None, :], L, axis=0)
        down[layers, layers] = np.maximum(g[:L] - 1, 1)
        up[layers, layers] = np.minimum(g[:L] + 1, N)
        _, _, q = problem.evaluate(Batch.from_genomes(np.concatenate([g[None, :], down, up]), L))
        per_byte = problem.memory.layer_bytes[layers, g[L:2 * L], 0] + 1.0       # [L] ~bytes of one expert
        cheap_drop = np.argsort((q[1:L + 1] - q[0]) / per_byte + (g[:L] <= 1) * 1e9)   # least loss per byte first
        best_gain = np.argsort((q[L + 1:] - q[0]) / per_byte + (g[:L] >= N) * 1e9)     # most gain per byte first
        moves, changed = layer_moves(space, g)
        fixed = Batch.from_genomes(moves, L)
        mem, lat, _ = problem.evaluate(fixed)
        over = np.zeros(len(moves), bool)
        if limits[0] is not None:
            over |= mem > limits[0]
        if limits[1] is not None:
            over |= lat > limits[1]
        order = np.where(over[:, None], cheap_drop[None, :], best_gain[None, :])
        cand = Batch.concat([cur, fixed, fit_to_limits(problem, fixed, limits, order, changed)])
        values = problem.evaluate(cand)
        evaluated += len(cand) + 2 * L
        best = _order(values, *limits, objective, tol)[0]
        if best == 0:
            break
        cur = cand.take([best])
    return cur, problem.evaluate(cur), evaluated


# -- exhaustive search and Pareto points -------------------------------------------------------------


def exhaustive(problem: Problem, memory_limit: float | None, latency_limit: float | None = None, *,
               objective: str = "quality", quality_tol: float = 1e-4, max_configs: int = 2_000_000,
               chunk: int = 1 << 15) -> Plan:
    """Every configuration of a small space (the reference for `genetic`)."""
    space = problem.space
    total = space.size()
    if total > max_configs:
        raise PlanError(f"the space holds {total} configurations, more than the {max_configs} exhaustive search "
                        "allows; use the genetic search")
    _check(problem, memory_limit, latency_limit, objective)
    P, NE, F = len(space.precisions), max(1, len(space.nonexpert_precisions)), len(space.intervals)
    SH = max(1, len(space.shadow_modes))
    radix = np.array([n * P * SH for n in space.num_experts] + [NE, F])     # mixed-radix digits
    limits, winners = (memory_limit, latency_limit), []
    for start in range(0, total, chunk):
        code = np.arange(start, min(total, start + chunk))
        digits = []
        for r in radix:
            digits.append(code % r)
            code = code // r
        layer = np.stack(digits[:-2], axis=1)                   # [C, L] = (size index * P + precision) * SH + form
        batch = Batch(layer // (P * SH) + 1, layer // SH % P, digits[-2], digits[-1], layer % SH)
        values = problem.evaluate(batch)
        winners.append(batch.take([_order(values, *limits, objective, quality_tol)[0]]))
    best = Batch.concat(winners)
    values = problem.evaluate(best)
    i = _order(values, *limits, objective, quality_tol)[0]
    if not _feasible(values, i, memory_limit, latency_limit):
        raise _joint_infeasible(problem, memory_limit, latency_limit, exhaustive)
    return _plan(problem, best, values, i, "exhaustive", total)


def memory_points(problem: Problem, count: int = 8) -> list[float]:
    """`count` memory limits spaced geometrically from the least memory to the full model's."""
    low, high = problem.memory.least()[0], float(problem.memory(problem.space.full())[0])
    return [float(x) for x in np.geomspace(low, max(high, low), count)]


def pareto(problem: Problem, memory_limits: list[float], latency_limit: float | None = None, *, seed: int = 0,
           method: str = "genetic") -> list[tuple[float, Plan | None]]:
    """One plan per memory limit (None where that limit, or it with the latency limit, cannot be met)."""
    search = {"genetic": lambda *a: genetic(*a, seed=seed), "exhaustive": exhaustive}.get(method)
    if search is None:
        raise PlanError(f"unknown search method {method!r}; choose genetic or exhaustive")
    out = []
    for limit in memory_limits:
        try:
            out.append((limit, search(problem, limit, latency_limit)))
        except InfeasibleError:
            out.append((limit, None))
    return out
