"""Command-line options shared by every front end (CLI, chat, server, benchmarks), and the
statistics table they print. Torch-free at import: `pcmoe --help` stays fast."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pcmoe.budget import BudgetError, ModelBytes, format_bytes, parse_budget
from pcmoe.options import PcmoeError

DEFAULT_MODEL = "models/pcmoe-lm"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what load() looks for
ALL_RESIDENT_POLICIES = ("full", "topk-reduce")                 # as pcmoe.policies (a test keeps them equal)


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint folder (default: {DEFAULT_MODEL})")


def add_load_options(p: argparse.ArgumentParser) -> None:
    from pcmoe.options import POLICIES, SHADOWS, STRATEGIES, UPDATE_UNITS

    add_model(p)
    g = p.add_argument_group("memory and policy")
    g.add_argument("--budget", help="weight memory: bytes with a unit (2GB, 800MiB), a share of the model "
                                    "(50%%) or of its experts (50%%experts); default: everything resident")
    g.add_argument("--memory", help="the whole process's memory (900MB, or 60%% of the full model's): per-layer "
                                    "committee sizes and precisions planned from <model>/device_profile.json "
                                    "(`pcmoe plan`); instead of --budget and --plan")
    g.add_argument("--policy", default="committee", choices=POLICIES, help="serving policy (default: committee)")
    g.add_argument("--plan", help="plan JSON with per-layer committee sizes (instead of a uniform split)")
    g.add_argument("--dtype", default="auto", help="weights dtype: auto (as stored), float32, bfloat16")
    g = p.add_argument_group("committee")
    g.add_argument("--strategy", default="exchange", choices=STRATEGIES,
                   help="a token whose expert is absent: exchange to a member, skip it, or hybrid")
    g.add_argument("--gate-weights", default="renorm", choices=("renorm", "original"),
                   help="exchange weights: renormalised over members (A) or the full-softmax ones (B)")
    g.add_argument("--tau", type=float, default=0.05, help="hybrid: skip substitutes whose gate is below tau")
    # Committee knobs default to None: LoadOptions' defaults, or the model's pcmoe_options.json, apply.
    g.add_argument("--update-every", type=int, help="committee update period F (default 16, or the model's "
                                                    "pcmoe_options.json)")
    g.add_argument("--update-unit", choices=UPDATE_UNITS, help="unit of F (default tokens)")
    g.add_argument("--swap-bytes", type=int, help="swap I/O allowance per forward step in bytes (default 2 experts)")
    g.add_argument("--importance", choices=("window", "ema"),
                   help="importance aggregation: sum over the update window, or an EMA of windows (default)")
    g.add_argument("--ema-decay", type=float, help="EMA importance: weight of the past (default 0.95)")
    g.add_argument("--margin", type=float, help="hysteresis margin for swaps (default 0.1)")
    g.add_argument("--spare-slots", type=int,
                   help="extra slots per layer that swaps load into (default 0: swap in place, one more member)")
    g.add_argument("--sync-swaps", action="store_true", help="load swaps inline (same outputs, for testing)")
    g.add_argument("--profile", help="routing profile JSON (from `pcmoe profile`): warm start / static-frequency "
                                     "(default: profile.json beside the model if any; 'none' for no profile)")
    g.add_argument("--topk", type=int, help="topk-reduce: experts kept per token")
    g.add_argument("--seed", type=int, default=0, help="random-keep seed")
    g = p.add_argument_group("shadow experts (misses computed by small stand-ins, pcmoe/shadow.py)")
    g.add_argument("--quantize", choices=("int8", "int4"), help="committee members held as int8 / int4 (default: "
                                                               "as stored, or the plan's precisions)")
    g.add_argument("--quantize-nonexpert", choices=("int8", "int4", "full"), dest="nonexpert_quantize",
                   help="attention projections and LM head held as int8 / int4 (lean-decoder families; default: "
                        "as stored, or the plan's nonexpert_precision)")
    g.add_argument("--shadow", metavar="FORM[,FORM...]",
                   help=f"shadows of the experts outside the committee, counted in the budget: {', '.join(SHADOWS)} "
                        "or none, one form for every MoE layer or a comma-separated form per layer (default none)")
    g.add_argument("--shadow-experts", type=int, help="shadows per layer (default: every expert outside the committee)")
    g.add_argument("--miss-action", choices=("auto", "shadow", "wait", "exchange", "skip"),
                   help="a miss: the chooser's cheapest answer (auto, default), or always this one where possible")
    g.add_argument("--miss-time-cost", type=float,
                   help="the chooser's price of time: quality cost per millisecond an answer adds (default 0)")
    g.add_argument("--wait-above", type=float,
                   help="wait for an exact load of a missing expert whose router weight reaches this (default never)")
    g = p.add_argument_group("runtime")
    g.add_argument("--io-bandwidth", help="emulate storage: MB/s, or emmc (300), ufs (2000), nvme (3000)")
    g.add_argument("--no-evict", action="store_true", help="leave read ranges in the page cache")
    g.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    g.add_argument("--kernel", choices=("auto", "native", "eager"), default="auto",
                   help="batch-1 decode kernels: native (pcmoe's AVX-512 kernels, built by scripts/setup.sh), "
                        "eager (torch ops), auto = native where built and applicable (default)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def read_model_config(model: str | os.PathLike) -> dict:
    """config.json of a checkpoint folder (torch-free, so that a bad --model fails at once)."""
    from pcmoe.checkpoint import CheckpointError, read_config_dict

    folder = Path(model)
    if folder.exists() and not folder.is_dir():
        raise PcmoeError(f"{folder} is a file, not a checkpoint folder; pass the folder that holds config.json "
                         "and the *.safetensors files")
    try:
        return read_config_dict(folder)
    except CheckpointError as e:
        raise PcmoeError(str(e)) from None
    except OSError as e:
        raise PcmoeError(f"cannot read {folder / 'config.json'}: {e.strerror or e}") from None


def has_tokenizer(model: str | os.PathLike) -> bool:
    return any((Path(model) / name).exists() for name in TOKENIZER_FILES)


def check_input_file(path: str | os.PathLike, what: str, hint: str = "") -> None:
    """A file the command will read: it exists, is a file and can be read (one-line errors)."""
    p = Path(path)
    if p.is_dir():
        raise PcmoeError(f"{what} {p} is a directory; pass a file{hint}")
    if not p.exists():
        raise PcmoeError(f"{what} {p} does not exist{hint}")
    if not os.access(p, os.R_OK):
        raise PcmoeError(f"cannot read {what} {p} (permission denied)")


def check_load_args(args) -> dict:
    """Check before torch is imported what add_load_options() read: the model folder, the budget's
    syntax, the plan and profile files, and that --plan is not ignored. Returns config.json."""
    config = read_model_config(args.model)
    if args.budget is not None:
        try:  # the syntax only: shares of the model are resolved at load
            parse_budget(args.budget, ModelBytes(1, [1], [1]))
        except BudgetError as e:
            raise PcmoeError(str(e)) from None
    if getattr(args, "memory", None) is not None:
        check_memory_args(args)
    if args.plan is not None:
        check_input_file(args.plan, "plan file")
        if args.policy in ALL_RESIDENT_POLICIES:
            raise PcmoeError(f"--plan gives per-layer committee sizes, but policy {args.policy} keeps every expert "
                             "resident and would ignore it; drop --plan or choose another policy")
    if args.profile is not None and args.profile.lower() != "none":
        check_input_file(args.profile, "profile", "; make one with `pcmoe profile`")
    return config


def check_memory_args(args) -> None:
    """--memory plans the whole load: it excludes --budget and --plan, needs the committee policy
    and the model's device profile (torch-free)."""
    from pcmoe.planner.planning import parse_memory, profile_file

    if args.budget is not None or args.plan is not None:
        raise PcmoeError("--memory plans the committee itself; drop --budget / --plan (or drop --memory)")
    if args.policy != "committee":
        raise PcmoeError(f"--memory plans committees for policy committee, not {args.policy}; use --budget with "
                         f"policy {args.policy}")
    if not profile_file(args.model).exists():
        raise PcmoeError(f"--memory needs the model's device profile {profile_file(args.model)}; make it with "
                         f"`pcmoe calibrate --model {args.model}` (or use --budget for weight bytes)")
    try:
        parse_memory(args.memory, 1.0)
    except ValueError as e:
        raise PcmoeError(str(e)) from None


def plan_from_memory(args) -> dict:
    """The plan --memory asks for (one line on stderr says what was chosen)."""
    from pcmoe.planner.planning import plan_for_memory

    try:
        plan, line = plan_for_memory(args.model, args.memory, frontend=getattr(args, "command", None))
    except ValueError as e:  # PlanError, InfeasibleError: one line
        raise PcmoeError(str(e)) from None
    print(line, file=sys.stderr)
    return plan


def warn_if_budget_above_model(engine, budget, out=None) -> bool:
    """A budget larger than the whole model is legal but likely a mistake (200% for 20%): say so."""
    if budget is None:
        return False
    stats = engine.stats()
    if stats["budget_bytes"] <= stats["full_model_bytes"]:
        return False
    print(f"warning: the budget {format_bytes(stats['budget_bytes'])} is more than the whole model "
          f"({format_bytes(stats['full_model_bytes'])}): every expert stays resident", file=out or sys.stderr)
    return True


def engine_from_args(args):
    """pcmoe.load() with the options add_load_options() defined, checked first (torch-free)."""
    import pcmoe

    check_load_args(args)

    plan = plan_from_memory(args) if getattr(args, "memory", None) is not None else args.plan
    knobs = {"update_every": args.update_every, "update_unit": args.update_unit, "importance": args.importance,
             "ema_decay": args.ema_decay, "margin": args.margin, "spare_slots": args.spare_slots,
             **{k: getattr(args, k, None) for k in ("quantize", "nonexpert_quantize", "shadow", "shadow_experts",
                                                     "miss_action",
                                                     "miss_time_cost", "wait_above")}}
    engine = pcmoe.load(
        args.model, budget=args.budget, policy=args.policy, plan=plan, dtype=args.dtype,
        strategy=args.strategy, renorm=args.gate_weights == "renorm", tau=args.tau, bytes_per_step=args.swap_bytes,
        **{k: v for k, v in knobs.items() if v is not None}, synchronous=args.sync_swaps, profile=args.profile,
        topk=args.topk, seed=args.seed,
        track_importance=getattr(args, "track_importance", None),
        io_bandwidth=args.io_bandwidth, evict=not args.no_evict, threads=args.threads, kernel=args.kernel,
        progress=not args.quiet and sys.stderr.isatty())
    warn_if_budget_above_model(engine, args.budget)
    return engine


def print_stats(stats: dict, out=None) -> None:
    out = out or sys.stdout
    rows = [
        ("policy", stats["policy"]),
        ("budget", format_bytes(stats["budget_bytes"])),
        ("resident weights", f"{format_bytes(stats['resident_bytes'])} "
                             f"(experts {format_bytes(stats['resident_expert_bytes'])}, "
                             f"full model {format_bytes(stats['full_model_bytes'])})"),
        ("committee sizes", " ".join(map(str, stats["committee_sizes"]))),
        ("hit rate", f"{stats['hit_rate']:.3f} ({stats['hits']}/{stats['choices']})"),
        ("router mass outside", f"{stats['router_mass_outside']:.3f}"),
        ("exchanged / skipped", f"{stats['exchanged']} / {stats['skipped']}"),
        *([("shadowed / waited", f"{stats['shadowed']} / {stats['waited']} ({format_bytes(stats['shadow_bytes'])} "
                                 "of shadow experts)")] if stats.get("shadow_bytes") else []),
        ("swaps (failed)", f"{stats['swaps']} ({stats['swap_failures']}) in {stats['updates']} updates"),
        ("bytes read", f"{format_bytes(stats['bytes_read'])} in {stats['reads']} reads, {stats['read_s']:.3f} s"),
        ("stall", f"{stats['stall_s']:.3f} s"),
        ("peak RSS", format_bytes(stats["peak_rss_bytes"])),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}", file=out)
    print(f"  {'layer':<6}{'size':>5}{'hits':>8}{'misses':>8}{'outside':>9}{'swaps':>7}", file=out)
    for layer in stats["per_layer"]:
        print(f"  {layer['layer']:<6}{layer['committee_size']:>5}{layer['hits']:>8}{layer['misses']:>8}"
              f"{layer['router_mass_outside']:>9.3f}{layer['swaps']:>7}", file=out)


