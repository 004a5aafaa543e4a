"""How the genetic search moves through the space: children, one-parameter mutation, repair.

Kept apart from search.py so the search loop reads in one screen. Genomes are rows of
`Batch.genomes()`: [sizes (L), precision indices (L), shadow form indices (L), non-expert precision
index, F index]; without shadows searched the shadow genes stay 0.
The repair uses the predictors' per-layer tables (MemoryModel.layer_bytes, LatencyModel.layer_s),
so it costs L vectorised steps for a whole batch instead of one prediction per step.
"""

from __future__ import annotations

import numpy as np

from pcmoe.planner.space import Batch, SearchSpace


def children(space: SearchSpace, pop: Batch, count: int, rng: np.random.Generator) -> tuple[Batch, np.ndarray]:
    """`count` children of a population sorted best first, and the layer each one's mutation changed
    (-1 when it changed the non-expert precision or F)."""
    L = space.layers
    g = pop.genomes()                                                    # [P, 3L+2]

    def parents():  # binary tournament on rank: the better (lower index) of two random members
        return g[np.minimum(rng.integers(0, len(g), count), rng.integers(0, len(g), count))]

    a, b = parents(), parents()                                          # [C, 3L+2]
    layer_mask = rng.random((count, L)) < 0.5                            # crossover keeps a layer's genes together
    model_mask = rng.random((count, 2)) < 0.5
    mask = np.concatenate([layer_mask, layer_mask, layer_mask, model_mask], axis=1)
    crossed = np.where(mask, a, b)
    averaged = np.floor((a + b) / 2 + rng.random(a.shape)).astype(np.int64)   # random rounding
    # 45 % crossover, 25 % average, 30 % a copy of one parent (then mutated like the others).
    r = rng.random(count)[:, None]
    child = np.where(r < 0.45, crossed, np.where(r < 0.7, averaged, a))
    # Mutate exactly one parameter of each child, among the genes that have a choice.
    lows, highs = gene_ranges(space)
    movable = np.flatnonzero(highs > lows)
    if not len(movable):                                                 # a space of one configuration
        return Batch.from_genomes(child, L), np.full(count, -1)
    gene = movable[rng.integers(0, len(movable), count)]
    rows = np.arange(count)
    old, lo, span = child[rows, gene], lows[gene], highs[gene] - lows[gene] + 1
    other = lo + (old - lo + 1 + rng.integers(0, np.maximum(span - 1, 1))) % span      # any other value
    step = old + rng.choice([-1, 1], count)                                             # a size +-1 ...
    step = np.where(step < lo, old + 1, np.where(step > highs[gene], old - 1, step))   # ... bouncing off the ends
    child[rows, gene] = np.where((gene < L) & (rng.random(count) < 0.5), step, other)
    return Batch.from_genomes(child, L), np.where(gene < 3 * L, gene % L, -1)


def gene_ranges(space: SearchSpace) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest value of each gene: sizes 1..N_l, then indices 0..count-1."""
    L = space.layers
    lows = np.array([1] * L + [0] * (2 * L + 2))
    highs = np.array([*space.num_experts, *[len(space.precisions) - 1] * L, *[max(1, len(space.shadow_modes)) - 1] * L,
                      max(1, len(space.nonexpert_precisions)) - 1, len(space.intervals) - 1])
    return lows, highs


def fit_to_limits(problem, batch: Batch, limits, order: np.ndarray, protect: np.ndarray) -> Batch:
    """The paper's repair (§6.6) and its mirror: visit the layers in `order` ([C, L], per configuration)
    and give each the largest committee the remaining memory and latency slack allows, so one over a
    limit sheds experts until it fits and one with room fills it. The layer a mutation just changed
    (`protect`) is left alone: the repair moves bytes to or from the other layers instead of undoing
    the mutation. Uses the predictors' per-layer tables: L vectorised steps for the whole batch."""
    space, mem_model, lat_model = problem.space, problem.memory, problem.latency
    memory_limit, latency_limit = limits
    C = len(batch)
    N = np.array(space.num_experts)
    sizes, rows = batch.sizes.copy(), np.arange(C)
    mem, lat, _ = problem.evaluate(batch)
    mem_slack = memory_limit - mem if memory_limit is not None else np.full(C, np.inf)      # [C] bytes
    lat_slack = latency_limit - lat if latency_limit is not None else np.full(C, np.inf)    # [C] seconds
    update = lat_model.update[batch.interval] if lat_model is not None else np.zeros((C, 1))  # [C, P] s per layer
    candidates = np.arange(1, mem_model.layer_bytes.shape[2] + 1)                          # [S] sizes
    nonfull = (sizes < N).sum(axis=1)                                                      # [C] swapping layers
    # [C] bytes that exist while any layer swaps: the staging buffers, the shadows' runtime memory
    # (the shadows' runtime taken at its largest over the layers' forms, whether or not the layer swaps)
    stage = mem_model.staging[batch.prec].max(axis=1) + mem_model.shadow_runtime[batch.shadow].max(axis=1)
    for l in order.T:                                                                      # [C] one layer per row
        n, p = sizes[rows, l], batch.prec[rows, l]
        was, becomes = n < N[l], candidates[None, :] < N[l][:, None]                      # [C], [C, S]
        others = nonfull - was > 0                                                         # [C] another layer swaps
        # The shared staging buffers exist while any layer swaps; each swapping layer pays the update cost.
        sh = mem_model.shadow_layer[batch.shadow[rows, l], l]                              # [C, S] shadows' bytes
        mem_d = (mem_model.layer_bytes[l, p] - mem_model.layer_bytes[l, p, n - 1][:, None]
                 + sh - sh[rows, n - 1][:, None]
                 + stage[:, None] * ((others[:, None] | becomes).astype(float) - (others | was)[:, None]))
        u = update[rows, p] if lat_model is not None else update[:, 0]                     # [C] this layer's
        lat_d = u[:, None] * (becomes.astype(float) - was[:, None])                        # [C, S] seconds
        if lat_model is not None:
            sh_s = lat_model.shadow_layer_s[batch.shadow[rows, l], l]                      # [C, S] shadows' time
            lat_d = (lat_d + lat_model.layer_s[l, p] - lat_model.layer_s[l, p, n - 1][:, None]
                     + sh_s - sh_s[rows, n - 1][:, None])
        ok = (mem_d <= mem_slack[:, None]) & (lat_d <= lat_slack[:, None])                 # [C, S]
        new = np.where(ok.any(axis=1), ok.shape[1] - np.argmax(ok[:, ::-1], axis=1), 1)    # largest that fits
        new = np.where(l == protect, n, new)
        mem_slack = mem_slack - mem_d[rows, new - 1]
        lat_slack = lat_slack - lat_d[rows, new - 1]
        nonfull += (new < N[l]).astype(np.int64) - was
        sizes[rows, l] = new
    return batch.with_sizes(sizes)


def layer_moves(space: SearchSpace, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every genome that differs from g in one layer (any size, precision and shadow form) or in the
    non-expert precision or F, [K, 3L+2], with the layer changed (-1 for the last two)."""
    L, P, SH = space.layers, len(space.precisions), max(1, len(space.shadow_modes))
    out, changed = [], []
    for l, N in enumerate(space.num_experts):
        n, p, f = np.meshgrid(np.arange(1, N + 1), np.arange(P), np.arange(SH), indexing="ij")
        rows = np.repeat(g[None, :], n.size, axis=0)
        rows[:, l], rows[:, L + l], rows[:, 2 * L + l] = n.ravel(), p.ravel(), f.ravel()
        out.append(rows)
        changed.append(np.full(n.size, l))
    for gene in (3 * L, 3 * L + 1):
        lows, highs = gene_ranges(space)
        rows = np.repeat(g[None, :], highs[gene] + 1, axis=0)
        rows[:, gene] = np.arange(highs[gene] + 1)
        out.append(rows)
        changed.append(np.full(len(rows), -1))
    return np.concatenate(out), np.concatenate(changed)
