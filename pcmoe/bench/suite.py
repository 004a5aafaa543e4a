"""pcmoe bench: the paper's memory / quality / speed trade-off, with in-engine baselines and peers.

Every measurement is a fresh process (`pcmoe.bench.worker`) started with the checkpoint evicted
from the page cache. Where cgroup v1 is writable, each runs in a memory cgroup (its peak charge is
recorded) whose limit is what the setup is allowed to hold:
  - `full` runs first, without a limit: its peak RSS minus its resident weights is the runtime's
    overhead (Python, torch, activations), measured independently of every budgeted run;
  - pcmoe runs: their weight bytes (the budget; quantised runs at their quantised sizes) + that
    overhead + 64 MiB of allocator slack;
  - transformers fully resident: no limit (it keeps the safetensors file mapped beside its own
    copy, ~2x the weights, see docs/anchors); accelerate offload: its budget + 1 GiB, the
    allowance the anchors used; llama.cpp: see pcmoe.bench.llamacpp.
Budgets of every language-model run are on one absolute axis, in % of the checkpoint's expert
memory at its own precision: `committee/int4@20%` holds as many bytes as `committee@20%`.
Results are appended to <out>/runs.jsonl as they come (an interrupted sweep resumes where it
stopped; a record is reused only for the same checkpoint files), then summarised in
<out>/bench.json, <out>/bench.md and PNG plots; --markdown writes BENCHMARKS.md from them.

    pcmoe bench --quick                               # minutes: every section, fewer points
    pcmoe bench --quick --scale                       # + the 1.3 GB checkpoint with llama.cpp on it and
                                                      #   the fast-decode targets (pcmoe.bench.scale)
    pcmoe bench --markdown BENCHMARKS.md --scaling    # the full sweep (hours on 2 cores)
    pcmoe bench --quick --regime                      # + gigabyte checkpoints inside memory limits against
                                                      #   llama.cpp and accelerate (pcmoe.bench.regime)
    pcmoe bench --report-only --markdown BENCHMARKS.md   # regenerate the reports from <out>
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from pcmoe import protocol
from pcmoe.bench import common, runner
from pcmoe.bench.runner import TIMEOUT_S
from pcmoe.budget import format_bytes

LM_POLICIES = ("committee", "random-keep", "magnitude-keep", "static-frequency", "on-demand")
FULL_BUDGETS = (30, 40, 50, 60, 75, 100)
QUICK_BUDGETS = (40, 50, 60)
# --quick: the committee over the budgets, the baselines the targets need at 50 % only.
QUICK_GRID = {"committee": QUICK_BUDGETS, "magnitude-keep": (50,), "on-demand": (50,)}
STORAGE = ("nvme", "ufs", "emmc")
QUICK_STORAGE = ("emmc",)  # the slowest profile, committee only (does async swapping hide it?)
QUANT_BUDGETS = {"int4": (15, 20, 25), "int8": (30, 40)}  # % of the checkpoint's expert memory
SHADOW_BUDGETS = (10, 15, 20, 25)  # % of expert memory: below full/int4's bytes, where shadows pay (issue 13)
QUICK_QUANT_BUDGETS: dict = {}  # quick: int8 / int4 fully resident and the committee at full/int4's memory
VISION_POLICIES = ("committee", "random-keep", "magnitude-keep", "on-demand")
QUICK_VISION = {"committee": (50,)}
ALLOCATOR_SLACK = 64 << 20
ACCELERATE_ALLOWANCE = 1 << 30  # docs/anchors: accelerate ran inside a cgroup of budget + 1 GiB
SECTIONS = ("storage", "quant", "shadow", "planned", "peers", "llamacpp", "vision", "topk")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="models/pcmoe-lm", help="language model checkpoint")
    p.add_argument("--vision", default="models/pcmoe-vit", help="vision MoE checkpoint ('' to skip)")
    p.add_argument("--data", help="held-out documents (default: <model>/eval/heldout.txt)")
    p.add_argument("--profile", help="routing profile for static-frequency (default: <model>/profile.json)")
    p.add_argument("--out", default="results/bench", help="output folder (default results/bench)")
    p.add_argument("--quick", action="store_true", help="every section with fewer points and short evaluations")
    p.add_argument("--budgets", help="comma-separated %% of expert memory (default 30,40,50,60,75,100)")
    p.add_argument("--policies", help=f"comma-separated policies (default {','.join(LM_POLICIES)})")
    p.add_argument("--eval-tokens", type=int, help="held-out tokens per perplexity (default 8192; quick 1024)")
    p.add_argument("--decode-tokens", type=int, help="tokens generated per prompt (default 64; quick 32)")
    p.add_argument("--prompts", type=int, help="prompts per decode trial (default 3; quick 2)")
    p.add_argument("--trials", type=int, default=3, help="timed decode rounds after one warm-up (median; default 3)")
    p.add_argument("--frames", type=int, help="vision frames per run (default 2000; quick 300)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-cgroup", action="store_true", help="do not run inside cgroup memory limits")
    p.add_argument("--skip", default="", help=f"comma-separated sections to skip: {','.join(SECTIONS)}")
    p.add_argument("--fresh", action="store_true", help="ignore results of an earlier, interrupted sweep")
    p.add_argument("--markdown", metavar="FILE", help="also write FILE (e.g. BENCHMARKS.md) from the results, "
                   "keeping its hand-written reading; plots are copied beside it (see --plots-dir)")
    p.add_argument("--plots-dir", help="where --markdown copies the plots (default <FILE's folder>/docs/benchmarks)")
    p.add_argument("--report-only", action="store_true", help="measure nothing: rebuild bench.json/md, plots and "
                   "--markdown from <out>/bench.json")
    p.add_argument("--scaling", action="store_true", help="also run the scaling study (pcmoe.bench.scaling, "
                   "random-weight 0.6-2.4 GB models built under data/bench/scaling) into <out>/scaling")
    p.add_argument("--scale", action="store_true", help="also run the second LM section: a 1.3 GB random-weight "
                   "Qwen3-MoE (built once under data/bench/scale) with llama.cpp on it, and the fast-decode "
                   "target table (pcmoe.bench.scale)")
    p.add_argument("--regime", action="store_true", help="also run the regime study (pcmoe.bench.regime, hours): "
                   "1.4 and 3.2 GB checkpoints with baked routing inside total memory limits below their size, pcmoe "
                   "against llama.cpp and accelerate in the same cgroup limit, into <out>/regime")
    p.add_argument("--scale-model", help="the --scale checkpoint (default: data/bench/scale/qwen3-moe-e32, built "
                   "on first use)")
    p.add_argument("--llamacpp-src", help="llama.cpp converter source: a llama.cpp tree, an extracted llama-cpp-python "
                   "sdist (or a folder holding one) or its .tar.gz (default: $PCMOE_LLAMACPP_SRC, else the sdist "
                   "of the installed version is fetched with pip into the pcmoe cache)")
    p.add_argument("--gguf-dir", help="where converted GGUFs are cached (default data/llamacpp/gguf/<model name>/ "
                   "or $PCMOE_GGUF_DIR)")


def resolve_defaults(args) -> None:
    """Fill the options whose default depends on --quick."""
    quick = args.quick
    for name, full, fast in (("eval_tokens", 8192, 1024), ("decode_tokens", 64, 32), ("prompts", 3, 2),
                             ("frames", 2000, 300)):
        if getattr(args, name, None) is None:
            setattr(args, name, fast if quick else full)


def command_line(args) -> str:
    """The `pcmoe bench` command that reproduces `args` (built from the parsed options, so it is
    right however main() was called)."""
    p = argparse.ArgumentParser(add_help=False)
    add_arguments(p)
    parts = ["pcmoe", "bench"]
    for action in p._actions:
        if not action.option_strings or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if value == action.default or value is None:
            continue
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction):
            parts.append(flag)
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


# -- the plan of runs ----------------------------------------------------------------------------


def _pct_bytes(sizes: dict, pct: float) -> int:
    """Absolute bytes of `pct` % of the checkpoint's expert memory (at its own precision)."""
    return int(sizes["nonexpert"] + pct / 100 * sizes["all_experts"])


def _pct_of(sizes: dict, nbytes: int) -> float:
    return 100 * (nbytes - sizes["nonexpert"]) / sizes["all_experts"]


def _fmt_pct(pct: float) -> str:
    return f"{pct:.0f}%" if abs(pct - round(pct)) < 1e-6 else f"{pct:.1f}%"


def plan_runs(args, prompts, sizes: dict, vision_sizes: dict | None = None) -> list[dict]:
    """Every run of the sweep, in order. `sizes` are _model_sizes(args.model) (they turn budgets
    into bytes); vision runs need `vision_sizes`. A run that cannot be made carries "skip"."""
    resolve_defaults(args)
    if args.budgets or args.policies:
        budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else (
            QUICK_BUDGETS if args.quick else FULL_BUDGETS)
        policies = args.policies.split(",") if args.policies else (tuple(QUICK_GRID) if args.quick else LM_POLICIES)
        grid = {p: tuple(budgets) for p in policies}
    else:
        grid = QUICK_GRID if args.quick else {p: FULL_BUDGETS for p in LM_POLICIES}
    skip = set(filter(None, args.skip.split(",")))
    base = {"kind": "pcmoe", "model": str(args.model), "model_fp": sizes.get("fingerprint"), "data": args.data,
            "eval_tokens": args.eval_tokens, "prompts": prompts, "decode_tokens": args.decode_tokens,
            "trials": args.trials, "warmup": 1, "threads": args.threads}
    runs = [dict(base, label="full", section="lm", curve="full", policy="full", calibration=True,
                 weight_bytes=sizes["full"], mem_pct=100.0)]

    def budgeted(label, section, curve, policy, pct, quant=None, weight=None, **extra):
        q = sizes["quant"].get(quant) if quant else sizes
        opts = dict(extra.pop("options", {}))
        if quant:
            opts["quantize"] = quant
        if policy == "static-frequency":
            opts["profile"] = args.profile
        nbytes = weight if weight is not None else _pct_bytes(sizes, pct)
        run = dict(base, label=label, section=section, curve=curve, policy=policy, budget=nbytes,
                   options=opts, weight_bytes=nbytes, mem_pct=round(pct, 2), **extra)
        if q is None:
            run["skip"] = f"skipped: {quant} is not available for this model ({sizes['quant_errors'].get(quant)})"
        elif nbytes < q["min_budget"][policy == "committee"]:
            run["skip"] = (f"skipped: {format_bytes(nbytes)} is below the minimum budget "
                           f"{format_bytes(q['min_budget'][policy == 'committee'])} for {policy}"
                           + (f" over {quant} experts" if quant else ""))
        return run

    for policy, budgets in grid.items():
        for b in budgets:
            if b == 100 and policy != "committee":
                continue  # at 100 % every keep policy is the full model
            runs.append(budgeted(f"{policy}@{b}%", "lm", policy, policy, b))
    if "topk" not in skip and not args.quick:
        runs.append(dict(base, label="topk-reduce", section="lm", curve="topk-reduce", policy="topk-reduce",
                         weight_bytes=sizes["full"], mem_pct=100.0))
    if "storage" not in skip:
        for storage in (QUICK_STORAGE if args.quick else STORAGE):
            for policy in ("committee",) if args.quick else ("committee", "on-demand"):
                runs.append(budgeted(f"{policy}@50%/{storage}", "storage", f"{policy}/{storage}", policy, 50,
                                     options={"io_bandwidth": storage}, storage=storage,
                                     eval_tokens=args.eval_tokens // 2))
    if "quant" not in skip:
        bf16_pcts = {b for p, bs in grid.items() if p == "committee" for b in bs}
        for q in ("int8", "int4"):
            qs = sizes["quant"].get(q)
            full_q = qs["full"] if qs else sizes["full"]
            runs.append(budgeted(f"full/{q}", "quant", f"full/{q}", "full", _pct_of(sizes, full_q), quant=q,
                                 weight=full_q))
            runs[-1].pop("budget")  # all resident: no budget
            if qs and (q == "int4" or not args.quick):  # quick: committee@50% is next to full/int8 already
                pct = _pct_of(sizes, full_q)
                runs.append(budgeted(f"committee@{_fmt_pct(pct)} (=full/{q})", "quant", "committee", "committee",
                                     pct, weight=full_q, matched_to=f"full/{q}"))
            for b in (QUICK_QUANT_BUDGETS if args.quick else QUANT_BUDGETS).get(q, ()):
                runs.append(budgeted(f"committee/{q}@{b}%", "quant", f"committee/{q}", "committee", b, quant=q))
                if b not in bf16_pcts:  # the bf16 committee at the same bytes, for the comparison
                    runs.append(budgeted(f"committee@{b}%", "quant", "committee", "committee", b))
                    bf16_pcts.add(b)
    if "shadow" not in skip and not args.quick:
        # Below full/int4's bytes, everything quantised (int4 experts, int8 non-expert weights), with and
        # without int2 shadows of the non-members (the fixed subset carries them best: docs/results/shadow*.md).
        for b in SHADOW_BUDGETS:
            ne = {"nonexpert_quantize": "int8"}
            runs.append(budgeted(f"committee/int4+ne8@{b}%", "shadow", "committee/int4+ne8", "committee", b,
                                 quant="int4", options=ne))
            runs.append(budgeted(f"static/int4+ne8+shadow@{b}%", "shadow", "static/int4+ne8+shadow",
                                 "static-frequency", b, quant="int4", options=dict(ne, shadow="int2")))
            for r in runs[-2:]:
                if r.get("skip", "").startswith("skipped: ") and "minimum budget" in r["skip"]:
                    r.pop("skip")  # that minimum is for bf16 non-expert weights; the load checks its own
    if "planned" not in skip:
        runs += _planned_runs(args, base, sizes, grid)
    if "peers" not in skip:
        runs.append(dict(base, label="transformers", section="peers", curve="transformers", kind="transformers",
                         eval_tokens=min(args.eval_tokens, 2048), weight_bytes=sizes["full"], mem_pct=100.0))
        acc = dict(base, label="accelerate-offload@50%", section="peers", curve="accelerate-offload",
                   kind="accelerate", expert_fraction=0.5, budget_bytes=_pct_bytes(sizes, 50),
                   weight_bytes=_pct_bytes(sizes, 50), mem_pct=50.0, eval_tokens=min(args.eval_tokens, 512),
                   prompts=prompts[:1], decode_tokens=min(args.decode_tokens, 16), trials=min(args.trials, 2))
        if common.missing("accelerate"):
            acc["skip"] = common.missing("accelerate")
        runs.append(acc)
    if vision_sizes and "vision" not in skip:
        vbase = {"kind": "pcmoe", "model": str(args.vision), "model_fp": vision_sizes.get("fingerprint"),
                 "vision": True, "frames": args.frames, "threads": args.threads, "section": "vision",
                 "options": {}}  # the model's pcmoe_options.json sets its committee knobs
        runs.append(dict(vbase, label="vision full", curve="vision full", policy="full", calibration=True,
                         weight_bytes=vision_sizes["full"], mem_pct=100.0))
        vgrid = QUICK_VISION if args.quick else {p: grid.get("committee", FULL_BUDGETS) for p in VISION_POLICIES}
        for policy, budgets in vgrid.items():
            for b in budgets:
                if b == 100:
                    continue
                nbytes = _pct_bytes(vision_sizes, b)
                run = dict(vbase, label=f"vision {policy}@{b}%", curve=f"vision {policy}", policy=policy,
                           budget=nbytes, weight_bytes=nbytes, mem_pct=float(b))
                need = vision_sizes["min_budget"][policy == "committee"]
                if nbytes < need:
                    run["skip"] = f"skipped: {format_bytes(nbytes)} is below the minimum budget {format_bytes(need)}"
                runs.append(run)
        if "shadow" not in skip and not args.quick:  # issue 13's vision point: 30 % of expert memory
            nbytes = _pct_bytes(vision_sizes, 30)
            runs.append(dict(vbase, label="vision committee+shadow/int3@30%", curve="vision committee+shadow/int3",
                             policy="committee", budget=nbytes, weight_bytes=nbytes, mem_pct=30.0,
                             options={"shadow": "int3"}))
    for r in runs:
        r["key"] = runner.spec_key(r)
    return runs


def _planned_runs(args, base: dict, sizes: dict, grid: dict) -> list[dict]:
    """The "planned" curve: at each weight budget of the committee curve, at full/int8's and
    full/int4's bytes and at those of int8 / int4 everything, the configuration the planner picks
    for that many weight bytes (per-layer sizes, precisions, F, the non-expert precision) from the
    model's device profile (pcmoe.planner; docs/PLANNER.md)."""
    from pcmoe.planner.planning import Planner, profile_file

    path = profile_file(args.model)
    label = dict(base, label="planned", section="quant", curve="planned", policy="committee")
    if not path.exists():
        return [dict(label, skip=f"skipped: no device profile {path} (make one with `pcmoe calibrate`)")]
    planner = Planner.from_file(path, weights_only=True)
    points = {_pct_bytes(sizes, b) for b in grid.get("committee", FULL_BUDGETS)}
    points |= {q["full"] for q in sizes["quant"].values() if q}
    # and everything quantised alike (experts and non-expert weights int8 / int4: int4's is llama.cpp
    # q4_K_M's weight bytes on the shipped LM, 13.9 MB), where the profile searches the non-expert precision
    ne = planner.profile.nonexpert_bytes
    if planner.space.nonexpert_precisions:
        points |= {q["full"] - ne["full"] + ne[mode] for mode, q in sizes["quant"].items() if q and mode in ne}
    # and the shadow section's budgets (below int4 all resident), where the profile searches shadows
    if planner.space.shadow_modes and not args.quick and "shadow" not in set(filter(None, args.skip.split(","))):
        points |= {_pct_bytes(sizes, b) for b in SHADOW_BUDGETS}
    runs = []
    for nbytes in sorted(points):
        pct = _pct_of(sizes, nbytes)
        run = dict(label, label=f"planned@{_fmt_pct(pct)}", mem_pct=round(pct, 2), weight_bytes=nbytes)
        try:
            plan = planner.plan(nbytes)
        except ValueError as e:  # below the least weight bytes any configuration needs
            run["skip"] = f"skipped: {str(e).splitlines()[0]}"
        else:
            run.update(plan=planner.plan_dict(plan, {"weights_bytes": nbytes}), weight_bytes=int(plan.memory))
        runs.append(run)
    return runs


def limit_for(spec: dict, overhead: int | None) -> tuple[int | None, str]:
    """The cgroup memory limit of a run and why."""
    if spec.get("kind") == "transformers":
        return None, "none: transformers keeps the safetensors file mapped beside its copy (~2x weights)"
    if spec.get("kind") == "accelerate":
        return spec["budget_bytes"] + ACCELERATE_ALLOWANCE, "budget + 1 GiB (the anchors' allowance)"
    if spec.get("calibration"):
        return None, "none: calibration (peak RSS - resident weights = runtime overhead)"
    if overhead is None:
        return None, "none: no runtime overhead measured (the full run failed)"
    return spec["weight_bytes"] + overhead + ALLOCATOR_SLACK, "weights + measured overhead + 64 MiB"


# -- running -------------------------------------------------------------------------------------


def run_one(spec: dict, limit: int | None, use_cgroup: bool, timeout: float = TIMEOUT_S) -> dict:
    """Measure one spec in a fresh worker process (pcmoe.bench.runner); never raises on a failed,
    killed or timed-out worker."""
    return runner.measure(spec, limit, use_cgroup, timeout)


def run_or_reuse(spec: dict, overhead: int | None, done: dict, log, use_cgroup: bool) -> dict:
    """The record of one spec: skipped, reused from an interrupted sweep's log, or measured now
    (inside its cgroup limit, appended to the log)."""
    if spec.get("skip"):
        return runner.skipped(spec, spec["skip"])
    if spec["key"] in done:
        return done[spec["key"]]
    limit, basis = limit_for(spec, overhead)
    rec = run_one(spec, limit if use_cgroup else None, use_cgroup)
    rec["limit_basis"] = basis if use_cgroup else "none: cgroup limits off"
    log.append(rec)
    return rec


_model_sizes = common.model_sizes   # the names tests and the planner curve use
_log_status = common.log_status


def cmd_bench(args) -> int:
    from pcmoe.bench import cgroup, report

    command = command_line(args)  # before the defaults below are filled in
    out = Path(args.out)
    if args.report_only:
        if not (out / "bench.json").exists():
            raise SystemExit(f"error: {out}/bench.json does not exist; run pcmoe bench --out {out} first")
        print(report.rebuild(out, markdown_to=args.markdown, plots_dir=args.plots_dir))
        return 0
    model = Path(args.model)
    if not (model / "config.json").exists():
        raise SystemExit(f"error: {model} is not a checkpoint folder")
    args.data = args.data or str(model / "eval" / "heldout.txt")
    args.profile = args.profile or str(model / "profile.json")
    if not Path(args.data).exists():
        raise SystemExit(f"error: held-out data {args.data} does not exist; pass --data FILE.txt")
    resolve_defaults(args)
    out.mkdir(parents=True, exist_ok=True)
    use_cgroup = not args.no_cgroup and cgroup.available()
    if not args.no_cgroup and not use_cgroup:
        print("cgroup v1 memory controller not writable (needs root and /sys/fs/cgroup/memory): "
              "runs without memory limits", file=sys.stderr)
    sizes = _model_sizes(args.model)
    skip = set(filter(None, args.skip.split(",")))
    vision_sizes = None
    if args.vision and "vision" not in skip and Path(args.vision, "config.json").exists():
        vision_sizes = _model_sizes(args.vision, quant=False)
    encode, _ = protocol.tokenizer_encoder(args.model)
    prompts = protocol.prompts(protocol.read_documents(args.data), encode, args.prompts)
    if len(prompts) < args.prompts:
        print(f"only {len(prompts)} documents of {args.data} have 64 tokens: {len(prompts)} prompt(s) per trial",
              file=sys.stderr)
    runs = plan_runs(args, prompts, sizes, vision_sizes)
    if not Path(args.profile).exists():
        runs = [r for r in runs if r.get("policy") != "static-frequency"]
    log = common.RunLog(out / "runs.jsonl")
    if args.fresh:
        log.restart()
    done = log.done()
    overheads: dict[str, int] = {}
    print(f"{len(runs)} runs; cgroup memory limits {'on' if use_cgroup else 'off'}", file=sys.stderr)
    results = []
    for i, spec in enumerate(runs):
        rec = run_or_reuse(spec, overheads.get(spec["model"]), done, log, use_cgroup)
        if spec.get("calibration") and rec.get("returncode") == 0:
            overheads[spec["model"]] = max(0, int(rec["peak_rss_bytes"] - rec["resident_bytes"]))
            if not spec.get("vision"):
                print(f"runtime overhead (full run: peak RSS - resident weights): "
                      f"{format_bytes(overheads[spec['model']])}", file=sys.stderr)
        results.append(rec)
        _log_status(i + 1, len(runs), rec)
    if "llamacpp" not in skip and "peers" not in skip:
        from pcmoe.bench import llamacpp

        results.extend(llamacpp.run_all(args, sizes, overheads.get(str(args.model)), use_cgroup, log, done))
    scale_info = None
    if args.scale:
        from pcmoe.bench import scale

        scale_results, scale_info = scale.run_section(args, prompts, log, done, use_cgroup, run_or_reuse)
        results.extend(scale_results)
    meta = _meta(args, command, sizes, vision_sizes, overheads, use_cgroup)
    if scale_info:
        meta["scale"] = scale_info
    if args.scaling:
        from pcmoe.bench import scaling

        argv = ["--out", str(out / "scaling"), "--threads", str(args.threads), "--trials", str(args.trials)]
        scaling.main(argv + (["--quick"] if args.quick else []))
        meta["scaling_command"] = shlex.join(["python", "-m", "pcmoe.bench.scaling", *argv]
                                             + (["--quick"] if args.quick else []))
    if args.regime:
        from pcmoe.bench import regime

        argv = ["--out", str(out / "regime"), "--threads", str(args.threads), "--trials", str(args.trials),
                "--source", str(args.model), "--data", args.data] + (["--quick"] if args.quick else []) + (
                    ["--fresh"] if args.fresh else [])
        if args.llamacpp_src:
            argv += ["--llamacpp-src", args.llamacpp_src]
        try:
            regime.main(argv)
            meta["regime_command"] = shlex.join(["python", "-m", "pcmoe.bench.regime", *argv])
        except SystemExit as e:  # e.g. no cgroup v1: the rest of the report is still written
            print(f"regime study not run: {e}", file=sys.stderr)
    print(report.write_report(out, results, meta, markdown_to=args.markdown, plots_dir=args.plots_dir))
    return 0


def _meta(args, command, sizes, vision_sizes, overheads, use_cgroup) -> dict:
    m = common.machine()
    return {"command": command, "commit": common.git_commit(), "date": time.strftime("%Y-%m-%d %H:%M"),
            **m, "threads": args.threads, "versions": common.versions(), "model": str(args.model),
            "model_sizes": sizes, "vision": str(args.vision) if vision_sizes else None, "vision_sizes": vision_sizes,
            "overheads": overheads, "allocator_slack": ALLOCATOR_SLACK, "accelerate_allowance": ACCELERATE_ALLOWANCE,
            "cgroup": use_cgroup, "data": args.data, "quick": args.quick, "trials": args.trials, "warmup": 1,
            "prompts": args.prompts, "decode_tokens": args.decode_tokens, "eval_tokens": args.eval_tokens,
            "frames": args.frames}
