"""The regime study (`pcmoe bench --regime`, issue 14): gigabyte MoE checkpoints inside total
process memory limits well below their size, pcmoe against llama.cpp and accelerate, each in the
same cgroup limit.

Checkpoints (benchmarks only; built on demand under data/bench/regime/, never committed): the
scaling study's "mid" Qwen3-MoE shape (8 MoE layers, hidden 1024, expert width 768, top-4) with 32
and 80 experts per layer (1.4 / 3.2 GB in bf16): random weights with **baked routing**
(pcmoe.bench.baked), i.e. the shipped LM's routing on held-out text (`pcmoe trace`) written into the
router and attention weights, so that pcmoe, transformers and llama.cpp all route the same,
realistic way. Decode feeds the held-out text's own next tokens (protocol.decode_trials'
continuations): the greedy output of random weights loops on a few tokens whose routing flatters
every cache.

Limits: total process memory (cgroup v1: RSS + page cache) as fractions of the bf16 checkpoint
(default 1.15, 0.6, 0.45, 0.33, 0.25); the lowest are below llama.cpp's q4_K_M GGUF + its runtime.

Systems, each a fresh process with its files evicted from the page cache, inside the limit:
  pcmoe bf16 / int8 / int4       committee, or everything resident where it fits, at a weight budget
                                 of limit - pcmoe's runtime overhead at that precision (measured by a
                                 calibration run without a limit) - 64 MiB; int8 / int4 quantise the
                                 non-expert weights too, as the GGUFs do
  pcmoe on-demand bf16 / int4    exact: a miss reads the expert into an LRU cache (same budget)
  llama.cpp bf16 / q8_0 / q4_K_M use_mmap=True: the kernel pages the GGUF in and out under the limit
  accelerate                     transformers + disk offload, max_memory = limit - 1 GiB (the anchors'
                                 allowance for its runtime); not run where that leaves < the non-expert weights
pcmoe runs uniform configurations: the planner's quality model cannot be fit on random weights
(their perplexity means nothing); what each precision and committee share costs in quality is
measured on the shipped LM (BENCHMARKS.md).

Figures: decode and prefill tokens/s, time to first token from a cold start (process start to the
first prompt's logits), storage bytes read per decode token (/proc/self/io, page faults included),
peak RSS and the group's peak charge, OOM kills, time-outs. Resumable: records go to
<out>/runs.jsonl as they finish and a finished run (an OOM included) is not repeated for the same
checkpoint and spec (--fresh starts over). Writes <out>/regime.json, regime.md and regime.png.

    pcmoe bench --regime                      # after the other sections, into <out>/regime
    python -m pcmoe.bench.regime --out results/regime [--experts 32,80] [--limits 1.15,0.6] [--systems ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
import time
from pathlib import Path

from pcmoe import protocol
from pcmoe.bench import common, runner
from pcmoe.budget import format_bytes
from pcmoe.system import atomic_write_text

ROOT = Path("data/bench/regime")
TRACE = Path("data/traces/pcmoe-lm-heldout.npz")
EXPERTS = (32, 80)
LIMIT_FRACTIONS = (1.15, 0.6, 0.45, 0.33, 0.25)
QUICK_LIMITS = (0.6, 0.33)
ALLOCATOR_SLACK = 64 << 20
ACCELERATE_ALLOWANCE = 1 << 30
TIMEOUT_S = 1800
PCMOE_SYSTEMS = {  # name: (policy, precision or None for the checkpoint's)
    "pcmoe bf16": ("committee", None), "pcmoe int8": ("committee", "int8"), "pcmoe int4": ("committee", "int4"),
    "pcmoe on-demand bf16": ("on-demand", None), "pcmoe on-demand int4": ("on-demand", "int4"),
    "pcmoe int4 + int2 shadows": ("committee", "int4"),
}
SHADOWS = {"pcmoe int4 + int2 shadows": "int2"}  # a low-bit stand-in of every non-member (issue 13)
LLAMACPP_SYSTEMS = {"llama.cpp bf16": "bf16", "llama.cpp q8_0": "q8_0", "llama.cpp q4_K_M": "q4_K_M"}
SYSTEMS = (*PCMOE_SYSTEMS, *LLAMACPP_SYSTEMS, "accelerate")
MATCHED = (("pcmoe bf16", "llama.cpp bf16"), ("pcmoe int8", "llama.cpp q8_0"), ("pcmoe int4", "llama.cpp q4_K_M"))


# -- inputs --------------------------------------------------------------------------------------


def ensure_trace(source: Path, data: Path, trace: Path = TRACE) -> Path:
    """The shipped LM's routing on the held-out text, recorded once."""
    if not trace.exists():
        from pcmoe.trace import cmd_trace  # `pcmoe trace --model SOURCE --data DATA -o TRACE`

        trace.parent.mkdir(parents=True, exist_ok=True)
        cmd_trace(argparse.Namespace(model=str(source), data=str(data), out=str(trace), window=256, max_tokens=None,
                                     threads=None))
    return trace


def ensure_checkpoint(experts: int, shape: str, trace: Path, tokenizer_from: Path, threads: int,
                      root: Path = ROOT) -> Path:
    """The baked checkpoint of `experts` experts per layer, built on first use (the random source,
    then its baked copy: both written to temporary names and renamed when complete)."""
    from pcmoe.bench import baked, scale

    name = f"qwen3-moe-e{experts}" if shape == "mid" else f"qwen3-moe-{shape}-e{experts}"
    out = root / f"{name}-baked"
    if (out / "config.json").exists():
        return out
    source = scale.ensure_model(root / name, tokenizer_from, shape, experts, threads)
    print(f"[regime] baking the routing of {trace} into {out}", file=sys.stderr, flush=True)
    baked.bake(source, out, trace, tokenizer_from=tokenizer_from)
    return out


def text_prompts(model: Path, data: str, n: int, decode_tokens: int,
                 prompt_tokens: int = protocol.PROMPT_TOKENS) -> tuple[list[list[int]], list[list[int]]]:
    """`n` prompts of held-out documents and each one's next decode_tokens - 1 ids (what decode feeds),
    folded into the checkpoint's vocabulary as baked routing folds the trace's (ids % vocab)."""
    encode, _ = protocol.tokenizer_encoder(model)
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    docs = protocol.read_documents(data)
    need = prompt_tokens + decode_tokens
    prompts, conts = [], []
    for doc in docs[::max(1, len(docs) // max(n, 1))]:
        ids = [i % vocab for i in encode(doc)]
        if len(ids) >= need:
            prompts.append(ids[:prompt_tokens])
            conts.append(ids[prompt_tokens:prompt_tokens + decode_tokens - 1])
        if len(prompts) == n:
            break
    if not prompts:
        raise SystemExit(f"error: no document of {data} has {need} tokens; pass --data with longer documents")
    return prompts, conts


def quant_files(model: Path) -> list[Path]:
    return sorted((Path(model) / "pcmoe_quant").glob("*.safetensors"))


def shadow_files(model: Path) -> list[Path]:
    """The shadow cache of a checkpoint (pcmoe.shadow.ShadowCache), evicted like its weights."""
    from pcmoe.checkpoint import Checkpoint, CheckpointError
    from pcmoe.shadow import ShadowCache

    try:
        ckpt = Checkpoint(Path(model))
    except (OSError, ValueError, CheckpointError):  # no checkpoint (yet): nothing cached for it
        return []
    try:
        return ShadowCache.files(ckpt.fingerprint())
    finally:
        ckpt.close()


# -- the plan ------------------------------------------------------------------------------------


def limits_for(full_bytes: int, fractions) -> list[int]:
    return [int(f * full_bytes) for f in fractions]


def pcmoe_budget(limit: int, overhead: int | None) -> int | None:
    """The weight budget pcmoe is given inside a total limit: what its runtime leaves."""
    return None if overhead is None else limit - overhead - ALLOCATOR_SLACK


def pcmoe_config(sizes: dict, precision: str | None, policy: str, budget: int | None) -> dict:
    """The policy and budget of a pcmoe run at `budget` weight bytes, or {"skip": why}."""
    s = sizes["quant"].get(precision) if precision else sizes
    if s is None:
        return {"skip": f"does not run: {precision} is not available ({sizes['quant_errors'].get(precision)})"}
    nonexpert = s["nonexpert"] if not precision else sizes["nonexpert_quantized"][precision]
    full = s["full"] - s["nonexpert"] + nonexpert
    if budget is None:
        return {"skip": "does not run: no runtime overhead was measured (its calibration run failed)"}
    if budget >= full and policy == "committee":
        return {"policy": "full", "budget": None, "weight_bytes": full}
    minimum = s["min_budget"][True] - s["nonexpert"] + nonexpert
    if budget < minimum:
        return {"skip": f"does not fit: {format_bytes(budget)} left for weights, the least is {format_bytes(minimum)}"}
    budget = min(int(budget), full)  # on-demand with room for every expert: exact and all cached
    return {"policy": policy, "budget": budget, "weight_bytes": budget}


def plan(args, model: Path, sizes: dict, overheads: dict, prompts, conts, ggufs: dict) -> list[dict]:
    """The measured runs at each limit (calibration runs are made before: `overheads` holds their result)."""
    base = {"model": str(model), "model_fp": sizes["fingerprint"], "eval_tokens": 0, "prompts": prompts,
            "continuations": conts, "decode_tokens": args.decode_tokens, "trials": args.trials, "warmup": 1,
            "threads": args.threads, "section": "regime", "experts": sizes["experts"]}
    runs = []
    shadows = [str(p) for p in shadow_files(model)] if any(s in SHADOWS for s in args.systems) else []
    for frac, limit in zip(args.limit_fractions, limits_for(sizes["full"], args.limit_fractions)):
        at = dict(base, limit_bytes=limit, limit_fraction=frac)
        for system in args.systems:
            label = f"E{sizes['experts']} {system} @{format_bytes(limit)}"
            run = dict(at, label=label, system=system, curve=system)
            if system in PCMOE_SYSTEMS:
                policy, precision = PCMOE_SYSTEMS[system]
                options = {"quantize": precision, "nonexpert_quantize": precision} if precision else {}
                calibrated = shadow_key(system) if system in SHADOWS else precision or "bf16"
                cfg = pcmoe_config(sizes, precision, policy, pcmoe_budget(limit, overheads.get(calibrated)))
                if system in SHADOWS and cfg.get("policy") == "committee":
                    options["shadow"] = SHADOWS[system]
                run.update(kind="pcmoe", options=options, **cfg)
                run["evict"] = ([str(p) for p in common.weight_files(model)]
                                + ([str(p) for p in quant_files(model)] if precision else [])
                                + (shadows if "shadow" in options else []))
            elif system in LLAMACPP_SYSTEMS:
                t = LLAMACPP_SYSTEMS[system]
                run.update(kind="llamacpp", outtype=t, use_mmap=True, n_ctx=512, n_batch=256, logits_all=False)
                path = ggufs.get(t)
                if isinstance(path, Path):
                    run.update(gguf=str(path), evict=[str(path)])
                else:
                    run["skip"] = f"does not run: {path or 'llama-cpp-python is not installed'}"
            else:  # accelerate
                budget = limit - ACCELERATE_ALLOWANCE
                run.update(kind="accelerate", budget_bytes=budget, prompts=prompts[:1], continuations=conts[:1],
                           decode_tokens=min(args.decode_tokens, 8), trials=1,
                           evict=[str(p) for p in common.weight_files(model)])
                if budget < sizes["nonexpert"]:
                    run["skip"] = (f"does not run: the limit leaves {format_bytes(max(budget, 0))} beside accelerate's "
                                   f"1 GiB runtime, below the {format_bytes(sizes['nonexpert'])} of non-expert weights")
                elif common.missing("accelerate"):
                    run["skip"] = "does not run: " + common.missing("accelerate")
            run["key"] = runner.spec_key(run, prefix="regime-", ignore=("evict",))
            runs.append(run)
    return runs


def calibration_runs(args, model: Path, sizes: dict, prompts, conts) -> list[dict]:
    """pcmoe `full` at each precision without a limit: peak RSS - resident weights = its runtime overhead."""
    runs = []
    for precision in sorted({PCMOE_SYSTEMS[s][1] or "bf16" for s in args.systems if s in PCMOE_SYSTEMS}):
        q = None if precision == "bf16" else precision
        run = {"kind": "pcmoe", "model": str(model), "model_fp": sizes["fingerprint"], "eval_tokens": 0,
               "prompts": prompts, "continuations": conts, "decode_tokens": args.decode_tokens, "trials": 1,
               "warmup": 1, "threads": args.threads, "section": "regime-calibration", "policy": "full",
               "options": {"quantize": q, "nonexpert_quantize": q} if q else {}, "precision": precision,
               "label": f"E{sizes['experts']} calibration pcmoe {precision}", "experts": sizes["experts"]}
        run["key"] = runner.spec_key(run, prefix="regime-")
        runs.append(run)
    # Shadows cost runtime memory of their own (making the bank, the eager batch path): calibrated on a
    # committee at half the experts with shadows (`full` has no non-members to shadow).
    for system in [s for s in args.systems if s in SHADOWS]:
        q = PCMOE_SYSTEMS[system][1]
        run = dict(kind="pcmoe", model=str(model), model_fp=sizes["fingerprint"],
                   eval_tokens=0, prompts=prompts, continuations=conts, decode_tokens=args.decode_tokens, trials=1,
                   warmup=1, threads=args.threads, section="regime-calibration", policy="committee",
                   budget="50%experts", options={"quantize": q, "nonexpert_quantize": q, "shadow": SHADOWS[system]},
                   precision=shadow_key(system), label=f"E{sizes['experts']} calibration {system}",
                   experts=sizes["experts"])
        run["key"] = runner.spec_key(run, prefix="regime-")
        runs.append(run)
    return runs


def shadow_key(system: str) -> str:
    """The calibration (runtime overhead) name of a shadowed system: "int4+int2"."""
    return f"{PCMOE_SYSTEMS[system][1]}+{SHADOWS[system]}"


# -- running -------------------------------------------------------------------------------------


def measure(spec: dict, limit: int | None) -> dict:
    module = "pcmoe.bench.llamacpp" if spec["kind"] == "llamacpp" else runner.WORKER
    evict = spec.get("evict", [])
    clean = {k: v for k, v in spec.items() if k not in ("evict",)}
    return runner.measure(clean, limit, True, TIMEOUT_S, module=module, evict=evict)


def too_small(rec: dict) -> bool:
    """A run whose load refused its budget (e.g. too small for every non-member's shadow)."""
    return rec.get("returncode") not in (0, None) and "below the minimum" in str(rec.get("error"))


def outcome(rec: dict) -> str:
    if rec.get("returncode") is None:  # not run ("skipped" of a finished run counts masked expert choices)
        return rec.get("skipped") or "not run"
    if too_small(rec):
        return f"does not fit: {rec['error']}"
    if rec.get("returncode") == 0:
        return "ok"
    if rec.get("oom_killed"):
        return "OOM killed"
    if rec.get("timed_out"):
        return f"timed out ({TIMEOUT_S} s)"
    return f"failed: {rec.get('error')}"


def run_all(args) -> dict:
    from pcmoe import qcache_build
    from pcmoe.bench import cgroup

    if not cgroup.available():
        raise SystemExit("error: the regime study needs cgroup v1 memory limits (root and /sys/fs/cgroup/memory)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = common.RunLog(out / "runs.jsonl")
    if args.fresh:
        log.restart()
    # Outcomes are reused (an OOM or a time-out is a result); a failure of another kind is measured again.
    done = {r["key"]: r for r in log.records if r.get("key") and (
        r.get("returncode") == 0 or r.get("oom_killed") or r.get("timed_out") or too_small(r))}
    trace = ensure_trace(Path(args.source), Path(args.data))
    results, models = [], []
    for experts in args.experts:
        model = ensure_checkpoint(experts, args.shape, trace, Path(args.source), args.threads)
        qcache_build.build(model, ["int8", "int4"], progress=True)  # written once, found afterwards
        sizes = common.model_sizes(str(model))
        sizes["experts"] = experts
        prompts, conts = text_prompts(model, args.data, args.prompts, args.decode_tokens)
        ggufs = _ggufs(args, model) if any(s in LLAMACPP_SYSTEMS for s in args.systems) else {}
        overheads = {}
        for spec in calibration_runs(args, model, sizes, prompts, conts):
            rec = done.get(spec["key"])
            if rec is None or rec.get("returncode") != 0:  # a failed calibration is made again
                rec = _run(spec, None, log)
            if rec.get("returncode") == 0 and rec.get("peak_rss_bytes") and rec.get("resident_bytes"):
                overheads[spec["precision"]] = max(0, int(rec["peak_rss_bytes"] - rec["resident_bytes"]))
            print(f"[regime] {spec['label']}: {outcome(rec)}; runtime overhead "
                  f"{format_bytes(overheads.get(spec['precision']))}", file=sys.stderr, flush=True)
            results.append(rec)
        runs = plan(args, model, sizes, overheads, prompts, conts, ggufs)
        for i, spec in enumerate(runs):
            if spec.get("skip"):
                rec = runner.record(spec, {"returncode": None, "skipped": spec["skip"]}, _COPY)
            else:
                rec = done.get(spec["key"]) or _run(spec, spec["limit_bytes"], log)
            results.append(rec)
            print(f"[regime {i + 1}/{len(runs)}] {spec['label']:44s} {rec.get('wall_s', 0):6.1f}s {outcome(rec)}",
                  file=sys.stderr, flush=True)
        models.append({"experts": experts, "model": str(model), "sizes": _public_sizes(sizes),
                       "overheads": overheads, "ggufs": {t: (str(p) if isinstance(p, Path) else p)
                                                         for t, p in ggufs.items()},
                       "gguf_bytes": {t: p.stat().st_size for t, p in ggufs.items() if isinstance(p, Path)},
                       "routing": _routing_note(model)})
    if args.quality:
        measure_quality(args, results, log, done)
    meta = {"command": args.command, "commit": common.git_commit(), "date": time.strftime("%Y-%m-%d %H:%M"),
            **common.machine(), "versions": common.versions(), "threads": args.threads, "models": models,
            "limit_fractions": list(args.limit_fractions), "systems": list(args.systems),
            "decode_tokens": args.decode_tokens, "prompts": args.prompts, "trials": args.trials,
            "allocator_slack": ALLOCATOR_SLACK, "accelerate_allowance": ACCELERATE_ALLOWANCE}
    return write_report(out, results, meta)


_COPY = ("key", "system", "experts", "limit_bytes", "limit_fraction", "weight_bytes", "budget", "policy",
         "budget_bytes", "outtype", "precision")


def _run(spec: dict, limit: int | None, log) -> dict:
    rec = runner.record(spec, measure(spec, limit), _COPY)
    log.append(rec)
    return rec


def _ggufs(args, model: Path) -> dict:
    """GGUFs of the checkpoint (converted once, cached beside the other sections'), or error strings."""
    if common.missing("llama_cpp"):
        why = "llama-cpp-python is not installed; pip install 'pcmoe[llamacpp]'"
        return {t: why for t in LLAMACPP_SYSTEMS.values()}
    from pcmoe.bench.gguf import convert, default_gguf_dir, gguf_path

    out = {}
    for t in sorted({LLAMACPP_SYSTEMS[s] for s in args.systems if s in LLAMACPP_SYSTEMS}):
        try:
            out[t] = convert(model, gguf_path(default_gguf_dir(model), model, t), t, src=args.llamacpp_src,
                             threads=args.threads)
        except Exception as e:  # noqa: BLE001 - reported in the records
            lines = str(e).strip().splitlines()
            out[t] = f"conversion to {t} failed: {lines[-1] if lines else repr(e)}"
    return out


def _public_sizes(sizes: dict) -> dict:
    return {k: sizes[k] for k in ("nonexpert", "all_experts", "full", "dtype", "nonexpert_quantized") if k in sizes} | {
        "quant_full": {q: s["full"] - s["nonexpert"] + sizes["nonexpert_quantized"][q]
                       for q, s in sizes["quant"].items()}}


def _routing_note(model: Path) -> str | None:
    try:
        return json.loads((Path(model) / "pcmoe_baked.json").read_text()).get("routing")
    except (OSError, ValueError):
        return None


# -- quality, measured on the trained model ---------------------------------------------------------

QUALITY_TOKENS = 4096
QUALITY_SLACK = 1.05  # "the same quality": perplexity within 5 % of llama.cpp q4_K_M's


def member_share(rec: dict) -> float | None:
    """The share of experts a pcmoe run kept as committee members (1.0: every expert resident)."""
    if rec.get("policy") in ("full", "on-demand"):  # exact: every expert is used as the router says
        return 1.0
    sizes, n = rec.get("committee_sizes"), rec.get("experts")  # experts per layer
    if not sizes or not n:
        return None
    return sum(sizes) / (len(sizes) * n)


@functools.lru_cache(maxsize=4)
def _source_facts(source: str) -> tuple[str, str, int, int]:
    """(fingerprint, model type, experts per layer, MoE layers) of the trained model, read once."""
    from pcmoe.engine import inspect

    info = inspect(source)
    return common.fingerprint(source), info["model_type"], info["experts_per_layer"], info["moe_layers"]


def quality_spec(rec: dict, source: Path, data: str, threads: int) -> dict | None:
    """The shipped LM at the same policy, precision and member share as a pcmoe run of the study
    (a plan of round(share x experts) members per layer, at least 1): its perplexity says what that
    configuration costs (random weights have no quality of their own)."""
    share = member_share(rec)
    if share is None:
        return None
    precision = PCMOE_SYSTEMS[rec["system"]][1]
    options = {"quantize": precision, "nonexpert_quantize": precision} if precision else {}
    if rec["system"] in SHADOWS and rec.get("policy") == "committee":
        options["shadow"] = SHADOWS[rec["system"]]
    fingerprint, model_type, experts, layers = _source_facts(str(source))
    spec = {"kind": "pcmoe", "model": str(source), "model_fp": fingerprint, "data": data,
            "eval_tokens": QUALITY_TOKENS, "threads": threads, "section": "regime-quality", "options": options,
            "share": round(share, 3), "experts": experts}
    members = max(1, round(share * experts))
    if members >= experts:
        spec.update(policy="full", budget=None)
    else:
        spec.update(policy=rec.get("policy", "committee"), budget=None, plan={
            "format": "pcmoe-plan/1", "model_type": model_type, "num_experts": [experts] * layers,
            "committee_sizes": [members] * layers, "precisions": [precision or "full"] * layers,
            "nonexpert_precision": precision or "full"})
    spec["label"] = f"quality {precision or 'bf16'} {spec['policy']} {members}/{experts} members"
    spec["key"] = runner.spec_key(spec, prefix="regime-q-")
    return spec


def llamacpp_quality_spec(outtype: str, gguf, source: Path, streams: Path, threads: int) -> dict:
    spec = {"kind": "llamacpp", "model": str(source), "model_fp": _source_facts(str(source))[0], "outtype": outtype,
            "gguf": str(gguf), "use_mmap": False, "eval_tokens": QUALITY_TOKENS, "streams": str(streams),
            "threads": threads, "section": "regime-quality", "label": f"quality llama.cpp {outtype}"}
    spec["key"] = runner.spec_key(spec, prefix="regime-q-", ignore=("gguf", "streams"))
    return spec


def measure_quality(args, results: list[dict], log, done: dict) -> dict[str, float]:
    """Perplexity on the shipped LM of every configuration the study ran: "<system> share <s>" for
    pcmoe and "<system>" for llama.cpp; the records are appended to `results`."""
    source, out = Path(args.source), {}
    todo: dict[str, dict] = {}
    for rec in results:
        if rec.get("section") == "regime" and rec.get("returncode") == 0 and rec.get("system") in PCMOE_SYSTEMS:
            spec = quality_spec(rec, source, args.data, args.threads)
            if spec is not None:
                rec["quality_key"] = spec["key"]
                todo[spec["key"]] = spec
    types = sorted({LLAMACPP_SYSTEMS[r["system"]] for r in results if r.get("section") == "regime"
                    and r.get("returncode") == 0 and r.get("system") in LLAMACPP_SYSTEMS})
    if types:
        from pcmoe.bench import llamacpp

        ggufs = _ggufs(argparse.Namespace(systems=[f"llama.cpp {t}" for t in types], llamacpp_src=args.llamacpp_src,
                                          threads=args.threads), source)
        streams = llamacpp._streams_file(argparse.Namespace(model=str(source), data=args.data), Path(args.out),
                                         QUALITY_TOKENS)
        for t in types:
            if isinstance(ggufs.get(t), Path):
                spec = llamacpp_quality_spec(t, ggufs[t], source, streams, args.threads)
                todo[spec["key"]] = spec
                for rec in results:
                    if (rec.get("system") == f"llama.cpp {t}" and rec.get("section") == "regime"
                            and rec.get("returncode") == 0):
                        rec["quality_key"] = spec["key"]
    for i, (key, spec) in enumerate(todo.items()):
        rec = done.get(key)
        if rec is None:
            rec = runner.record(spec, measure(dict(spec, evict=[]), None), ("key", "share", "experts", "policy"))
            rec["achieved_share"] = member_share(rec) if rec.get("returncode") == 0 else None  # staging takes room
            log.append(rec)
        results.append(rec)
        print(f"[regime quality {i + 1}/{len(todo)}] {spec['label']:40s} ppl {_f(rec.get('ppl'), '.2f')}",
              file=sys.stderr, flush=True)
        if rec.get("returncode") == 0:
            out[key] = rec["ppl"]
    for rec in results:
        if rec.get("quality_key") in out:
            rec["quality_ppl"] = out[rec["quality_key"]]
    return out


# -- the report ----------------------------------------------------------------------------------


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.0f}"


def _f(x, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def _config(rec: dict) -> str:
    if rec.get("system", "").startswith("pcmoe"):
        if rec.get("policy") == "full":
            return "all resident"
        if rec.get("budget"):
            return f"weights {format_bytes(rec['budget'])}"
    if rec.get("system") == "accelerate" and rec.get("budget_bytes"):
        return f"max_memory {format_bytes(rec['budget_bytes'])}"
    if rec.get("system", "").startswith("llama.cpp"):
        return "mmap"
    return ""


def ratios(results: list[dict]) -> list[dict]:
    """Per (experts, limit): decode of each matched pair and of the best of each system family."""
    ok = {}
    for r in results:
        if r.get("section") == "regime" and r.get("returncode") == 0 and r.get("decode_tokens_per_s"):
            if r["system"] in SHADOWS and r.get("policy") == "full":
                continue  # everything fits: the same configuration as "pcmoe int4" (a second sample, not a rival)
            ok[(r["experts"], r["limit_bytes"], r["system"])] = r
    q4 = next((r.get("quality_ppl") for r in results if r.get("system") == "llama.cpp q4_K_M"
               and r.get("quality_ppl")), None)
    rows = []
    for experts, limit in sorted({(r["experts"], r["limit_bytes"]) for r in results if r.get("section") == "regime"}):
        def get(system, at=(experts, limit)):
            rec = ok.get((*at, system))
            return rec["decode_tokens_per_s"] if rec else None

        row = {"experts": experts, "limit_bytes": limit}
        for a, b in MATCHED:
            row[f"{a} / {b}"] = get(a) / get(b) if get(a) and get(b) else None
        best_p = max((get(s) or 0 for s in PCMOE_SYSTEMS), default=0)
        best_l = max((get(s) or 0 for s in LLAMACPP_SYSTEMS), default=0)
        row["best pcmoe"], row["best llama.cpp"] = best_p or None, best_l or None
        row["best pcmoe / best llama.cpp"] = best_p / best_l if best_p and best_l else None
        # At matched quality: the fastest pcmoe run whose trained-LM perplexity is within QUALITY_SLACK
        # of llama.cpp's q4_K_M (its least precise GGUF) against the fastest llama.cpp run.
        matched = [ok[(experts, limit, s)] for s in PCMOE_SYSTEMS if (experts, limit, s) in ok]
        matched = [r for r in matched if q4 and r.get("quality_ppl") and r["quality_ppl"] <= QUALITY_SLACK * q4]
        fast = max(matched, key=lambda r: r["decode_tokens_per_s"], default=None)
        row["pcmoe at q4_K_M quality"] = fast["system"] if fast else None
        row["pcmoe at q4_K_M quality / best llama.cpp"] = (fast["decode_tokens_per_s"] / best_l
                                                          if fast and best_l else None)
        rows.append(row)
    return rows


def markdown(results: list[dict], meta: dict, plot_name: str | None) -> str:
    lines = ["# The regime study: gigabyte MoEs inside memory limits (issue 14)", "",
             f"Commit {meta['commit']}, {meta['date']}, {meta.get('cpu', '')}, {meta['threads']} thread(s). "
             f"Command: `{meta['command']}`.", "",
             "Random-weight checkpoints with **baked routing** (benchmarks only: the shipped LM's routing on "
             "held-out text, written into the weights, so every system routes the same way); decode feeds the "
             "held-out text's next tokens. Every run is a fresh process, its files evicted from the page cache, "
             "inside a cgroup v1 limit on its total memory (RSS + page cache). pcmoe's weight budget is the "
             "limit minus its measured runtime overhead at that precision minus 64 MiB; int8 / int4 quantise "
             "experts and non-expert weights. llama.cpp memory-maps its GGUF. accelerate offloads to disk with "
             "max_memory = limit - 1 GiB.", ""]
    for m in meta["models"]:
        s = m["sizes"]
        gg = ", ".join(f"{t} {format_bytes(b)}" for t, b in m.get("gguf_bytes", {}).items())
        ov = ", ".join(f"{p} {format_bytes(b)}" for p, b in m["overheads"].items())
        lines.append(f"- E{m['experts']}: {m['model']}, {format_bytes(s['full'])} in {s.get('dtype')} "
                     f"(non-expert {format_bytes(s['nonexpert'])}); pcmoe with everything quantised: "
                     + ", ".join(f"{q} {format_bytes(b)}" for q, b in s.get("quant_full", {}).items())
                     + f"; GGUFs: {gg or '-'}; pcmoe runtime overhead: {ov or '-'}. Routing: {m.get('routing')}.")
    lines += ["", "Decode (tokens/s, higher is better) at each total memory limit:", ""]
    lines += _pivot(results, "decode_tokens_per_s")
    if any(r.get("quality_ppl") for r in results):
        lines += ["", "What each configuration costs in quality: perplexity of the trained model (the one whose "
                  f"routing is baked in) over {QUALITY_TOKENS} held-out tokens at the same policy, precision and "
                  "share of experts kept as members (llama.cpp: its GGUF of the trained model, resident):", ""]
        lines += _pivot(results, "quality_ppl", ".2f")
    lines += ["", "Ratios of decode speed at the same limit (matched precision, and the best of each):", "",
              "| experts | limit | " + " | ".join(f"{a} / {b}" for a, b in MATCHED)
              + " | fastest / fastest (any quality) | pcmoe within 5 % of q4_K_M's perplexity / fastest llama.cpp |",
              "|---|---|" + "---|" * (len(MATCHED) + 2)]
    for r in ratios(results):
        at = r["pcmoe at q4_K_M quality / best llama.cpp"]
        cells = [_f(r[f"{a} / {b}"], ".2f") for a, b in MATCHED] + [
            _f(r["best pcmoe / best llama.cpp"], ".2f"),
            "-" if at is None else f"{at:.2f} ({r['pcmoe at q4_K_M quality']})"]
        lines.append(f"| E{r['experts']} | {format_bytes(r['limit_bytes'])} | " + " | ".join(cells) + " |")
    lines += ["", "Every run:", "",
              "| experts | limit | system | config | outcome | decode tok/s | prefill tok/s | TTFT cold s | "
              "read MB / decode token | peak RSS MB | cgroup peak MB | members | ppl (trained LM) |", "|---" * 13 + "|"]
    for r in results:
        if r.get("section") != "regime":
            continue
        per_token = r.get("decode_read_bytes_per_token")
        lines.append(f"| E{r.get('experts')} | {format_bytes(r.get('limit_bytes'))} | {r.get('system')} | "
                     f"{_config(r)} | {outcome(r)} | {_f(r.get('decode_tokens_per_s'))} | "
                     f"{_f(r.get('prefill_tokens_per_s'))} | {_f(r.get('ttft_cold_s'), '.2f')} | "
                     f"{_f(None if per_token is None else per_token / 1e6)} | {_mb(r.get('peak_rss_bytes'))} | "
                     f"{_mb(r.get('cgroup_max_usage_bytes'))} | {_share(r)} | {_f(r.get('quality_ppl'), '.2f')} |")
    busy = [r for r in results if (r.get("cpu_other_share") or 0) > 0.05]
    if busy:
        lines += ["", "Others used more than 5 % of the CPU during: " + ", ".join(
            f"{r['label']} ({100 * r['cpu_other_share']:.0f} %)" for r in busy) + "."]
    if plot_name:
        lines += ["", f"![decode speed vs memory limit]({plot_name})"]
    return "\n".join(lines) + "\n"


def _share(rec: dict) -> str:
    share = member_share(rec) if rec.get("returncode") == 0 and rec.get("system") in PCMOE_SYSTEMS else None
    return "-" if share is None else f"{100 * share:.0f} %"


def _pivot(results: list[dict], key: str, fmt: str = ".1f") -> list[str]:
    recs = [r for r in results if r.get("section") == "regime"]
    systems = [s for s in SYSTEMS if any(r.get("system") == s for r in recs)]
    lines = ["| experts | limit | " + " | ".join(systems) + " |", "|---|---|" + "---|" * len(systems)]
    for experts, limit in sorted({(r["experts"], r["limit_bytes"]) for r in recs}):
        cells = []
        for s in systems:
            r = next((r for r in recs if (r["experts"], r["limit_bytes"], r.get("system")) == (experts, limit, s)),
                     None)
            if r is None:
                cells.append("")
            elif r.get("returncode") == 0:
                cells.append(_f(r.get(key), fmt))
            elif r.get("returncode") is None or too_small(r):
                cells.append("does not fit" if too_small(r) or "fit" in str(r.get("skipped")) else "-")
            else:
                cells.append("OOM" if r.get("oom_killed") else "timeout" if r.get("timed_out") else "failed")
        lines.append(f"| E{experts} | {format_bytes(limit)} | " + " | ".join(cells) + " |")
    return lines


def plot(out: Path, results: list[dict], meta: dict) -> str | None:
    """Decode tokens/s against the memory limit, one line per system, one panel per checkpoint."""
    recs = [r for r in results if r.get("section") == "regime" and r.get("returncode") is not None]
    if not recs or common.missing("matplotlib"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["experts"] for r in recs})
    quality = any(r.get("quality_ppl") for r in recs)
    fig, axes = plt.subplots(2 if quality else 1, len(sizes), figsize=(6.5 * len(sizes), 8.6 if quality else 4.6),
                             squeeze=False, sharex="col")
    styles = {s: (f"C{i}", "-" if s.startswith("pcmoe") else "--") for i, s in enumerate(SYSTEMS)}
    by_experts = {m["experts"]: m for m in meta["models"]}
    for ax, experts in zip(axes[0], sizes):
        failed = []
        for s in SYSTEMS:
            pts = sorted(((r["limit_bytes"] / 1e9, r) for r in recs if r["experts"] == experts and r["system"] == s),
                         key=lambda p: p[0])
            good = [(x, r["decode_tokens_per_s"]) for x, r in pts if r.get("returncode") == 0
                    and r.get("decode_tokens_per_s")]
            color, ls = styles[s]
            if good:
                ax.plot(*zip(*good), ls, marker="o", color=color, label=s)
            failed += [(x, color) for x, r in pts if r.get("returncode") not in (0, None) and not too_small(r)]
        ys = [y for line in ax.get_lines() for y in line.get_ydata()]
        for x, color in failed:  # OOM / time-out / failure: a cross below the slowest point
            ax.scatter([x], [min(ys, default=1.0) / 2], marker="x", color=color)
        m = by_experts.get(experts, {})
        full = (m.get("sizes") or {}).get("full")
        for nbytes, text in ((full, " bf16 weights"), ((m.get("gguf_bytes") or {}).get("q4_K_M"), " q4_K_M GGUF")):
            if nbytes:
                ax.axvline(nbytes / 1e9, color="grey", lw=0.8, ls=":")
                ax.text(nbytes / 1e9, 0.98, text, rotation=90, va="top", fontsize=7, color="grey",
                        transform=ax.get_xaxis_transform())
        if quality:
            qa = axes[1][sizes.index(experts)]
            for s in SYSTEMS:
                pts = sorted((r["limit_bytes"] / 1e9, r["quality_ppl"]) for r in recs
                             if r["experts"] == experts and r["system"] == s and r.get("quality_ppl"))
                if pts:
                    qa.plot(*zip(*pts), styles[s][1], marker="o", color=styles[s][0], label=s)
            qa.set_yscale("log")
            qa.set_ylabel("perplexity of the trained LM at that configuration (log)")
            qa.set_xlabel("total memory limit (GB, cgroup: RSS + page cache)")
            qa.grid(alpha=0.3, which="both")
        ax.set_yscale("log")
        ax.set_xlabel("total memory limit (GB, cgroup: RSS + page cache)")
        ax.set_ylabel("decode tokens / s (log; x = OOM / failed)")
        ax.set_title(f"{experts} experts/layer, {format_bytes(full) if full else ''} bf16, baked routing", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    common.savefig(fig, out / "regime.png")
    plt.close(fig)
    return "regime.png"


def write_report(out: Path, results: list[dict], meta: dict) -> dict:
    name = plot(out, results, meta)
    atomic_write_text(out / "regime.json", json.dumps({"meta": meta, "ratios": ratios(results), "results": [
        {k: v for k, v in r.items() if k not in ("spec",)} for r in results]}, indent=1, default=str))
    atomic_write_text(out / "regime.md", markdown(results, meta, name))
    return {"results": results, "meta": meta}


# -- the command ---------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError("limits must be positive fractions of the bf16 checkpoint")
    return vals


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 2 for v in vals):
        raise argparse.ArgumentTypeError("experts per layer must be at least 2")
    return vals


def _systems(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in SYSTEMS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown system(s) {', '.join(bad) or '(none)'}; choose from "
                                         + ", ".join(SYSTEMS))
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pcmoe.bench.regime", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/bench/regime", help="output folder (default results/bench/regime)")
    p.add_argument("--experts", type=_ints, default=list(EXPERTS),
                   help="experts per layer of each checkpoint (default 32,80: 1.4 and 3.2 GB)")
    p.add_argument("--shape", default="mid", choices=("mid", "tiny"), help="checkpoint shape (tiny: a smoke test)")
    p.add_argument("--limits", dest="limit_fractions", type=_floats, default=list(LIMIT_FRACTIONS),
                   help="total memory limits as fractions of the bf16 checkpoint (default 1.15,0.6,0.45,0.33,0.25)")
    p.add_argument("--systems", type=_systems, default=list(SYSTEMS), help="comma-separated (default all): "
                   + ", ".join(SYSTEMS))
    p.add_argument("--source", default="models/pcmoe-lm", help="the trained model whose routing is baked in")
    p.add_argument("--data", help="held-out text (default <source>/eval/heldout.txt)")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens per generation (default 32)")
    p.add_argument("--prompts", type=int, default=2, help="prompts per round (default 2)")
    p.add_argument("--trials", type=int, default=2, help="timed rounds after one warm-up (median; default 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="32 experts at two limits (0.6, 0.33)")
    p.add_argument("--fresh", action="store_true", help="ignore the records of an earlier, interrupted study")
    p.add_argument("--no-quality", dest="quality", action="store_false",
                   help="do not measure each configuration's perplexity on the trained --source model")
    p.add_argument("--llamacpp-src", help="llama.cpp converter source (see pcmoe bench --help)")
    p.add_argument("--report-only", action="store_true", help="measure nothing: rewrite regime.md and regime.png "
                   "from <out>/regime.json")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.report_only:
        path = Path(args.out) / "regime.json"
        if not path.is_file():
            raise SystemExit(f"error: {path} does not exist; run the study first")
        data = json.loads(path.read_text())
        write_report(Path(args.out), data["results"], data["meta"])
        print(f"wrote {Path(args.out) / 'regime.md'}", file=sys.stderr)
        return 0
    if args.quick:
        if "--experts" not in argv:
            args.experts = [32]
        if "--limits" not in argv:
            args.limit_fractions = list(QUICK_LIMITS)
    args.data = args.data or str(Path(args.source) / "eval" / "heldout.txt")
    if not Path(args.data).is_file():
        raise SystemExit(f"error: held-out text {args.data} does not exist; pass --data FILE")
    if not (Path(args.source) / "config.json").is_file():
        raise SystemExit(f"error: {args.source} is not a checkpoint folder; pass --source DIR")
    for name, least in (("decode_tokens", 2), ("prompts", 1), ("trials", 1), ("threads", 1)):
        if getattr(args, name) < least:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least {least}")
    from pcmoe.system import check_writable

    why = check_writable(Path(args.out) / "regime.json")  # a bad --out fails now, not after hours
    if why:
        raise SystemExit(f"error: --out: {why}")
    args.command = shlex.join(["python", "-m", "pcmoe.bench.regime", *argv])
    from pcmoe.options import PcmoeError

    try:
        run_all(args)
    except PcmoeError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {Path(args.out) / 'regime.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
