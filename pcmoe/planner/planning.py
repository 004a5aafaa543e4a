"""From a device profile to a plan file: what `pcmoe plan` and `--memory` call.

    planner = Planner.from_file("models/pcmoe-lm/device_profile.json")
    plan = planner.plan(memory=parse_memory("420MB", planner.full_memory()), latency=None)
    planner.plan_dict(plan)      # the plan file's JSON (`pcmoe plan -o` writes it; pcmoe.load(plan=...) serves it)

Torch-free unless the chosen quality model is the MLP (fitting it needs torch). The profile is
the JSON `pcmoe calibrate` writes (predict.py documents its fields); besides them it names the
search space it sampled ("precisions", "intervals", "update_unit") and how quality was measured
("quality": {"metric": "log_ppl" | "error_rate", "full_loss", ...}).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pcmoe.budget import BudgetError, format_bytes
from pcmoe.planner.predict import PROFILE_FORMAT, DeviceProfile, LatencyModel, MemoryModel
from pcmoe.planner.quality import QualityFit, fit_quality, samples_from_dicts
from pcmoe.planner.search import Plan, Problem, genetic
from pcmoe.planner.space import NO_SHADOW, Batch, Config, PlanError, SearchSpace, shadow_setting

PROFILE_FILE = "device_profile.json"    # beside the checkpoint; profile.json is the routing profile
PRECISION_NAMES = ("full", "int8", "int4")   # as plan files name them (pcmoe.formats)
QUALITY_MODELS = ("auto", "sensitivity", "mlp")


def profile_file(model_dir: str | os.PathLike) -> Path:
    return Path(model_dir) / PROFILE_FILE


def read_profile_data(path: str | os.PathLike) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / PROFILE_FILE
    if not p.exists():
        raise PlanError(f"device profile {p} does not exist; make one with `pcmoe calibrate --model DIR`")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PlanError(f"device profile {p} cannot be read ({e})") from None
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise PlanError(f"{p} is not a pcmoe device profile (expected \"format\": \"{PROFILE_FORMAT}\"); "
                        "`pcmoe calibrate` writes one")
    return data


def parse_memory(spec: str | int | float, full_bytes: float) -> int:
    """Bytes from "900MB", "1.5GiB", "123456" or "60%" (of the full model's predicted memory)."""
    from pcmoe.budget import ModelBytes, parse_budget

    text = str(spec).strip().lower()
    if text.endswith(("experts", "expert")):
        raise PlanError(f"--memory {spec!r}: a share of the experts is a weight budget (--budget); --memory is the "
                        "whole process, in bytes (900MB) or as a share of the full model's memory (60%)")
    try:
        return parse_budget(spec, ModelBytes(0, [int(full_bytes)], [1]))
    except BudgetError as e:
        raise PlanError(str(e).replace("budget", "memory")) from None


def parse_latency(spec: str | float | None) -> float | None:
    """Seconds from "40ms", "0.04s", "1500us" or a bare number of milliseconds."""
    if spec is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|us|µs)?\s*", str(spec).lower())
    if not m:
        raise PlanError(f"cannot read latency {spec!r}; use milliseconds per token or frame (40ms, 1.5ms, 0.04s)")
    value = float(m.group(1)) * {"ms": 1e-3, None: 1e-3, "s": 1.0, "us": 1e-6, "µs": 1e-6}[m.group(2)]
    if value <= 0:
        raise PlanError(f"the latency limit must be positive, got {spec!r}")
    return value


def format_latency(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3g} ms"


@dataclass
class Planner:
    """A device profile made ready to search: space, predictors, fitted quality model."""

    data: dict
    profile: DeviceProfile
    space: SearchSpace
    memory: MemoryModel
    latency: LatencyModel | None
    quality: QualityFit

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kw) -> Planner:
        return cls.from_data(read_profile_data(path), **kw)

    @classmethod
    def from_data(cls, data: dict, context_tokens: int | None = None, weights_only: bool = False,
                  quality_model: str = "auto", seed: int = 0, extra_bytes: int = 0) -> Planner:
        """weights_only: predict weight bytes alone (a --budget-like limit, no runtime or KV cache);
        extra_bytes: memory a front end adds (e.g. the server's imports)."""
        profile = DeviceProfile.from_dict(data)
        space = SearchSpace(num_experts=profile.num_experts,
                            precisions=tuple(data.get("precisions") or ("full",)),
                            intervals=tuple(int(f) for f in data.get("intervals") or (16,)),
                            nonexpert_precisions=tuple(data.get("nonexpert_precisions") or ()),
                            shadow_modes=tuple(data.get("shadow_modes") or ()))
        changes = {}
        if context_tokens is not None:
            if context_tokens < 0:
                raise PlanError(f"context must be >= 0 tokens, got {context_tokens}")
            changes["context_tokens"] = context_tokens
        if weights_only:
            changes.update(runtime_bytes=0, kv_bytes_per_token=0, context_tokens=0, nonexpert_runtime_bytes={},
                           shadow_runtime_bytes={})
        elif extra_bytes:
            changes["runtime_bytes"] = profile.runtime_bytes + int(extra_bytes)
        profile = dataclasses.replace(profile, **changes)
        if quality_model not in QUALITY_MODELS:
            raise PlanError(f"unknown quality model {quality_model!r}; choose from {', '.join(QUALITY_MODELS)}")
        samples = samples_from_dicts(data.get("quality_samples") or [], space)
        chosen = (data.get("quality") or {}).get("model") if quality_model == "auto" else quality_model
        candidates = (chosen,) if chosen in ("sensitivity", "mlp") else ("sensitivity", "mlp")
        quality = fit_quality(space, samples, seed=seed, candidates=candidates)
        latency = LatencyModel(space, profile) if profile.layer_points else None
        return cls(data, profile, space, MemoryModel(space, profile), latency, quality)

    @property
    def model_type(self) -> str | None:
        return self.data.get("model_type")

    @property
    def metric(self) -> str:
        return (self.data.get("quality") or {}).get("metric", "loss")

    def problem(self) -> Problem:
        return Problem(self.space, self.memory, self.quality, self.latency)

    def full_memory(self) -> float:
        return float(self.memory(self.space.full())[0])

    def plan(self, memory: float | None, latency: float | None = None, seed: int = 0) -> Plan:
        return genetic(self.problem(), memory, latency, seed=seed)

    def predict(self, config: Config) -> dict:
        batch = self.space.encode([config])
        return {"memory_bytes": int(self.memory(batch)[0]),
                "latency_s": float(self.latency(batch)[0]) if self.latency is not None else None,
                "loss": float(self.quality(batch)[0])}

    # -- what users read -----------------------------------------------------------------------

    def quality_text(self, loss: float) -> str:
        """A predicted loss in the metric's own terms (perplexity, accuracy)."""
        full = (self.data.get("quality") or {}).get("full_loss")
        if self.metric == "log_ppl":
            import math

            rel = f" ({math.exp(loss - full):.3f}x full)" if full is not None else ""
            return f"ppl {math.exp(loss):.2f}{rel}"
        if self.metric == "error_rate":
            return f"accuracy {1 - loss:.4f}"
        return f"loss {loss:.4f}"

    def quality_value(self, loss: float) -> float:
        import math

        return math.exp(loss) if self.metric == "log_ppl" else 1 - loss if self.metric == "error_rate" else loss

    def describe(self, plan: Plan) -> str:
        c = plan.config
        nonexpert = f"; non-expert {c.nonexpert_precision}" if c.nonexpert_precision else ""
        shadow = f"; shadows {shadow_text(c.shadow)}" if c.shadow not in (None, NO_SHADOW) else ""
        return (f"sizes {' '.join(map(str, c.sizes))}; precisions {' '.join(c.precisions)}{nonexpert}{shadow}; "
                f"F {c.interval}; "
                f"memory {format_bytes(plan.memory)}; latency {format_latency(plan.latency)}; "
                f"{self.quality_text(plan.quality)}")

    def plan_dict(self, plan: Plan, limits: dict | None = None) -> dict:
        """The plan file pcmoe.load(plan=...) serves (pcmoe.formats), with what the planner predicted."""
        c = plan.config
        options = {"update_every": c.interval}
        if self.data.get("update_unit"):
            options["update_unit"] = self.data["update_unit"]
        return {"format": "pcmoe-plan/1", "model_type": self.model_type, "num_experts": list(self.space.num_experts),
                "committee_sizes": list(c.sizes), "precisions": list(c.precisions), "options": options,
                "nonexpert_precision": c.nonexpert_precision or "full",
                **({"shadow": list(c.shadow) if isinstance(c.shadow, tuple) else c.shadow}
                   if c.shadow not in (None, NO_SHADOW) else {}),
                "predicted": {"memory_bytes": int(plan.memory), "latency_s": plan.latency, "loss": plan.quality,
                              "quality": self.quality_value(plan.quality), "metric": self.metric,
                              "context_tokens": self.profile.context_tokens},
                "limits": limits or {}, "planner": {"method": plan.method, "evaluated": plan.evaluated,
                                                    "quality_model": self.quality.name}}


def config_of_plan(data: dict, space: SearchSpace | None = None) -> Config:
    """The planner's Config of a plan file (precisions default to full, F to 16; the non-expert
    precision to full where `space` searches it, else to none)."""
    sizes = data.get("committee_sizes")
    if not isinstance(sizes, list):
        raise PlanError("the plan has no committee_sizes list")
    precisions = data.get("precisions") or ["full"] * len(sizes)
    options = data.get("options") or {}
    nonexpert, shadow = data.get("nonexpert_precision"), data.get("shadow")
    if isinstance(shadow, list):
        shadow = shadow_setting(shadow)
    if space is not None:   # a quantised one / a shadow where none is searched: validate says no
        nonexpert, shadow = space.nonexpert_of(nonexpert), space.shadow_of(shadow)
    return Config(sizes=tuple(sizes), precisions=tuple(precisions), interval=options.get("update_every", 16),
                  nonexpert_precision=nonexpert, shadow=shadow)


def shadow_text(shadow) -> str:
    """A configuration's shadow forms for people: "vq7", or "vq7 none int2 ..." per layer."""
    return " ".join(map(str, shadow)) if isinstance(shadow, tuple) else str(shadow)


def uniform_batch(space: SearchSpace) -> Batch:
    """Every uniform configuration: the same size, precision and shadow form in every layer (and
    each F and non-expert precision, which are one knob for the whole model anyway)."""
    import itertools

    import numpy as np

    rows = list(itertools.product(range(1, min(space.num_experts) + 1), range(len(space.precisions)),
                                  range(len(space.intervals)), range(max(1, len(space.nonexpert_precisions))),
                                  range(max(1, len(space.shadow_modes)))))
    L = space.layers
    return Batch(sizes=np.array([[min(n, N) for N in space.num_experts] for n, *_ in rows]).reshape(-1, L),
                 prec=np.array([[p] * L for _, p, *_ in rows]).reshape(-1, L),
                 nonexpert=np.array([r[3] for r in rows], dtype=np.int64),
                 interval=np.array([r[2] for r in rows], dtype=np.int64),
                 shadow=np.array([[r[4]] * L for r in rows], dtype=np.int64).reshape(-1, L))


def best_uniform(planner: Planner, memory: float | None, latency: float | None = None) -> Plan:
    """The ablation "simple planning": the best uniform configuration within the limits."""
    from pcmoe.planner.search import InfeasibleError, _order

    batch = uniform_batch(planner.space)
    values = planner.problem().evaluate(batch)
    i = _order(values, memory, latency, "quality", 1e-4)[0]
    mem, lat, q = values
    if (memory is not None and mem[i] > memory) or (latency is not None and lat[i] > latency):
        raise InfeasibleError(f"no uniform configuration fits in {format_bytes(memory)} and "
                              f"{format_latency(latency)}", float(mem.min()), float(lat.min()))
    return Plan(config=planner.space.decode(batch, i), memory=float(mem[i]),
                latency=float(lat[i]) if planner.latency is not None else None, quality=float(q[i]),
                method="uniform", evaluated=len(batch))


def plan_for_memory(model_dir: str | os.PathLike, memory: str, latency: str | None = None,
                    frontend: str | None = None, seed: int = 0) -> tuple[dict, str]:
    """(plan dict for pcmoe.load(plan=...), one line saying what was chosen) for a whole-process
    memory limit, from the device profile beside the checkpoint. `frontend`: a front end whose
    measured extra memory (the profile's "frontend_bytes", e.g. "serve") comes on top."""
    data = read_profile_data(profile_file(model_dir))
    extra = int((data.get("frontend_bytes") or {}).get(frontend, 0)) if frontend else 0
    planner = Planner.from_data(data, extra_bytes=extra, seed=seed)
    limit = parse_memory(memory, planner.full_memory())
    limit_s = parse_latency(latency)
    plan = planner.plan(limit, limit_s, seed=seed)
    limits = {"memory_bytes": limit, **({"latency_s": limit_s} if limit_s else {})}
    return planner.plan_dict(plan, limits), f"planned for --memory {memory}: {planner.describe(plan)}"
