"""The small JSON files pcmoe reads and writes beside a checkpoint or on request.

  plan            {"format": "pcmoe-plan/1", "model_type", "num_experts": [N per MoE layer],
                   "committee_sizes": [members per MoE layer], "options": {load() options},
                   "precisions": [per MoE layer: "full" (the model's dtype), "int8" or "int4"] (optional),
                   "nonexpert_precision": "full" | "int8" | "int4" (optional: attention projections and LM
                   head, lean-decoder families),
                   "shadow": "int2" | ... | ["int2", "int1", "none", ...] (optional: shadows of every non-member,
                              one form for the model or one per MoE layer; pcmoe.shadow)}
  model options   pcmoe_options.json beside a checkpoint: {"format": "pcmoe-options/1", "options": {...}},
                  committee knobs the model's publisher measured best (below plan and explicit options)
  routing profile profile.json (from `pcmoe profile`): {"format": "pcmoe-profile/1", "model_type",
                  "num_experts", "importance": [[per expert] per layer], "counts": [[...]]}

Torch-free; every problem is one FormatError line naming the file and what to do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pcmoe.system import atomic_write_text

PLAN_FORMAT = "pcmoe-plan/1"
PROFILE_FORMAT = "pcmoe-profile/1"
MODEL_OPTIONS_FILE = "pcmoe_options.json"


class FormatError(ValueError):
    """A plan, options or profile file that cannot be used; the message says why and what to do."""


def _read_json(path: Path, what: str, hint: str):
    if not path.exists():
        raise FormatError(f"{what} {path} does not exist{hint}")
    if not path.is_file():
        raise FormatError(f"{what} {path} is not a file")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{what} {path} is not valid JSON ({e})") from None


# -- plans ---------------------------------------------------------------------------------------


def read_plan(plan: str | os.PathLike | dict) -> dict:
    if isinstance(plan, dict):
        data = plan
    else:
        data = _read_json(Path(plan), "plan file", "")
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT or not isinstance(data.get("committee_sizes"),
                                                                                         list):
        raise FormatError(f"not a pcmoe plan (expected \"format\": \"{PLAN_FORMAT}\" and a committee_sizes list)")
    return data


def check_plan(data: dict, model_type: str, num_experts: list[int]) -> list[int]:
    sizes = data["committee_sizes"]
    if data.get("model_type") not in (None, model_type):
        raise FormatError(f"the plan is for a {data['model_type']} model, not {model_type}")
    if len(sizes) != len(num_experts):
        raise FormatError(f"the plan has {len(sizes)} committee sizes but the model has {len(num_experts)} MoE layers")
    for layer, (n, N) in enumerate(zip(sizes, num_experts)):
        if not isinstance(n, int) or not 1 <= n <= N:
            raise FormatError(f"plan committee size {n!r} for MoE layer {layer} must be an integer in 1..{N}")
    return list(sizes)


PRECISIONS = {"full": None, "bf16": None, "bfloat16": None, "float32": None, "fp32": None, "none": None,
              "int8": "int8", "int4": "int4"}


def check_precisions(data: dict, layers: int) -> list[str | None] | None:
    """The plan's per-layer expert precisions as quantize modes (None = full precision), or None
    when the plan names none."""
    values = data.get("precisions")
    if values is None:
        return None
    if not isinstance(values, list) or len(values) != layers:
        raise FormatError(f"the plan's precisions must be a list of {layers} entries (one per MoE layer)")
    bad = [v for v in values if not isinstance(v, str) or v.lower() not in PRECISIONS]
    if bad:
        raise FormatError(f"plan precision {bad[0]!r} is not one of full, int8, int4")
    return [PRECISIONS[v.lower()] for v in values]


def check_nonexpert_precision(data: dict) -> str | None:
    """The plan's non-expert precision as a nonexpert_quantize mode (None = full precision)."""
    value = data.get("nonexpert_precision")
    if value is None:
        return None
    if not isinstance(value, str) or value.lower() not in PRECISIONS:
        raise FormatError(f"plan nonexpert_precision {value!r} is not one of full, int8, int4")
    return PRECISIONS[value.lower()]


# shadow experts (pcmoe/shadow.py); pcmoe.options names them from here
SHADOWS = ("int1", "int2", "int3", "vq6", "vq7", "vq8", "lowrank")


def parse_shadow(value, what: str = "shadow") -> str | tuple[str | None, ...] | None:
    """A shadow setting as the loader takes it: None (no shadows), one form for every MoE layer,
    or a tuple of one form (or None) per layer. `value`: None, "none", a form, "int2,int1,none,..."
    or a list of forms. Raises FormatError naming `what` for anything else."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    if isinstance(items, (list, tuple)):   # None in a list: no shadows in that layer (as parse_shadow returns it)
        items = ["none" if v is None else v for v in items]
    if not isinstance(items, (list, tuple)) or not items or any(not isinstance(v, str) for v in items):
        raise FormatError(f"{what} {value!r} is not one of none, {', '.join(SHADOWS)} or a list of them (one per "
                          "MoE layer)")
    forms = [v.strip() for v in items]
    bad = [v for v in forms if v not in (*SHADOWS, "none")]
    if bad:
        raise FormatError(f"{what} {bad[0]!r} is not one of none, {', '.join(SHADOWS)}")
    per_layer = tuple(None if v == "none" else v for v in forms)
    if all(v is None for v in per_layer):
        return None
    if len(per_layer) == 1 or (isinstance(value, str) and "," not in value):
        return per_layer[0]
    return per_layer


def check_shadow(data: dict) -> str | tuple[str | None, ...] | None:
    """The plan's shadow forms (None: no shadows; "none" says so explicitly; a list: one per layer)."""
    return parse_shadow(data.get("shadow"), "plan shadow")


def write_plan(path: str | os.PathLike, model_type: str, num_experts: list[int], committee_sizes: list[int],
               options: dict | None = None, extra: dict | None = None, precisions: list[str] | None = None) -> None:
    data = {"format": PLAN_FORMAT, "model_type": model_type, "num_experts": num_experts,
            "committee_sizes": committee_sizes, "options": options or {}}
    if precisions is not None:
        data["precisions"] = list(precisions)
    data.update(extra or {})
    atomic_write_text(Path(path), json.dumps(data, indent=1))


# -- model options -------------------------------------------------------------------------------


def read_model_options(checkpoint_dir) -> dict:
    """Committee settings a model's publisher measured best for it, from pcmoe_options.json beside
    the checkpoint ({"format": "pcmoe-options/1", "options": {...}}): defaults below a plan's
    options and explicit keyword options. {} when there is no such file."""
    path = Path(checkpoint_dir) / MODEL_OPTIONS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path} is not valid JSON ({e}); fix or delete it") from None
    if not isinstance(data, dict) or data.get("format") != "pcmoe-options/1" \
            or not isinstance(data.get("options"), dict):
        raise FormatError(f"{path} is not a pcmoe options file (expected {{\"format\": \"pcmoe-options/1\", "
                          f"\"options\": {{...}}}}); fix or delete it")
    return data["options"]


# -- routing profiles ----------------------------------------------------------------------------


def profile_path(folder: Path, given: str | None, policy: str) -> str | None:
    """The routing profile to use: the given file, else the profile.json shipped beside the
    checkpoint (a warm start for the committee, the subset of static-frequency), else none."""
    if given is not None and str(given).lower() in ("", "none"):
        given = None
    elif given is None and (folder / "profile.json").exists() and policy in ("committee", "on-demand",
                                                                             "static-frequency"):
        given = str(folder / "profile.json")
    if policy == "static-frequency" and given is None:
        raise FormatError("static-frequency needs a routing profile: pass profile=FILE (make one with "
                         "`pcmoe profile --model DIR --data FILE.txt`) or put profile.json beside the checkpoint")
    return given


def read_profile(path, model_type: str, num_experts: list[int]) -> dict:
    p = Path(path)
    data = _read_json(p, "profile", "; make one with `pcmoe profile`")
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT or data.get("num_experts") != num_experts:
        raise FormatError(f"profile {p} does not match this model (expected format {PROFILE_FORMAT} "
                         f"and experts per layer {num_experts})")
    return data
