"""What load() accepts, the names of policies and strategies, and the sampling and text rules that
the CLI and the server share (torch-free, for fast CLIs)."""

from __future__ import annotations

from dataclasses import dataclass

from pcmoe.formats import (
    SHADOWS,  # noqa: F401  (the shadow forms load() accepts, as plan files name them)
    FormatError,
    parse_shadow,
)

POLICIES = ("full", "committee", "random-keep", "magnitude-keep", "static-frequency", "on-demand", "topk-reduce")
STRATEGIES = ("exchange", "skip", "hybrid")
MISS_ACTIONS = ("auto", "shadow", "wait", "exchange", "skip")
UPDATE_UNITS = ("tokens", "inputs")


class PcmoeError(Exception):
    """Any user-facing error of load(); the CLI prints it as one line."""


class PcmoeWarning(UserWarning):
    """Something a user should know that does not stop the work (e.g. native kernels not built,
    the eager path runs); the CLI prints it as one line, other libraries' warnings stay quiet."""


@dataclass
class LoadOptions:
    """Everything load() accepts besides the checkpoint, budget, policy and plan."""

    dtype: str = "auto"            # compute/storage dtype of weights: auto (as on disk), float32, bfloat16
    quantize: str | None = None    # experts held as int8 / int4 (weight-only), quantised on load
    nonexpert_quantize: str | None = None  # attention projections + LM head as int8 / int4 (lean decoder only)
    strategy: str = "exchange"     # exchange | skip | hybrid (paper §5)
    renorm: bool = True            # exchange weights renormalised over members (A) or original (B)
    tau: float = 0.05              # hybrid: skip a substitute whose gate is below tau
    update_every: int = 16         # committee update period F ...
    update_unit: str = "tokens"    # ... counted in tokens or inputs (requests / documents)
    bytes_per_step: int | None = None  # swap I/O allowance per forward step (default: 2 experts)
    importance: str = "ema"        # window | ema (measured better: docs/results/committee_knobs.md)
    ema_decay: float = 0.95
    margin: float = 0.1            # hysteresis: a newcomer must beat a member by this factor
    spare_slots: int = 0           # extra slots per layer that swaps load into; 0 = swap in place
    io_bandwidth: float | str | None = None  # MB/s (or emmc / ufs / nvme) storage emulation
    synchronous: bool = False      # load swaps inline (tests); same outputs as async
    seed: int = 0                  # random-keep
    profile: str | None = None     # routing profile: warm start / static-frequency; None = <model>/profile.json
                                   # if there is one, "none" = no profile
    topk: int | None = None        # topk-reduce: experts kept per token
    threads: int | None = None
    track_importance: bool | None = None  # accumulate importance; default: committee policy only
    fast: bool = True              # lean decoder forward where supported (pcmoe/fast.py)
    kernel: str = "auto"           # batch-1 decode kernels: auto (native where built), native, eager
    evict: bool = True             # drop read ranges from the page cache
    cache_dir: str | None = None   # where expert norms are cached
    progress: bool = True
    shadow: str | tuple | None = None  # shadows beside the committee: int1..int3 | vq6..vq8 | lowrank, or one
                                       # per MoE layer ("int2,vq7,none,...", a tuple after validate; pcmoe/shadow.py)
    shadow_group: int | None = None  # int2 / int3: input columns per group (default 128)
    shadow_rank: int | None = None   # lowrank: rank of the factors (default 32)
    shadow_experts: int | None = None  # shadows per layer (None: every expert outside the initial committee)
    miss_action: str = "auto"      # auto (the chooser), or always shadow / wait / exchange / skip where possible
    miss_time_cost: float = 0.0    # the chooser's price of time: quality cost per millisecond an answer adds
    wait_above: float | None = None  # wait for an exact load of a missing expert whose router weight reaches this
    routing_trace: str | None = None  # benchmarks only: replay this pcmoe trace's routing (pcmoe/trace.py)
    routing_trace_seed: int = 0    # ... through the mapping drawn with this seed


# -- sampling and text rules shared by the CLI and the server ------------------------------------

MAX_STOP_STRINGS = 4  # as OpenAI's API
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
_NOT_GIVEN = object()


class OptionError(PcmoeError):
    """A value outside what pcmoe accepts. `param` is its API name (top_p); `message(name)` says the
    same with another name for it (the CLI's --top-p, the server's 'top_p')."""

    def __init__(self, param: str, rule: str, got=_NOT_GIVEN):
        self.param, self.rule, self.got = param, rule, got
        super().__init__(self.message(param))

    def message(self, name: str) -> str:
        return f"{name} {self.rule}" + ("" if self.got is _NOT_GIVEN else f" (got {self.got!r})")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_sampling(temperature=None, top_p=None, max_tokens=None, seed=None, stop=None) -> None:
    """Raise OptionError for the first sampling value outside the rules; None means not given.
    The one definition of what `pcmoe generate`, `pcmoe chat` and the server accept."""
    if max_tokens is not None and not (_is_int(max_tokens) and max_tokens >= 1):
        raise OptionError("max_tokens", "must be an integer of at least 1", max_tokens)
    # `not (a <= x <= b)` also refuses NaN
    if temperature is not None and not (_is_number(temperature) and 0 <= temperature <= 2):
        raise OptionError("temperature", "must be a number from 0 (greedy) to 2", temperature)
    if top_p is not None and not (_is_number(top_p) and 0 < top_p <= 1):
        raise OptionError("top_p", "must be a number above 0 and at most 1", top_p)
    if seed is not None and not (_is_int(seed) and SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise OptionError("seed", "must be an integer from -2**63 to 2**64-1", seed)
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
            raise OptionError("stop", f"must be a string or a list of at most {MAX_STOP_STRINGS} strings")
        if len(stops) > MAX_STOP_STRINGS:
            raise OptionError("stop", f"takes at most {MAX_STOP_STRINGS} strings", len(stops))
        for s in stops:
            check_text(s, "stop")


def check_text(value: str, param: str, from_bytes: bool = False) -> None:
    """Raise OptionError if `value` is not Unicode text a tokenizer can take: a lone UTF-16 surrogate
    (JSON can carry one as "\\ud800"), or, `from_bytes`, a byte that is not UTF-8 (Python decodes
    command-line bytes it cannot read to U+DC80..U+DCFF)."""
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(value[e.start])
        if from_bytes and 0xDC80 <= code <= 0xDCFF:
            raise OptionError(param, f"is not UTF-8 text: byte 0x{code - 0xDC00:02X} at character {e.start} "
                                     "(use a UTF-8 terminal or locale, or recode the text)") from None
        raise OptionError(param, f"is not valid Unicode: a lone UTF-16 surrogate (U+{code:04X}) at character "
                                 f"{e.start}") from None


# -- load() options: precedence and rules ---------------------------------------------------------


class OptionsFileError(PcmoeError):
    """A plan's or a model folder's options that cannot be applied."""


def resolve_options(checkpoint_dir, plan, options: dict) -> tuple[LoadOptions, dict | None]:
    from pcmoe.formats import read_model_options, read_plan

    """LoadOptions from keyword options, a plan's options and the model's pcmoe_options.json, in
    that order of precedence; and the plan's contents."""
    unknown = set(options) - set(LoadOptions.__dataclass_fields__)
    if unknown:
        raise PcmoeError(f"unknown load option(s): {', '.join(sorted(unknown))}")
    opts = LoadOptions(**options)
    explicit = set(options)
    plan_data = None
    if plan is not None:
        plan_data = read_plan(plan)
        plan_options = plan_data.get("options") or {}
        apply_options(opts, plan_options, explicit=explicit)
        explicit |= set(plan_options) if isinstance(plan_options, dict) else set()
    model_options = read_model_options(checkpoint_dir)
    if model_options:
        apply_options(opts, model_options, explicit=explicit, source="pcmoe_options.json")
    return opts, plan_data


def apply_options(opts: LoadOptions, plan_options, explicit: set[str], source: str = "plan") -> None:
    if not isinstance(plan_options, dict):
        raise OptionsFileError(f"the {source}'s \"options\" must be a JSON object")
    known = set(LoadOptions.__dataclass_fields__) - {"progress", "threads", "cache_dir"}
    bad = sorted(set(plan_options) - known)
    if bad:
        raise OptionsFileError(f"unknown {source} option(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
    for key, value in plan_options.items():
        if key not in explicit:
            setattr(opts, key, value)


# Option -> (accepted types, check, what it must be); None is accepted where the default is None.
_OPTION_RULES = {
    "update_every": (int, lambda v: v >= 1, "an integer >= 1"),
    "spare_slots": (int, lambda v: v >= 0, "an integer >= 0"),
    "bytes_per_step": (int, lambda v: v >= 1, "a positive number of bytes"),
    "tau": ((int, float), lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "margin": ((int, float), lambda v: v >= 0, "a number >= 0"),
    "ema_decay": ((int, float), lambda v: 0 < v < 1, "a number in (0, 1)"),
    "seed": (int, lambda v: True, "an integer"),
    "routing_trace_seed": (int, lambda v: True, "an integer"),
    "topk": (int, lambda v: v >= 1, "an integer >= 1"),
    "threads": (int, lambda v: v >= 1, "an integer >= 1"),
    "renorm": (bool, lambda v: True, "true or false"),
    "synchronous": (bool, lambda v: True, "true or false"),
    "evict": (bool, lambda v: True, "true or false"),
    "fast": (bool, lambda v: True, "true or false"),
    "shadow_group": (int, lambda v: v >= 8 and v % 8 == 0, "a multiple of 8"),
    "shadow_rank": (int, lambda v: v >= 1, "an integer >= 1"),
    "shadow_experts": (int, lambda v: v >= 0, "an integer >= 0"),
    "miss_time_cost": ((int, float), lambda v: v >= 0, "a number >= 0"),
    "wait_above": ((int, float), lambda v: 0 <= v <= 1, "a number in [0, 1]"),
}


def validate(policy: str, opts: LoadOptions, top_k: int, quantisable: bool, family_name: str) -> None:
    """Every option in range for this policy and family (top-k, quantisable experts), one error line."""
    if policy not in POLICIES:
        raise PcmoeError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    for name, (types, ok, what) in _OPTION_RULES.items():
        value = getattr(opts, name)
        if value is None and LoadOptions.__dataclass_fields__[name].default is None:
            continue
        is_bool = isinstance(value, bool)
        if (is_bool and bool not in (types if isinstance(types, tuple) else (types,))) or \
                not isinstance(value, types) or not ok(value):
            raise PcmoeError(f"option {name} must be {what}, not {value!r}")
    if opts.strategy not in STRATEGIES:
        raise PcmoeError(f"unknown strategy {opts.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if opts.update_unit not in UPDATE_UNITS:
        raise PcmoeError(f"update_unit must be one of {', '.join(UPDATE_UNITS)}, not {opts.update_unit!r}")
    if opts.kernel not in ("auto", "eager", "native"):
        raise PcmoeError(f"unknown kernel {opts.kernel!r}; use auto, native or eager")
    if opts.importance not in ("window", "ema"):
        raise PcmoeError(f"unknown importance {opts.importance!r}; use window or ema")
    if opts.quantize not in (None, "int8", "int4"):
        raise PcmoeError(f"unknown quantize {opts.quantize!r}; use int8 or int4")
    if opts.nonexpert_quantize in ("full", "none"):
        opts.nonexpert_quantize = None
    if opts.nonexpert_quantize not in (None, "int8", "int4"):
        raise PcmoeError(f"unknown nonexpert_quantize {opts.nonexpert_quantize!r}; use int8, int4 or full")
    if opts.quantize and not quantisable:
        raise PcmoeError(f"quantised experts are not supported for {family_name}")
    try:
        opts.shadow = parse_shadow(opts.shadow)
    except FormatError as e:
        raise PcmoeError(f"{e}; give one form for every MoE layer or a comma-separated form per layer") from None
    if opts.miss_action not in MISS_ACTIONS:
        raise PcmoeError(f"unknown miss action {opts.miss_action!r}; choose one of {', '.join(MISS_ACTIONS)}")
    if opts.shadow and not quantisable:
        raise PcmoeError(f"shadow experts are not supported for {family_name} (its expert weights are not [out, in])")
    if opts.shadow and policy in ("full", "on-demand", "topk-reduce"):
        raise PcmoeError(f"shadow experts answer committee misses; policy {policy} has none (use committee or a "
                         "fixed subset)")
    if policy == "topk-reduce":
        k = top_k
        if opts.topk is None:
            opts.topk = max(1, k // 2)
        if not 1 <= opts.topk < k:
            raise PcmoeError(f"topk-reduce needs 1 <= topk < {k} (the model's experts per token)")
