"""Memory budgets: bytes, committee sizes, slots and staging buffers.

A budget counts weight bytes held in RAM: the non-expert weights (always resident) plus every
expert slot (committee members and any spare slots swaps load into) plus the shared staging
buffers of staged swaps. The Python/torch runtime, activations and the KV cache come on top;
`pcmoe eval` reports them as the measured overhead. This module owns all of that arithmetic:
the loader, `pcmoe info` and the bench's skip rule all ask `size_committees` / `minimum_budget`.

Budget strings:  "1.5GB", "800MiB", "123456" (bytes);  "50%" = half of the full model's weight
bytes;  "50%experts" = the non-expert weights plus half of the expert weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class BudgetError(ValueError):
    """A budget or plan that cannot be served; the message says what would work."""


@dataclass(frozen=True)
class ModelBytes:
    nonexpert: int
    expert: list[int]          # bytes of one expert, per MoE layer
    num_experts: list[int]     # experts per MoE layer

    @property
    def full(self) -> int:
        return self.nonexpert + sum(b * n for b, n in zip(self.expert, self.num_experts))

    @property
    def all_experts(self) -> int:
        return self.full - self.nonexpert

    def slots_bytes(self, slots: list[int]) -> int:
        return self.nonexpert + sum(b * s for b, s in zip(self.expert, slots))


def parse_budget(spec: str | int | float | None, sizes: ModelBytes) -> int | None:
    """Budget in bytes (None = no limit)."""
    if spec is None:
        return None
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        if spec <= 0:
            raise BudgetError(f"budget must be positive, got {spec}")
        return int(spec)
    text = str(spec).strip().lower().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)%(experts?)?", text)
    if m:
        frac = float(m.group(1)) / 100
        if not 0 < frac:
            raise BudgetError(f"budget {spec!r} must be above 0%")
        if m.group(2):
            return int(sizes.nonexpert + frac * sizes.all_experts)
        return int(frac * sizes.full)
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([kmgt]?i?b?)", text)
    if not m or m.group(2) not in _UNITS:
        raise BudgetError(f"cannot read budget {spec!r}; use bytes with a unit (2GB, 800MiB), "
                          "a share of the model (50%) or of its experts (50%experts)")
    value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise BudgetError(f"budget must be positive, got {spec!r}")
    return value


def format_bytes(n: float | int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def swap_buffer_count(bytes_per_step: int, expert_bytes: list[int]) -> int:
    """Staging buffers of staged swaps: a load issued at one step boundary is switched in at the
    next, so a step's I/O allowance bounds how many are in flight at once."""
    largest = max(expert_bytes)
    return max(bytes_per_step, largest) // largest


def minimum_budget(sizes: ModelBytes, spare_slots: int = 0, buffer_bytes: int = 0) -> int:
    """Non-expert weights + one member (+ spare slots) per MoE layer (+ staging buffers)."""
    return sizes.slots_bytes([min(1 + spare_slots, n) for n in sizes.num_experts]) + buffer_bytes


def default_bytes_per_step(sizes: ModelBytes, bytes_per_step: int | None = None) -> int:
    """The swap I/O allowance per forward step: as given, else two experts."""
    return bytes_per_step or 2 * max(sizes.expert)


def minima(sizes: ModelBytes, staging_bytes: int, bytes_per_step: int | None = None) -> dict:
    """The smallest budgets of each arrangement, as `pcmoe info` reports them: the default load
    (staged swaps: one member per layer + the shared staging buffers of `staging_bytes` each), a
    spare slot per layer instead, and a fixed subset (no swaps, no buffers)."""
    buffers = swap_buffer_count(default_bytes_per_step(sizes, bytes_per_step), sizes.expert)
    return {"minimum_budget": minimum_budget(sizes, 0, buffers * staging_bytes),
            "swap_buffers": buffers, "swap_buffer_bytes": buffers * staging_bytes,
            "minimum_budget_committee": minimum_budget(sizes, 1),
            "minimum_budget_static": minimum_budget(sizes, 0)}


@dataclass(frozen=True)
class Sizing:
    """What a load keeps resident: committee sizes and slots per MoE layer, staging buffers."""

    committee_sizes: list[int]   # members per MoE layer (counts)
    slots: list[int]             # expert slots per MoE layer (members + spare slots)
    swap_buffers: int            # shared staging buffers (staged swaps), each `buffer_bytes // swap_buffers`
    buffer_bytes: int
    weight_bytes: int            # everything above plus the non-expert weights
    budget: int                  # the budget given, or weight_bytes when none was
    bytes_per_step: int          # swap I/O allowance per forward step
    shadow_counts: tuple = ()    # shadow experts per MoE layer (pcmoe/shadow.py); () = none
    shadow_bytes: int = 0        # their bytes (included in weight_bytes)


def size_committees(sizes: ModelBytes, budget: int | None, *, policy: str, swapped: bool, all_resident: bool,
                    spare_slots: int = 0, bytes_per_step: int | None = None, staging_bytes: int = 0,
                    plan_sizes: list[int] | None = None) -> Sizing:
    """Committee sizes, slots and staging buffers for a load, checked against the budget.

    swapped: the committee changes by swaps (needs spare slots, or staging buffers of
    `staging_bytes` each when spare_slots is 0); all_resident: the policy keeps every expert."""
    spare = spare_slots if swapped else 0
    bytes_per_step = default_bytes_per_step(sizes, bytes_per_step)
    buffers = swap_buffer_count(bytes_per_step, sizes.expert) if swapped and spare == 0 else 0
    buffer_bytes = buffers * staging_bytes
    if all_resident or (plan_sizes is None and (budget is None or sizes.full <= budget)):
        committee = list(sizes.num_experts)
    elif plan_sizes is not None:
        committee = list(plan_sizes)
    else:
        committee = uniform_sizes(budget - buffer_bytes, sizes, spare, policy, reserved=buffer_bytes)
    slots = slots_for(committee, sizes, spare)
    if all(n >= N for n, N in zip(committee, sizes.num_experts)):
        buffers = buffer_bytes = 0  # nothing will ever be swapped
    need = sizes.slots_bytes(slots) + buffer_bytes
    if budget is not None and need > budget:
        if all_resident:
            raise BudgetError(f"policy {policy} keeps every expert resident ({format_bytes(need)}) but the budget "
                              f"is {format_bytes(budget)}; raise the budget or use committee/on-demand")
        raise BudgetError(f"the plan needs {format_bytes(need)} of weights but the budget is {format_bytes(budget)} "
                          f"(minimum {format_bytes(minimum_budget(sizes, spare, buffer_bytes))})")
    return Sizing(committee, slots, buffers, buffer_bytes, need, budget if budget is not None else need,
                  bytes_per_step)


def uniform_sizes(budget: int, sizes: ModelBytes, spare_slots: int, policy: str, reserved: int = 0) -> list[int]:
    """The largest near-uniform committee sizes whose slots fit the budget (what is left of it
    after `reserved` bytes, e.g. swap staging buffers, which the error message then includes).

    Each layer gets the same share of its experts; leftover bytes give one more member to layers
    in order. A layer that keeps all its experts needs no spare slot."""
    L = len(sizes.num_experts)
    need_min = minimum_budget(sizes, spare_slots)
    if budget < need_min:
        total = need_min + reserved
        extra = f" + {format_bytes(reserved)} of swap staging buffers" if reserved else ""
        raise BudgetError(
            f"budget {format_bytes(budget + reserved)} is below the minimum {format_bytes(total)} for policy {policy} "
            f"(non-expert weights {format_bytes(sizes.nonexpert)} + {1 + spare_slots} expert slot(s) per MoE layer"
            f"{extra}); raise the budget to at least {total} bytes")
    best = [1] * L
    for n in range(1, max(sizes.num_experts) + 1):
        cand = [min(n, N) for N in sizes.num_experts]
        if sizes.slots_bytes(slots_for(cand, sizes, spare_slots)) > budget:
            break
        best = cand
    for layer in range(L):  # spend what is left, one expert per layer, in order
        if best[layer] >= sizes.num_experts[layer]:
            continue
        cand = list(best)
        cand[layer] += 1
        if sizes.slots_bytes(slots_for(cand, sizes, spare_slots)) <= budget:
            best = cand
    return best


def slots_for(committee_sizes: list[int], sizes: ModelBytes, spare_slots: int) -> list[int]:
    """A layer that keeps all its experts needs no spare slot."""
    return [n if n >= N else n + spare_slots for n, N in zip(committee_sizes, sizes.num_experts)]


def shadow_counts(committee: list[int], num_experts: list[int], shadow_bytes: list[int],
                  shadows: int | None) -> list[int]:
    """Shadows per layer: every non-member (or at most `shadows`) where the layer has a shadow form
    (shadow_bytes > 0), none where it has not."""
    return [0 if b <= 0 else max(0, N - n) if shadows is None else min(shadows, max(0, N - n))
            for n, N, b in zip(committee, num_experts, shadow_bytes)]


def shadow_split(sizes: ModelBytes, budget: int, shadow_bytes: list[int], *, reserved: int = 0,
                 spare_slots: int = 0, shadows: int | None = None) -> tuple[list[int], list[int]]:
    """Committee sizes and shadow counts per layer for a load with shadow experts: the largest
    near-uniform committees whose slots, plus `reserved` bytes (staging buffers), plus a shadow of
    `shadow_bytes[layer]` for each of `shadows` experts outside the committee (None: all of them)
    fit the budget (a layer of 0 shadow bytes has none). A member costs an expert and frees a shadow."""
    def counts(committee):
        return shadow_counts(committee, sizes.num_experts, shadow_bytes, shadows)

    def need(committee):
        return sizes.slots_bytes(slots_for(committee, sizes, spare_slots)) + reserved + sum(
            c * b for c, b in zip(counts(committee), shadow_bytes))

    L = len(sizes.num_experts)
    best = [1] * L
    if need(best) > budget:
        raise BudgetError(f"budget {format_bytes(budget)} is below the minimum {format_bytes(need(best))} for these "
                          f"shadow experts (non-expert weights {format_bytes(sizes.nonexpert)} + one member per MoE "
                          "layer + the shadows of the others); lower --shadow-experts, or raise the budget")
    for n in range(2, max(sizes.num_experts) + 1):
        cand = [min(n, N) for N in sizes.num_experts]
        if need(cand) > budget:
            break
        best = cand
    for layer in range(L):  # spend what is left, one member per layer, in order
        if best[layer] < sizes.num_experts[layer]:
            cand = list(best)
            cand[layer] += 1
            if need(cand) <= budget:
                best = cand
    return best, counts(best)


def shadow_sizing(sizes: ModelBytes, budget: int | None, one_shadow: int | list[int], *, policy: str, swapped: bool,
                  spare_slots: int, bytes_per_step: int | None, staging_bytes: int, wait_bytes: int = 0,
                  shadows: int | None = None, plan_sizes: list[int] | None = None) -> Sizing:
    """A load's (or a live budget change's) Sizing with shadow experts of `one_shadow` bytes each
    (or per layer, 0 = no shadows in that layer):
    shadow_split's committees, the shadow counts they leave, and `wait_bytes` (the exact-load
    buffer of --wait-above), all inside the budget. The arithmetic of the loader's shadow sizing."""
    from dataclasses import replace

    buffers = swap_buffer_count(default_bytes_per_step(sizes, bytes_per_step), sizes.expert) \
        if swapped and spare_slots == 0 else 0
    sb = list(one_shadow) if isinstance(one_shadow, (list, tuple)) else [one_shadow] * len(sizes.expert)
    committee = plan_sizes
    if plan_sizes is None and budget is not None and budget < sizes.full:
        committee, _ = shadow_split(sizes, budget - wait_bytes, sb, reserved=buffers * staging_bytes,
                                    spare_slots=spare_slots if swapped else 0, shadows=shadows)
    counts = [0] * len(sb) if committee is None else shadow_counts(committee, sizes.num_experts, sb, shadows)
    shadow_total = sum(c * b for c, b in zip(counts, sb)) + wait_bytes
    sizing = size_committees(sizes, None if budget is None else budget - shadow_total, policy=policy,
                             swapped=swapped, all_resident=False, spare_slots=spare_slots,
                             bytes_per_step=bytes_per_step, staging_bytes=staging_bytes, plan_sizes=committee)
    if all(n >= N for n, N in zip(sizing.committee_sizes, sizes.num_experts)):
        counts, shadow_total = [0] * len(counts), 0
    return replace(sizing, weight_bytes=sizing.weight_bytes + shadow_total,
                   budget=budget if budget is not None else sizing.weight_bytes + shadow_total,
                   shadow_counts=tuple(counts), shadow_bytes=shadow_total)


# -- non-expert weights at a precision (pcmoe.nonexpert holds them so) ------------------------------

_QUANTISED_NONEXPERT = re.compile(r"(?:\.self_attn\.[qkvo]_proj\.weight|^lm_head\.weight)$")


def quantized_weight_nbytes(out_f: int, in_f: int, mode: str | None, itemsize: int) -> int:
    """Bytes of one [out, in] weight in pcmoe.quant's layouts (scales at `itemsize`): int8 one byte
    per weight + a scale per row; int4 half a byte + (scale, zero) per row and group of 32 columns."""
    if mode is None:
        return out_f * in_f * itemsize
    if mode == "int8":
        return out_f * in_f + out_f * itemsize
    return out_f * in_f // 2 + in_f // 32 * out_f * 2 * itemsize


def is_quantised_nonexpert(name: str, shape: tuple[int, ...]) -> bool:
    """Whether --quantize-nonexpert quantises this non-expert tensor (attention projections, LM head,
    embedding)."""
    return len(shape) == 2 and (_QUANTISED_NONEXPERT.search(name) is not None or name.endswith("embed_tokens.weight"))


def nonexpert_nbytes_at(shapes: dict[str, tuple[int, ...]], itemsize: dict[str, int], mode: str | None) -> int:
    """Non-expert bytes with the attention projections, the LM head and the embedding at `mode` (a
    tied embedding is the quantised head: counted once, as the head or, where the head is not
    stored, as the embedding); every other tensor as it is. shapes / itemsize: non-expert tensor
    name -> shape / bytes per element (names as transformers saves them)."""
    total = 0
    for name, shape in shapes.items():
        if mode is not None and is_quantised_nonexpert(name, shape):
            total += quantized_weight_nbytes(shape[0], shape[1], mode, itemsize[name])
        else:
            n = 1
            for d in shape:
                n *= d
            total += n * itemsize[name]
    return total
