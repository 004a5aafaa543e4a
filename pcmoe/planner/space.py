"""What the planner chooses: one configuration, the space it lives in, and a population as arrays.

A configuration decides, per MoE layer, how many experts stay resident (the committee size,
1..N_l) and at which precision they are held; optionally the precision of the non-expert
weights; optionally, per MoE layer, the form of the shadow experts (pcmoe.shadow: a low-bit
stand-in of every expert outside the layer's committee, or none); and the committee update interval F (tokens
between updates, from a short list). These are the knobs whose effect on memory, latency and
quality the profile measures, so they are all the search may move. The paper's genome (§6.6) is
the sizes and F; precision is added because a committee of int4 experts beats a bf16 committee of
the same bytes (issue 12), shadows because below int4's size they beat more members (issue 13).

The search works on a `Batch` (the same configurations as integer arrays) so that predictors
evaluate a whole population with a few numpy gathers; `Config` is what users and files see.

Config JSON (also the "config" of a quality sample in the profile):
  {"committee_sizes": [8, 16, ...],                # resident experts per MoE layer
   "expert_precisions": ["int4", "bf16", ...],     # per MoE layer, one of the space's precisions
   "nonexpert_precision": "full" | "int8" | "int4" | null,   # attention + LM head; null: as stored
   "shadow": "none" | "int2" | ... | ["vq7", "none", ...] | null,   # shadows of the non-members: one form
                                                   # for every layer or one per layer; null: none
   "update_every": 16}                             # F, tokens between committee updates
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from pcmoe.budget import BudgetError

NO_SHADOW = "none"


class PlanError(BudgetError):
    """A configuration, profile or constraint the planner cannot use; the message is one line."""


def shadow_setting(forms) -> str | tuple | None:
    """Per-layer shadow forms as a configuration holds them: one form where every layer has the
    same (None for all None), else a tuple of one per layer."""
    forms = tuple(forms)
    return forms[0] if len(set(forms)) == 1 else forms


@dataclass(frozen=True)
class SearchSpace:
    num_experts: tuple[int, ...]                    # N_l, experts per MoE layer
    precisions: tuple[str, ...] = ("bf16", "int8", "int4")   # expert precisions, most precise first
    intervals: tuple[int, ...] = (16,)              # candidate F, tokens between committee updates
    nonexpert_precisions: tuple[str, ...] = ()      # empty: non-expert weights stay as they are
    shadow_modes: tuple[str, ...] = ()              # ("none", "int2", ...); empty: no shadows searched

    def __post_init__(self):
        object.__setattr__(self, "num_experts", tuple(self.num_experts))
        object.__setattr__(self, "precisions", tuple(self.precisions))
        object.__setattr__(self, "intervals", tuple(self.intervals))
        object.__setattr__(self, "nonexpert_precisions", tuple(self.nonexpert_precisions))
        object.__setattr__(self, "shadow_modes", tuple(self.shadow_modes))
        if not self.num_experts or any(not isinstance(n, int) or n < 1 for n in self.num_experts):
            raise PlanError(f"num_experts must be a non-empty list of positive integers, got {list(self.num_experts)}")
        for name, values in (("precisions", self.precisions), ("intervals", self.intervals)):
            if not values or len(set(values)) != len(values):
                raise PlanError(f"the search space needs distinct {name}, got {list(values)}")
        if any(not isinstance(f, int) or f < 1 for f in self.intervals):
            raise PlanError(f"update intervals must be positive integers, got {list(self.intervals)}")
        if len(set(self.nonexpert_precisions)) != len(self.nonexpert_precisions):
            raise PlanError(f"nonexpert_precisions must be distinct, got {list(self.nonexpert_precisions)}")
        modes = self.shadow_modes
        if modes and (modes[0] != NO_SHADOW or len(set(modes)) != len(modes)):
            raise PlanError(f"shadow_modes must be distinct and start with {NO_SHADOW!r}, got {list(modes)}")

    def nonexpert_of(self, value: str | None) -> str | None:
        """A configuration's non-expert precision as this space names it: null ("as stored") is the
        space's first (full) precision where it searches one, and "full" is null where it does not."""
        if self.nonexpert_precisions:
            return self.nonexpert_precisions[0] if value is None else value
        return None if value == "full" else value

    def shadow_of(self, value: str | tuple | list | None) -> str | tuple | None:
        """A configuration's shadow form(s) as this space names them: null is "none" where the space
        searches shadows, and "none" is null where it does not; one per layer for a tuple or list."""
        if isinstance(value, (list, tuple)):
            return shadow_setting([self.shadow_of(f) for f in value])
        if self.shadow_modes:
            return NO_SHADOW if value is None else value
        return None if value == NO_SHADOW else value

    @property
    def layers(self) -> int:
        return len(self.num_experts)

    def size(self) -> int:
        """How many configurations the space holds."""
        count = len(self.intervals) * max(1, len(self.nonexpert_precisions))
        for n in self.num_experts:
            count *= n * len(self.precisions) * max(1, len(self.shadow_modes))
        return count

    # -- Config <-> Batch ----------------------------------------------------------------------

    def encode(self, configs: list[Config]) -> Batch:
        for c in configs:
            c.validate(self)
        return Batch(
            sizes=np.array([c.sizes for c in configs], dtype=np.int64).reshape(len(configs), self.layers),
            prec=np.array([[self.precisions.index(p) for p in c.precisions] for c in configs],
                          dtype=np.int64).reshape(len(configs), self.layers),
            nonexpert=np.array([self.nonexpert_precisions.index(c.nonexpert_precision)
                                if self.nonexpert_precisions and c.nonexpert_precision is not None else 0
                                for c in configs], dtype=np.int64),
            interval=np.array([self.intervals.index(c.interval) for c in configs], dtype=np.int64),
            shadow=np.array([[self.shadow_modes.index(f) if self.shadow_modes and f is not None else 0
                              for f in c.layer_shadows(self.layers)] for c in configs],
                            dtype=np.int64).reshape(len(configs), self.layers))

    def decode(self, batch: Batch, i: int) -> Config:
        return Config(sizes=tuple(int(n) for n in batch.sizes[i]),
                      precisions=tuple(self.precisions[int(p)] for p in batch.prec[i]),
                      interval=self.intervals[int(batch.interval[i])],
                      nonexpert_precision=self.nonexpert_precisions[int(batch.nonexpert[i])]
                      if self.nonexpert_precisions else None,
                      shadow=shadow_setting([self.shadow_modes[int(j)] for j in batch.shadow[i]])
                      if self.shadow_modes else None)

    def full(self) -> Batch:
        """The full model: every expert resident at the most precise precision (one configuration)."""
        zeros = np.zeros(1, dtype=np.int64)
        return Batch(np.array([self.num_experts], dtype=np.int64), np.zeros((1, self.layers), dtype=np.int64),
                     zeros, zeros.copy())   # shadow: none in every layer

    def all_resident(self) -> Batch:
        """Every expert resident, at each precision and each non-expert precision: configurations a
        layer-by-layer repair does not reach (the staging buffers go only once every layer is full)."""
        P, NE = len(self.precisions), max(1, len(self.nonexpert_precisions))
        prec, ne = np.divmod(np.arange(P * NE), NE)
        return Batch(np.tile(np.array(self.num_experts, dtype=np.int64), (P * NE, 1)),
                     np.repeat(prec[:, None], self.layers, axis=1), ne, np.zeros(P * NE, dtype=np.int64))

    def random(self, rng: np.random.Generator, count: int) -> Batch:
        """`count` configurations drawn uniformly, each gene independently."""
        n_max = np.array(self.num_experts)
        return Batch(sizes=1 + np.floor(rng.random((count, self.layers)) * n_max).astype(np.int64),
                     prec=rng.integers(0, len(self.precisions), (count, self.layers)),
                     nonexpert=rng.integers(0, max(1, len(self.nonexpert_precisions)), count),
                     interval=rng.integers(0, len(self.intervals), count),
                     shadow=rng.integers(0, len(self.shadow_modes), (count, self.layers)) if self.shadow_modes
                     else None)


@dataclass(frozen=True)
class Config:
    sizes: tuple[int, ...]            # committee size per MoE layer (resident experts, spare slots excluded)
    precisions: tuple[str, ...]       # expert precision per MoE layer
    interval: int                     # F, tokens between committee updates
    nonexpert_precision: str | None = None
    shadow: str | tuple | None = None  # form of the shadows of the non-members (space.shadow_modes): one
                                       # for every layer, or a tuple of one per layer

    def validate(self, space: SearchSpace) -> Config:
        L = space.layers
        if len(self.sizes) != L:
            raise PlanError(f"the configuration has {len(self.sizes)} committee sizes but the model has {L} MoE layers")
        if len(self.precisions) != L:
            raise PlanError(f"the configuration has {len(self.precisions)} expert precisions but the model has "
                            f"{L} MoE layers")
        for layer, (n, N) in enumerate(zip(self.sizes, space.num_experts)):
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= N:
                raise PlanError(f"committee size {n!r} for MoE layer {layer} must be an integer in 1..{N}")
        for layer, p in enumerate(self.precisions):
            if p not in space.precisions:
                raise PlanError(f"expert precision {p!r} for MoE layer {layer} is not one of "
                                f"{', '.join(space.precisions)}")
        if self.interval not in space.intervals:
            raise PlanError(f"update interval {self.interval!r} is not one of {', '.join(map(str, space.intervals))}")
        if space.nonexpert_precisions:   # None: as stored, the space's first (full) precision
            if self.nonexpert_precision is not None and self.nonexpert_precision not in space.nonexpert_precisions:
                raise PlanError(f"non-expert precision {self.nonexpert_precision!r} is not one of "
                                f"{', '.join(space.nonexpert_precisions)}")
        elif self.nonexpert_precision is not None:
            raise PlanError(f"non-expert precision {self.nonexpert_precision!r} given but the search space keeps "
                            "non-expert weights as they are")
        if isinstance(self.shadow, tuple) and len(self.shadow) != L:
            raise PlanError(f"the configuration has {len(self.shadow)} shadow forms but the model has {L} MoE layers")
        if space.shadow_modes:
            for form in self.layer_shadows(L):
                if form is not None and form not in space.shadow_modes:
                    raise PlanError(f"shadow {form!r} is not one of {', '.join(space.shadow_modes)}")
        elif any(f not in (None, NO_SHADOW) for f in self.layer_shadows(L)):
            raise PlanError(f"shadow {self.shadow!r} given but the search space has no shadow experts")
        return self

    def layer_shadows(self, layers: int) -> tuple:
        """The shadow form of each MoE layer (None where none is set)."""
        return tuple(self.shadow) if isinstance(self.shadow, tuple) else (self.shadow,) * layers

    def to_dict(self) -> dict:
        out = {"committee_sizes": list(self.sizes), "expert_precisions": list(self.precisions),
               "nonexpert_precision": self.nonexpert_precision, "update_every": self.interval}
        if self.shadow is not None:
            out["shadow"] = list(self.shadow) if isinstance(self.shadow, tuple) else self.shadow
        return out

    @classmethod
    def from_dict(cls, data: dict, space: SearchSpace | None = None) -> Config:
        if not isinstance(data, dict):
            raise PlanError(f"a configuration must be a JSON object, got {type(data).__name__}")
        missing = [k for k in ("committee_sizes", "expert_precisions", "update_every") if k not in data]
        if missing:
            raise PlanError(f"the configuration lacks {', '.join(missing)}")
        sizes, precisions = data["committee_sizes"], data["expert_precisions"]
        if not isinstance(sizes, list) or not isinstance(precisions, list):
            raise PlanError("committee_sizes and expert_precisions must be lists, one entry per MoE layer")
        nonexpert, shadow = data.get("nonexpert_precision"), data.get("shadow")
        if isinstance(shadow, list):
            if not all(f is None or isinstance(f, str) for f in shadow):
                raise PlanError("shadow must be a form or a list of forms, one per MoE layer")
            shadow = shadow_setting(shadow)
        elif shadow is not None and not isinstance(shadow, str):
            raise PlanError("shadow must be a form or a list of forms, one per MoE layer")
        if space is not None:
            nonexpert, shadow = space.nonexpert_of(nonexpert), space.shadow_of(shadow)
        config = cls(sizes=tuple(sizes), precisions=tuple(precisions), interval=data["update_every"],
                     nonexpert_precision=nonexpert, shadow=shadow)
        return config.validate(space) if space is not None else config

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str, space: SearchSpace | None = None) -> Config:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise PlanError(f"the configuration is not valid JSON ({e})") from None
        return cls.from_dict(data, space)


@dataclass(frozen=True)
class Batch:
    """P configurations as integer arrays (indices into the space's lists)."""
    sizes: np.ndarray        # [P, L] committee size per layer, 1..N_l
    prec: np.ndarray         # [P, L] index into space.precisions
    nonexpert: np.ndarray    # [P]    index into space.nonexpert_precisions (0 when not searched)
    interval: np.ndarray     # [P]    index into space.intervals
    shadow: np.ndarray | None = None   # [P, L] index into space.shadow_modes per layer (0 = none; None: all 0)

    def __post_init__(self):
        if self.shadow is None:
            object.__setattr__(self, "shadow", np.zeros(self.sizes.shape, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.interval)

    def genomes(self) -> np.ndarray:
        """[P, 3L + 2] int rows, one per configuration (to deduplicate and sort): sizes, precisions
        and shadow forms per layer, then the non-expert precision and F."""
        return np.concatenate([self.sizes, self.prec, self.shadow, self.nonexpert[:, None], self.interval[:, None]],
                              axis=1)

    @classmethod
    def from_genomes(cls, g: np.ndarray, layers: int) -> Batch:
        L = layers
        return cls(sizes=g[:, :L], prec=g[:, L:2 * L], shadow=g[:, 2 * L:3 * L], nonexpert=g[:, 3 * L],
                   interval=g[:, 3 * L + 1])

    def take(self, idx) -> Batch:
        return Batch(self.sizes[idx], self.prec[idx], self.nonexpert[idx], self.interval[idx], self.shadow[idx])

    def with_sizes(self, sizes: np.ndarray) -> Batch:
        return Batch(sizes, self.prec, self.nonexpert, self.interval, self.shadow)

    @staticmethod
    def concat(batches: list[Batch]) -> Batch:
        return Batch(*(np.concatenate([getattr(b, f) for b in batches])
                       for f in ("sizes", "prec", "nonexpert", "interval", "shadow")))
