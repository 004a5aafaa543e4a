"""Memory budgets, per-layer committee sizes, and the plan file format.

A budget counts weight bytes held in RAM: the non-expert weights (always resident) plus every
expert slot (committee members and the spare slots that swaps load into). The Python/torch runtime,
activations and the KV cache come on top; `pcmoe eval` reports them as the measured overhead.

Budget strings:  "1.5GB", "800MiB", "123456" (bytes);  "50%" = half of the full model's weight
bytes;  "50%experts" = the non-expert weights plus half of the expert weights.

Plan file (JSON, written by the planner, read by load/serve):
  {
    "format": "pcmoe-plan/1",
    "model_type": "qwen3_moe",
    "num_experts": [16, 16, ...],          # per MoE layer, to check the plan matches the model
    "committee_sizes": [8, 10, ...],       # resident members per MoE layer (spare slots excluded)
    "options": {"update_every": 32, ...}   # optional load() options (strategy, update_unit, ...)
  }
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pcmoe.system import atomic_write_text

PLAN_FORMAT = "pcmoe-plan/1"

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


def minimum_budget(sizes: ModelBytes, spare_slots: int) -> int:
    """Non-expert weights + one member (+ spare slots) per MoE layer."""
    return sizes.slots_bytes([min(1 + spare_slots, n) for n in sizes.num_experts])


def uniform_sizes(budget: int, sizes: ModelBytes, spare_slots: int, policy: str, reserved: int = 0) -> list[int]:
    """The largest near-uniform committee sizes whose slots fit the budget (what is left of it
    after `reserved` bytes, e.g. swap staging buffers, which the error message then includes).

    Each layer gets the same share of its experts; leftover bytes give one more member to layers
    in order. A layer that keeps all its experts needs no spare slot."""
    def slots(n_per_layer):
        return [n if n >= N else n + spare_slots for n, N in zip(n_per_layer, sizes.num_experts)]

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
        if sizes.slots_bytes(slots(cand)) > budget:
            break
        best = cand
    for layer in range(L):  # spend what is left, one expert per layer, in order
        if best[layer] >= sizes.num_experts[layer]:
            continue
        cand = list(best)
        cand[layer] += 1
        if sizes.slots_bytes(slots(cand)) <= budget:
            best = cand
    return best


def slots_for(committee_sizes: list[int], sizes: ModelBytes, spare_slots: int) -> list[int]:
    return [n if n >= N else n + spare_slots for n, N in zip(committee_sizes, sizes.num_experts)]


# -- plan files -----------------------------------------------------------------------------


def read_plan(plan: str | os.PathLike | dict) -> dict:
    if isinstance(plan, dict):
        data = plan
    else:
        path = Path(plan)
        if not path.exists():
            raise BudgetError(f"plan file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise BudgetError(f"plan file {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT or not isinstance(data.get("committee_sizes"),
                                                                                         list):
        raise BudgetError(f"not a pcmoe plan (expected \"format\": \"{PLAN_FORMAT}\" and a committee_sizes list)")
    return data


def check_plan(data: dict, model_type: str, num_experts: list[int]) -> list[int]:
    sizes = data["committee_sizes"]
    if data.get("model_type") not in (None, model_type):
        raise BudgetError(f"the plan is for a {data['model_type']} model, not {model_type}")
    if len(sizes) != len(num_experts):
        raise BudgetError(f"the plan has {len(sizes)} committee sizes but the model has {len(num_experts)} MoE layers")
    for layer, (n, N) in enumerate(zip(sizes, num_experts)):
        if not isinstance(n, int) or not 1 <= n <= N:
            raise BudgetError(f"plan committee size {n!r} for MoE layer {layer} must be an integer in 1..{N}")
    return list(sizes)


def write_plan(path: str | os.PathLike, model_type: str, num_experts: list[int], committee_sizes: list[int],
               options: dict | None = None, extra: dict | None = None) -> None:
    data = {"format": PLAN_FORMAT, "model_type": model_type, "num_experts": num_experts,
            "committee_sizes": committee_sizes, "options": options or {}}
    data.update(extra or {})
    atomic_write_text(Path(path), json.dumps(data, indent=1))
