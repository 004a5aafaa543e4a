"""Predicted memory and latency of a configuration, from numbers measured once per (model, device).

The planner must keep a whole process under a memory limit, so the memory prediction follows the
runtime's own accounting (pcmoe/engine.py, pcmoe/moe.py) rather than "experts × bytes":

    total = non-expert weights(precision)
          + Σ_l slots_l × bytes of one expert(layer l, precision_l)    slots = n_l (+ spare if n_l < N_l)
          + n_buffers × max_l staged expert(precision_l)   (shared swap staging: an expert as layer l
                      reads it, quantised from a quantised copy; none if every layer is full or spare
                      slots are used instead; store.staging_nbytes)
          + quant_staging × one full-precision expert per quantised layer   (SlotExperts.staging: only
                                                      where quantised layers are read at full precision)
          + runtime_bytes + kv_bytes_per_token × context_tokens              (measured, not modelled)
          + nonexpert_runtime_bytes[precision]   (measured: what running at that non-expert precision
                                                  needs beyond its bytes, relative to full; ≤ 0)
          + full_gemm_bytes if some full-precision layer holds >= 2 slots    (measured: bf16 matmuls of multi-token
                                                                            steps raise peak RSS, see calibrate.py)
          + Σ_l (N_l - n_l) × bytes of one shadow(layer l, form)   (with a shadow form: every non-member has one)
          + shadow_runtime_bytes[form] while some layer swaps      (measured: the shadows' scratch and reads)

Latency per decoded token = non-expert time(precision) + Σ_l T_l(n_l, precision_l)
+ Σ_{l not full} update_s[F][precision_l] + shadow_s[form] × Σ_l (N_l - n_l) / N_l (the shadows'
compute grows with the share of a layer's experts that are shadows). T_l is a line in n fitted to
a few measured points per precision (the paper's T_l(n), non-decreasing: the slope is clamped at 0).
The update cost depends on the precision because a swap into a quantised layer is quantised on the
compute thread when it is switched in (int4 ~1 ms per expert on the shipped LM); a plain number
applies to every precision.

Nothing here measures anything: every number comes from a DeviceProfile, which `pcmoe profile`
will write as JSON:

  {"format": "pcmoe-device-profile/1",
   "model_type": "qwen3_moe",                          # optional, checked by the caller
   "num_experts": [16, 16, ...],                       # N_l per MoE layer
   "expert_bytes": {"bf16": [b_0, ...], "int8": [...], "int4": [...]},   # bytes of ONE expert, per layer
   "nonexpert_bytes": {"bf16": 9000000, "int8": 5000000},               # all non-expert weights, bytes
   "full_precision": "bf16",        # how experts are stored on disk (staging buffers hold this)
   "n_buffers": 2,                  # shared swap staging buffers (engine: bytes_per_step / expert)
   "staging_bytes": {"bf16": 393216, "int4": 122880},   # one staging buffer when every layer is at that
                                    # precision (default: one full-precision expert)
   "spare_slots": 0,                # extra slots per non-full layer (then no shared buffers)
   "quant_staging": 1,              # full-precision buffers per quantised layer (one per loading thread)
   "runtime_bytes": 180000000,      # measured process memory beyond weights and KV: torch, allocator, activations
   "nonexpert_runtime_bytes": {"int4": -12000000},   # the runtime's memory at that non-expert precision
                                    # minus at full (default 0)
   "shadow_bytes": {"int2": [55296, ...]},   # bytes of ONE shadow expert, per layer (per form searched)
   "shadow_runtime_bytes": {"int2": 3000000},   # the runtime's memory with shadows minus without
   "full_gemm_bytes": 60000000,     # measured extra peak RSS once any full-precision bank of >= 2 slots computes
   "kv_bytes_per_token": 12288,     # KV cache bytes per token of context
   "context_tokens": 1024,          # context the plan must hold (dataclasses.replace to plan for another)
   "latency": {                                         # seconds per decoded token, batch 1
     "nonexpert_s": {"bf16": 0.0021, "int8": 0.0019},   # all work outside the MoE layers
     "shadow_s": {"int2": 0.00004},   # one MoE layer's shadow time per token at share 1 (times (N_l - n_l) / N_l)
     "layer_points": [{"layer": null, "size": 4, "precision": "bf16", "seconds": 0.00031}, ...],
                                  # one MoE layer's time at that committee size; layer null = every layer
     "update_s": {"16": 0.00002}},  # amortised committee-update cost per token per non-full layer, by F
                                    # (or by F and precision: {"16": {"bf16": 0.00001, "int4": 0.00004}})
   "quality_samples": [{"config": {<Config JSON, see space.py>}, "loss": 2.79}, ...]}  # see quality.py
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from pcmoe.planner.space import Batch, PlanError, SearchSpace

PROFILE_FORMAT = "pcmoe-device-profile/1"
_SCALARS = ("full_precision", "n_buffers", "spare_slots", "quant_staging", "runtime_bytes", "kv_bytes_per_token",
            "context_tokens", "full_gemm_bytes")


@dataclass(frozen=True)
class LatencyPoint:
    size: int                  # committee size measured
    precision: str
    seconds: float             # one MoE layer's decode time per token at that size
    layer: int | None = None   # None: measured on one layer, valid for all (same shapes)


@dataclass(frozen=True)
class DeviceProfile:
    num_experts: tuple[int, ...]
    expert_bytes: dict[str, tuple[int, ...]]     # precision -> bytes of one expert, per layer
    nonexpert_bytes: dict[str, int]              # precision -> bytes of all non-expert weights
    full_precision: str = "bf16"
    n_buffers: int = 2
    spare_slots: int = 0
    quant_staging: int = 0
    runtime_bytes: int = 0
    full_gemm_bytes: int = 0                     # see the module docstring
    kv_bytes_per_token: int = 0
    context_tokens: int = 0
    staging_bytes: dict[str, int] = field(default_factory=dict)   # precision -> one staging buffer's bytes
    nonexpert_runtime_bytes: dict[str, int] = field(default_factory=dict)   # precision -> runtime bytes vs full
    nonexpert_s: dict[str, float] = field(default_factory=dict)   # precision -> seconds per token
    shadow_bytes: dict[str, tuple[int, ...]] = field(default_factory=dict)   # form -> one shadow's bytes per layer
    shadow_runtime_bytes: dict[str, int] = field(default_factory=dict)       # form -> runtime bytes vs none
    shadow_s: dict[str, float] = field(default_factory=dict)   # form -> s per token per layer at missing share 1
    layer_points: tuple[LatencyPoint, ...] = ()
    update_s: dict = field(default_factory=dict)   # F -> seconds per token per non-full layer (or {precision: s})

    @classmethod
    def from_dict(cls, data: dict) -> DeviceProfile:
        if not isinstance(data, dict) or data.get("format", PROFILE_FORMAT) != PROFILE_FORMAT:
            raise PlanError(f"not a pcmoe device profile (expected \"format\": \"{PROFILE_FORMAT}\")")
        missing = [k for k in ("num_experts", "expert_bytes", "nonexpert_bytes") if k not in data]
        if missing:
            raise PlanError(f"the device profile lacks {', '.join(missing)}")
        lat = data.get("latency") or {}
        try:
            points = tuple(LatencyPoint(size=int(p["size"]), precision=str(p["precision"]),
                                        seconds=float(p["seconds"]), layer=p.get("layer"))
                           for p in lat.get("layer_points", []))
            return cls(num_experts=tuple(int(n) for n in data["num_experts"]),
                       expert_bytes={str(k): tuple(int(b) for b in v) for k, v in data["expert_bytes"].items()},
                       nonexpert_bytes={str(k): int(v) for k, v in data["nonexpert_bytes"].items()},
                       staging_bytes={str(k): int(v) for k, v in (data.get("staging_bytes") or {}).items()},
                       nonexpert_runtime_bytes={str(k): int(v) for k, v in
                                                (data.get("nonexpert_runtime_bytes") or {}).items()},
                       **{k: (str if k == "full_precision" else int)(data[k]) for k in _SCALARS if k in data},
                       nonexpert_s={str(k): float(v) for k, v in lat.get("nonexpert_s", {}).items()},
                       shadow_bytes={str(k): tuple(int(b) for b in v) for k, v in
                                     (data.get("shadow_bytes") or {}).items()},
                       shadow_runtime_bytes={str(k): int(v) for k, v in
                                             (data.get("shadow_runtime_bytes") or {}).items()},
                       shadow_s={str(k): float(v) for k, v in lat.get("shadow_s", {}).items()},
                       layer_points=points,
                       update_s={int(k): {str(p): float(u) for p, u in v.items()} if isinstance(v, dict)
                                 else float(v) for k, v in lat.get("update_s", {}).items()})
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise PlanError(f"the device profile has a malformed entry ({type(e).__name__}: {e})") from None

    def to_dict(self) -> dict:
        return {"format": PROFILE_FORMAT, "num_experts": list(self.num_experts),
                "expert_bytes": {k: list(v) for k, v in self.expert_bytes.items()},
                "nonexpert_bytes": dict(self.nonexpert_bytes), "staging_bytes": dict(self.staging_bytes),
                "nonexpert_runtime_bytes": dict(self.nonexpert_runtime_bytes),
                "shadow_bytes": {k: list(v) for k, v in self.shadow_bytes.items()},
                "shadow_runtime_bytes": dict(self.shadow_runtime_bytes),
                **{k: getattr(self, k) for k in _SCALARS},
                "latency": {"nonexpert_s": dict(self.nonexpert_s), "shadow_s": dict(self.shadow_s),
                            "layer_points": [{"layer": q.layer, "size": q.size, "precision": q.precision,
                                              "seconds": q.seconds} for q in self.layer_points],
                            "update_s": {str(k): v for k, v in self.update_s.items()}}}

    @classmethod
    def from_json(cls, text: str) -> DeviceProfile:
        try:
            return cls.from_dict(json.loads(text))
        except ValueError as e:
            if isinstance(e, PlanError):
                raise
            raise PlanError(f"the device profile is not valid JSON ({e})") from None

    def check(self, space: SearchSpace) -> None:
        """One-line error when the profile cannot price every configuration of the space."""
        if tuple(space.num_experts) != tuple(self.num_experts):
            raise PlanError(f"the profile is for experts per layer {list(self.num_experts)}, the search space has "
                            f"{list(space.num_experts)}")
        for p in set(space.precisions) | {self.full_precision}:
            if len(self.expert_bytes.get(p, ())) != space.layers:
                raise PlanError(f"the profile needs bytes of one {p} expert for each of the {space.layers} MoE layers")
        for p in space.nonexpert_precisions or (self.full_precision,):
            if p not in self.nonexpert_bytes:
                raise PlanError(f"the profile has no non-expert bytes at precision {p}")
        for form in space.shadow_modes[1:]:
            if len(self.shadow_bytes.get(form, ())) != space.layers:
                raise PlanError(f"the profile needs bytes of one {form} shadow for each of the {space.layers} "
                                "MoE layers")
        for q in self.layer_points:
            if q.layer is not None and not (isinstance(q.layer, int) and 0 <= q.layer < space.layers):
                raise PlanError(f"a decode-time point names MoE layer {q.layer!r}; the model has {space.layers}")
            if q.size < 1 or q.seconds < 0:
                raise PlanError(f"a decode-time point has size {q.size} and {q.seconds} s; both must be positive")
        for name in _SCALARS[1:]:
            if getattr(self, name) < 0:
                raise PlanError(f"profile {name} must be >= 0, got {getattr(self, name)}")


def _nonexpert_keys(space: SearchSpace, profile: DeviceProfile) -> tuple[str, ...]:
    return space.nonexpert_precisions or (profile.full_precision,)


class MemoryModel:
    """Predicted total process bytes. Tables are built once; a population costs a few gathers."""

    def __init__(self, space: SearchSpace, profile: DeviceProfile):
        profile.check(space)
        self.space, self.profile = space, profile
        N = np.array(space.num_experts)                                   # [L]
        n = np.arange(1, N.max() + 1)                                     # [S] candidate sizes
        slots = np.where(n[None, :] >= N[:, None], n[None, :], n[None, :] + profile.spare_slots)   # [L, S]
        full = np.array(profile.expert_bytes[profile.full_precision], dtype=np.float64)            # [L] bytes
        table = np.empty((space.layers, len(space.precisions), len(n)))  # [L, P, S] bytes of layer l
        for i, p in enumerate(space.precisions):
            per_expert = np.array(profile.expert_bytes[p], dtype=np.float64)
            quant_buf = profile.quant_staging * full if p != profile.full_precision else 0.0
            table[:, i, :] = slots * per_expert[:, None] + np.broadcast_to(quant_buf, (space.layers,))[:, None]
        self.layer_bytes = np.where((n[None, :] > N[:, None])[:, None, :], np.inf, table)  # no sizes beyond N_l
        # Shared swap buffers exist only when some layer swaps and swaps go through them (no spare slots);
        # each holds the largest expert any layer stages (by its precision).
        per = [profile.staging_bytes.get(p, full.max()) for p in space.precisions]
        self.staging = np.array(per, float) * profile.n_buffers * (profile.spare_slots == 0)     # [P] bytes
        keys = _nonexpert_keys(space, profile)
        self.nonexpert_bytes = np.array([profile.nonexpert_bytes[p] for p in keys], float)              # [NE]
        self.nonexpert_runtime = np.array([profile.nonexpert_runtime_bytes.get(p, 0) for p in keys], float)  # [NE]
        self.nonexpert = self.nonexpert_bytes + self.nonexpert_runtime                                    # [NE]
        self.fixed = float(profile.runtime_bytes + profile.kv_bytes_per_token * profile.context_tokens)
        # [L, P, S] True where layer l at precision p and size s holds a full-precision bank of >= 2 slots
        self.gemm_cells = np.zeros(self.layer_bytes.shape, dtype=bool)
        if profile.full_gemm_bytes and profile.full_precision in space.precisions:
            self.gemm_cells[:, space.precisions.index(profile.full_precision), :] = slots >= 2
        self.gemm_bytes = float(profile.full_gemm_bytes)
        # [SH, L, S] bytes of layer l's shadows at committee size s (form 0 = none: no shadow)
        self.shadow_layer = shadow_table(space, lambda form: np.array(profile.shadow_bytes[form], float)[:, None]
                                         * (N[:, None] - n[None, :]).clip(min=0))
        self.shadow_runtime = np.array([0.0] + [profile.shadow_runtime_bytes.get(f, 0)
                                                for f in space.shadow_modes[1:]])                # [SH]

    def __call__(self, batch: Batch) -> np.ndarray:
        """[P] predicted bytes of the whole process."""
        layers = np.arange(self.space.layers)
        weights = self.layer_bytes[layers, batch.prec, batch.sizes - 1].sum(axis=1)           # [P]
        gemm = self.gemm_cells[layers, batch.prec, batch.sizes - 1].any(axis=1)              # [P]
        return (self.nonexpert[batch.nonexpert] + weights + self.shadows_of(batch) + self.staging_of(batch)
                + self.fixed + gemm * self.gemm_bytes)

    def staging_of(self, batch: Batch) -> np.ndarray:
        """[P] bytes of the shared staging buffers (0 where no layer swaps)."""
        swapping = (batch.sizes < np.array(self.space.num_experts)).any(axis=1)              # [P]
        return swapping * self.staging[batch.prec].max(axis=1)

    def shadows_of(self, batch: Batch) -> np.ndarray:
        """[P] bytes of the shadow experts and the runtime memory they need (0 without shadows or
        where every layer is full: then the loader makes none)."""
        layers = np.arange(self.space.layers)
        swapping = batch.sizes < np.array(self.space.num_experts)                            # [P, L] non-full
        # the measured runtime memory of the forms the non-full layers hold: the largest (either sign)
        held = swapping & (batch.shadow > 0)                                                 # [P, L]
        runtime = np.where(held, self.shadow_runtime[batch.shadow], -np.inf).max(axis=1)     # [P]
        runtime = np.where(held.any(axis=1), runtime, 0.0)
        return self.shadow_layer[batch.shadow, layers, batch.sizes - 1].sum(axis=1) + runtime

    def breakdown(self, batch: Batch, i: int = 0) -> dict[str, int]:
        one = batch.take([i])
        layers = np.arange(self.space.layers)
        gemm = bool(self.gemm_cells[layers, one.prec[0], one.sizes[0] - 1].any())
        ne = int(one.nonexpert[0])
        delta = self.nonexpert_runtime[ne]
        shadow_weights = int(self.shadow_layer[one.shadow[0], layers, one.sizes[0] - 1].sum())
        return {"nonexpert": int(self.nonexpert_bytes[ne]),
                "experts": int(self.layer_bytes[layers, one.prec[0], one.sizes[0] - 1].sum()),
                **({"shadows": shadow_weights} if self.space.shadow_modes else {}),
                "staging": int(self.staging_of(one)[0]),
                "runtime": int(self.profile.runtime_bytes + delta + gemm * self.gemm_bytes
                               + self.shadows_of(one)[0] - shadow_weights),
                "kv_cache": int(self.profile.kv_bytes_per_token * self.profile.context_tokens),
                "total": int(self(one)[0])}

    def least(self) -> tuple[float, Batch]:
        """The exact minimum over the whole space and one configuration reaching it: the minimum
        without the full_gemm term (those cells excluded) or with it (everything allowed)."""
        best = self._least(np.where(self.gemm_cells, np.inf, self.layer_bytes))
        if self.gemm_cells.any():
            other = self._least(self.layer_bytes)
            if other[0] < best[0]:
                best = other
        return best

    def _least(self, table: np.ndarray) -> tuple[float, Batch]:
        N = np.array(self.space.num_experts)
        L = self.space.layers
        layers = np.arange(L)
        # Case "all full": no staging. Case "some swap": each layer its cheapest (size, precision), + staging
        # of those precisions. (If the latter's choice is all full it costs more than the former, so min of the
        # two is exact, given that the cheapest precision also stages the fewest bytes, as quantised ones do.)
        full_p = table[layers, :, N - 1].argmin(axis=1)                                      # [L]
        full_cost = table[layers, full_p, N - 1].sum()
        flat = table.reshape(L, -1).argmin(axis=1)                                            # [L] over (p, s)
        any_p, any_s = flat // table.shape[2], flat % table.shape[2]
        any_cost = table[layers, any_p, any_s].sum() + self.staging[any_p].max()
        ne = int(self.nonexpert.argmin())
        if full_cost <= any_cost:
            best = Batch(N[None, :].copy(), full_p[None, :], np.array([ne]), np.array([0]))
        else:
            best = Batch((any_s + 1)[None, :], any_p[None, :], np.array([ne]), np.array([0]))
        return float(self(best)[0]), best


def shadow_table(space: SearchSpace, per_form) -> np.ndarray:
    """[SH, L, S]: zeros for form 0 (none), per_form(form) [L, S] for the others (S = largest N_l)."""
    table = np.zeros((max(1, len(space.shadow_modes)), space.layers, max(space.num_experts)))
    for i, form in enumerate(space.shadow_modes[1:], start=1):
        table[i] = per_form(form)
    return table


def fit_line(sizes: np.ndarray, seconds: np.ndarray) -> tuple[float, float]:
    """Least-squares t = a + b·n with b >= 0 (more members never make a layer faster)."""
    if len(np.unique(sizes)) < 2:
        return float(seconds.mean()), 0.0
    b, a = np.polyfit(sizes.astype(float), seconds.astype(float), 1)
    if b < 0:
        return float(seconds.mean()), 0.0
    return float(a), float(b)


class LatencyModel:
    """Predicted seconds per decoded token (batch 1)."""

    def __init__(self, space: SearchSpace, profile: DeviceProfile):
        profile.check(space)
        self.space = space
        N = np.array(space.num_experts)
        n = np.arange(1, N.max() + 1)                                     # [S]
        table = np.empty((space.layers, len(space.precisions), len(n)))  # [L, P, S] seconds
        for layer in range(space.layers):
            for i, p in enumerate(space.precisions):
                pts = [q for q in profile.layer_points if q.precision == p and q.layer == layer] or \
                      [q for q in profile.layer_points if q.precision == p and q.layer is None]
                if not pts:
                    raise PlanError(f"the profile has no decode-time points for {p} experts (MoE layer {layer})")
                a, b = fit_line(np.array([q.size for q in pts]), np.array([q.seconds for q in pts]))
                table[layer, i] = np.maximum(a + b * n, 0.0)
        self.layer_s = np.where((n[None, :] > N[:, None])[:, None, :], np.inf, table)
        keys = _nonexpert_keys(space, profile)
        missing = [p for p in keys if p not in profile.nonexpert_s]
        if missing:
            raise PlanError(f"the profile has no non-expert decode time at precision {', '.join(missing)}")
        self.nonexpert = np.array([profile.nonexpert_s[p] for p in keys])                   # [NE] seconds
        def cost(f, p):
            u = profile.update_s.get(f, 0.0)
            return float(u.get(p, 0.0)) if isinstance(u, dict) else float(u)

        # [F, P] seconds per token per non-full layer
        self.update = np.array([[cost(f, p) for p in space.precisions] for f in space.intervals]).reshape(
            len(space.intervals), len(space.precisions))
        missing = [f for f in space.shadow_modes[1:] if f not in profile.shadow_s]
        if missing:
            raise PlanError(f"the profile has no decode time of {', '.join(missing)} shadows")
        share = (N[:, None] - n[None, :]).clip(min=0) / N[:, None]                          # [L, S] shadows / N_l
        self.shadow_layer_s = shadow_table(space, lambda form: profile.shadow_s[form] * share)   # [SH, L, S]

    def __call__(self, batch: Batch) -> np.ndarray:
        """[P] predicted seconds per token."""
        layers = np.arange(self.space.layers)
        swapping = batch.sizes < np.array(self.space.num_experts)                           # [P, L] non-full
        update = (self.update[batch.interval[:, None], batch.prec] * swapping).sum(axis=1)  # [P]
        shadows = self.shadow_layer_s[batch.shadow, layers, batch.sizes - 1].sum(axis=1)       # [P]
        return (self.nonexpert[batch.nonexpert] + self.layer_s[layers, batch.prec, batch.sizes - 1].sum(axis=1)
                + update + shadows)

    def least(self) -> tuple[float, Batch]:
        """The exact minimum: layers are independent once F is fixed, so try each F."""
        N = np.array(self.space.num_experts)
        L, S = self.space.layers, self.layer_s.shape[2]
        best = None
        for f, u in enumerate(self.update):                                                 # u [P]
            cost = self.layer_s + u[None, :, None] * (np.arange(1, S + 1)[None, None, :] < N[:, None, None])
            flat = cost.reshape(L, -1).argmin(axis=1)
            cand = Batch((flat % S + 1)[None, :], (flat // S)[None, :],
                         np.array([int(self.nonexpert.argmin())]), np.array([f]))
            value = float(self(cand)[0])
            if best is None or value < best[0]:
                best = (value, cand)
        return best
