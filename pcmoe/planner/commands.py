"""`pcmoe calibrate` and `pcmoe plan`: their parsers, torch-free checks and commands (cli.py
dispatches to them and builds only the chosen command's parser)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pcmoe.args import add_model, check_input_file, read_model_config
from pcmoe.budget import format_bytes
from pcmoe.options import PcmoeError
from pcmoe.planner.planning import (
    PROFILE_FILE,
    QUALITY_MODELS,
    format_latency,
    parse_latency,
    parse_memory,
    shadow_text,
)
from pcmoe.planner.space import NO_SHADOW, PlanError

VISION_TYPE = "pcmoe_vit_moe"
DEFAULT_SAMPLES = {"text": 150, "frames": 40}   # and half as many "near" samples again


# -- calibrate ---------------------------------------------------------------------------------------------


def fill_calibrate(p) -> None:
    add_model(p)
    p.add_argument("--data", help="profiling text (default: <model>/eval/heldout.txt, its even documents); vision: "
                                  "the Fashion-MNIST folder (default: the installed copy)")
    p.add_argument("--samples", type=int, help="random configurations measured for the quality model "
                                               f"(default {DEFAULT_SAMPLES['text']} text, {DEFAULT_SAMPLES['frames']} "
                                               "vision)")
    p.add_argument("--frames", type=int, default=1000, help="vision: frames per measurement (default 1000)")
    p.add_argument("--doc-tokens", type=int, help="text: tokens scored per document (default 512)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every measurement (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random configurations")
    p.add_argument("--out", "-o", help=f"device profile to write (default: <model>/{PROFILE_FILE}); an unfinished "
                                       "one with the same settings is resumed")
    p.add_argument("--no-cgroup", action="store_true", help="do not run measurements in a memory cgroup")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--derive-only", action="store_true", help="measure nothing: recompute the profile's tables and "
                                                               "fits from the measurements it stores")
    p.set_defaults(func=cmd_calibrate, check=check_calibrate)


def check_calibrate(args) -> None:
    from pcmoe.system import check_writable

    config = read_model_config(args.model)
    if args.derive_only:   # measures nothing: only the profile must be there
        args.out = args.out or str(Path(args.model) / PROFILE_FILE)
        check_input_file(args.out, "device profile", "; --derive-only rewrites an existing one")
        return
    if config.get("model_type") != VISION_TYPE and args.data is not None:
        check_input_file(args.data, "data file", " of documents (text, UTF-8)")
    if config.get("model_type") != VISION_TYPE and args.data is None:
        check_input_file(Path(args.model) / "eval" / "heldout.txt", "default profiling text", "; pass --data FILE")
    for name in ("samples", "frames", "doc_tokens", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "samples" else 1):
            raise PcmoeError(f"--{name.replace('_', '-')} must be at least {0 if name == 'samples' else 1}")
    args.out = args.out or str(Path(args.model) / PROFILE_FILE)
    problem = check_writable(args.out)
    if problem:
        raise PcmoeError(f"--out: {problem}")


def cmd_calibrate(args) -> int:
    from pcmoe.planner.calibrate import run_calibration, summary

    if args.derive_only:
        from pcmoe.planner.calibrate import rederive

        try:
            profile = rederive(args.model, args.out)
        except PlanError as e:
            raise PcmoeError(str(e)) from None
        for line in summary(profile):
            print(line)
        print(f"rewrote {args.out} from its {len(profile['measurements'])} stored measurements")
        return 0
    vision = read_model_config(args.model).get("model_type") == VISION_TYPE
    samples = args.samples if args.samples is not None else DEFAULT_SAMPLES["frames" if vision else "text"]
    try:
        profile = run_calibration(args.model, args.out, data=args.data, samples=samples, seed=args.seed,
                                  threads=args.threads, frames=args.frames, doc_tokens=args.doc_tokens,
                                  use_cgroup=False if args.no_cgroup else None,
                                  progress=not args.quiet and sys.stderr.isatty(),
                                  log=lambda m: print(m, file=sys.stderr))
    except PlanError as e:
        raise PcmoeError(str(e)) from None
    for line in summary(profile):
        print(line)
    state = "complete" if profile["calibration"]["complete"] else \
        f"incomplete ({len(profile['calibration']['missing'])} measurements failed; rerun to retry them)"
    print(f"wrote {args.out} ({state})")
    return 0 if profile["calibration"]["complete"] else 1


# -- plan --------------------------------------------------------------------------------------------------


def fill_plan(p) -> None:
    add_model(p)
    p.add_argument("--profile", help=f"device profile (default: <model>/{PROFILE_FILE}, from `pcmoe calibrate`)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--memory", help="limit on the whole process's memory: bytes with a unit (900MB, 1.5GiB) or a "
                                    "share of the full model's (60%%)")
    g.add_argument("--weights", help="limit on weight bytes only (as --budget of load: non-expert weights, expert "
                                     "slots, staging buffers)")
    p.add_argument("--latency", help="limit per token (LM) or frame (vision): 40ms, 1.5ms, 0.04s")
    p.add_argument("--context", type=int, help="tokens of context the plan must hold (default: the model's maximum)")
    p.add_argument("--out", "-o", help="write the plan JSON here (serve it with --plan FILE)")
    p.add_argument("--pareto", action="store_true", help="one plan per memory point from the least to the full "
                                                         "model: a table, and a PNG (--png)")
    p.add_argument("--points", type=int, default=8, help="--pareto: memory points (default 8)")
    p.add_argument("--png", help="--pareto: the plot to write (default pareto.png beside --out, else ./pareto.png)")
    p.add_argument("--validate", action="store_true", help="run the plan inside a cgroup limit of its memory and "
                                                           "print predicted vs measured memory, latency, quality")
    p.add_argument("--plan", help="with --validate: an existing plan file to run instead of planning one")
    p.add_argument("--threads", type=int, default=1, help="--validate: torch threads (default 1, as calibrated)")
    p.add_argument("--quality-model", choices=QUALITY_MODELS, default="auto",
                   help="quality predictor: auto (the one the profile chose on held-out samples), sensitivity, mlp")
    p.add_argument("--seed", type=int, default=0, help="search seed (same seed, same plan)")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    p.set_defaults(func=cmd_plan, check=check_plan)


def check_plan(args) -> None:
    from pcmoe.system import check_writable

    read_model_config(args.model)
    args.profile = args.profile or str(Path(args.model) / PROFILE_FILE)
    check_input_file(args.profile, "device profile", "; make one with `pcmoe calibrate --model DIR`")
    try:
        parse_latency(args.latency)
        if args.memory is not None:
            parse_memory(args.memory, 1.0)
        if args.weights is not None:
            parse_memory(args.weights, 1.0)
    except PlanError as e:
        raise PcmoeError(str(e)) from None
    if args.plan is not None:
        if not args.validate:
            raise PcmoeError("--plan FILE is for --validate (to run an existing plan); drop it to plan a new one")
        if args.memory or args.weights or args.latency or args.pareto:
            raise PcmoeError("--validate --plan FILE runs that plan as it is; drop --memory/--weights/--latency")
        check_input_file(args.plan, "plan file")
    elif not args.pareto and args.memory is None and args.weights is None and args.latency is None:
        raise PcmoeError("give a limit: --memory (whole process), --weights (weight bytes) and/or --latency; or "
                         "--pareto for the trade-off curve")
    if args.pareto and args.validate:
        raise PcmoeError("--pareto plans several memory points; validate one plan at a time (--memory X --validate)")
    if args.points < 1 or args.threads < 1:
        raise PcmoeError("--points and --threads must be at least 1")
    for path in (args.out, args.png):
        if path is not None:
            problem = check_writable(path)
            if problem:
                raise PcmoeError(problem)


def _planner(args, weights_only: bool = False):
    from pcmoe.planner.planning import Planner, read_profile_data

    data = read_profile_data(args.profile)
    model_type = read_model_config(args.model).get("model_type")
    if data.get("model_type") not in (None, model_type):
        raise PlanError(f"the device profile {args.profile} is for a {data['model_type']} model, not {model_type}")
    return Planner.from_data(data, context_tokens=args.context, weights_only=weights_only,
                             quality_model=args.quality_model, seed=args.seed)


def cmd_plan(args) -> int:
    try:
        return _cmd_plan(args)
    except PlanError as e:
        raise PcmoeError(str(e)) from None


def _cmd_plan(args) -> int:
    planner = _planner(args, weights_only=args.weights is not None)
    _warn_other_machine(planner)
    if args.pareto:
        return _pareto(args, planner)
    if args.plan is not None:
        from pcmoe.formats import FormatError, check_plan, check_precisions, read_plan

        try:
            plan_data = read_plan(args.plan)
            check_plan(plan_data, planner.model_type, list(planner.space.num_experts))
            check_precisions(plan_data, planner.space.layers)
        except FormatError as e:
            raise PlanError(str(e)) from None
        return _validate(args, planner, plan_data)
    full = planner.full_memory()
    limit = parse_memory(args.memory if args.memory is not None else args.weights, full) \
        if (args.memory or args.weights) else None
    latency = parse_latency(args.latency)
    plan = planner.plan(limit, latency, seed=args.seed)
    kind = "weights_bytes" if args.weights is not None else "memory_bytes"
    limits = {k: v for k, v in ((kind, limit), ("latency_s", latency)) if v is not None}
    plan_data = planner.plan_dict(plan, limits)
    q = planner.quality
    print(f"plan: {planner.describe(plan)}")
    print(f"  full model: memory {format_bytes(full)}; quality model {q.name}, held-out rmse "
          f"{q.heldout[q.name]['rmse']:.4f} ({planner.metric}, {q.n_heldout} samples)")
    if args.out:
        from pcmoe.formats import write_plan

        extra = {k: v for k, v in plan_data.items() if k not in ("format", "model_type", "num_experts",
                                                                  "committee_sizes", "options", "precisions")}
        write_plan(args.out, planner.model_type, plan_data["num_experts"], plan_data["committee_sizes"],
                   options=plan_data["options"], extra=extra, precisions=plan_data["precisions"])
        print(f"wrote {args.out}: pcmoe eval --model {args.model} --plan {args.out}")
    if args.validate:
        if args.weights is not None:   # the run is still a whole process: price it as one
            total = _planner(args).predict(plan.config)["memory_bytes"]
            plan_data["limits"]["memory_bytes"] = total
        return _validate(args, planner, plan_data)
    if args.json:
        print(json.dumps(plan_data))
    return 0


def _validate(args, planner, plan_data) -> int:
    from pcmoe.planner.validate import report_lines, validate

    result = validate(planner, args.model, plan_data, threads=args.threads)
    for line in report_lines(planner, result):
        print(line)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "record"}))
    return 1 if result["violations"] else 0


def _pareto(args, planner) -> int:
    from pcmoe.planner.search import memory_points, pareto

    problem = planner.problem()
    points = memory_points(problem, args.points)
    if args.memory or args.weights:
        top = parse_memory(args.memory or args.weights, planner.full_memory())
        points = [p for p in points if p <= top] or [top]
    latency = parse_latency(args.latency)
    rows = pareto(problem, points, latency, seed=args.seed)
    print(f"{'memory limit':>14}  {'memory':>10}  {'latency':>9}  {'quality':<22}  sizes / precisions")
    out = []
    for limit, plan in rows:
        if plan is None:
            print(f"{format_bytes(limit):>14}  (nothing fits)")
            continue
        c = plan.config
        print(f"{format_bytes(limit):>14}  {format_bytes(plan.memory):>10}  {format_latency(plan.latency):>9}  "
              f"{planner.quality_text(plan.quality):<22}  {' '.join(map(str, c.sizes))} / "
              f"{' '.join(c.precisions)} / F {c.interval}"
              + (f" / non-expert {c.nonexpert_precision}" if c.nonexpert_precision not in (None, "full") else "")
              + (f" / shadows {shadow_text(c.shadow)}" if c.shadow not in (None, NO_SHADOW) else ""))
        out.append({"limit_bytes": limit, **planner.plan_dict(plan, {"memory_bytes": limit})})
    png = args.png or str(Path(args.out).with_name("pareto.png") if args.out else "pareto.png")
    _plot(planner, out, png)
    print(f"wrote {png}")
    if args.out:
        from pcmoe.system import atomic_write_text

        atomic_write_text(Path(args.out), json.dumps({"pareto": out}, indent=1))
        print(f"wrote {args.out}")
    if args.json:
        print(json.dumps(out))
    return 0


def _plot(planner, rows: list[dict], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise PcmoeError("the Pareto plot needs matplotlib; pip install 'pcmoe[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pcmoe.bench.common import savefig

    xs = [r["predicted"]["memory_bytes"] / 1e6 for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(xs, [r["predicted"]["quality"] for r in rows], "o-")
    a.set_xlabel("predicted process memory (MB)")
    a.set_ylabel({"log_ppl": "predicted perplexity", "error_rate": "predicted accuracy"}.get(planner.metric, "loss"))
    b.plot(xs, [(r["predicted"]["latency_s"] or 0) * 1e3 for r in rows], "s-", color="C1")
    b.set_xlabel("predicted process memory (MB)")
    b.set_ylabel("predicted latency (ms)")
    fig.suptitle(f"planned configurations, {planner.model_type}")
    fig.tight_layout()
    savefig(fig, Path(path))
    plt.close(fig)


def _warn_other_machine(planner) -> None:
    from pcmoe.planner.calibrate import cpu_name

    ident = (planner.data.get("calibration") or {}).get("ident") or {}
    if ident.get("cpu") and ident["cpu"] != cpu_name():
        print(f"warning: the device profile was measured on {ident['cpu']}, this machine is {cpu_name()}; "
              "recalibrate (`pcmoe calibrate`) for predictions that hold here", file=sys.stderr)

