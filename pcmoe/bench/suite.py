"""pcmoe bench: the paper's memory / quality / speed trade-off, with in-engine baselines and peers.

Every measurement is a fresh process (`pcmoe.bench.worker`) started with the checkpoint evicted
from the page cache and, where cgroup v1 is available, inside a memory limit of its weight bytes
plus the runtime overhead measured in a calibration run. Results are appended to
<out>/runs.jsonl as they come (an interrupted sweep resumes where it stopped), then summarised in
<out>/bench.json, <out>/bench.md and PNG plots.

    pcmoe bench --quick                   # minutes: a few budgets and policies, short evals
    pcmoe bench                           # the full sweep (an hour or more on 2 cores)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from pcmoe.budget import format_bytes

LM_POLICIES = ("committee", "random-keep", "magnitude-keep", "static-frequency", "on-demand")
FULL_BUDGETS = (30, 40, 50, 60, 75, 100)
QUICK_BUDGETS = (40, 60)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="models/pcmoe-lm", help="language model checkpoint")
    p.add_argument("--vision", default="models/pcmoe-vit", help="vision MoE checkpoint ('' to skip)")
    p.add_argument("--data", help="held-out documents (default: <model>/eval/heldout.txt)")
    p.add_argument("--profile", help="routing profile for static-frequency (default: <model>/profile.json)")
    p.add_argument("--out", default="results/bench", help="output folder (default results/bench)")
    p.add_argument("--quick", action="store_true", help="a few configurations and short evaluations")
    p.add_argument("--budgets", help="comma-separated %% of expert memory (default 30,40,50,60,75,100)")
    p.add_argument("--policies", help=f"comma-separated policies (default {','.join(LM_POLICIES)})")
    p.add_argument("--eval-tokens", type=int, help="held-out tokens per perplexity (default 8192; quick 1024)")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--prompts", type=int, default=3, help="prompts per decode measurement")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-cgroup", action="store_true", help="do not run inside cgroup memory limits")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: "
                                               "storage,quant,peers,llamacpp,vision,topk")
    p.add_argument("--fresh", action="store_true", help="ignore results of an earlier, interrupted sweep")
    p.add_argument("--llamacpp-src", help="llama.cpp converter source: a llama.cpp tree, an extracted llama-cpp-python "
                   "sdist (or a folder holding one) or its .tar.gz (default: $PCMOE_LLAMACPP_SRC, else the sdist "
                   "of the installed version is fetched with pip into the pcmoe cache)")
    p.add_argument("--gguf-dir", help="where converted GGUFs are cached (default data/llamacpp/gguf/<model name>/ "
                   "or $PCMOE_GGUF_DIR)")


# -- the plan of runs ----------------------------------------------------------------------------


def plan_runs(args, prompts) -> list[dict]:
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else (
        QUICK_BUDGETS if args.quick else FULL_BUDGETS)
    policies = args.policies.split(",") if args.policies else (
        ("committee", "magnitude-keep", "on-demand") if args.quick else LM_POLICIES)
    skip = set(filter(None, args.skip.split(",")))
    eval_tokens = args.eval_tokens or (1024 if args.quick else 8192)
    base = {"kind": "pcmoe", "model": args.model, "data": args.data, "eval_tokens": eval_tokens,
            "prompts": prompts, "decode_tokens": args.decode_tokens, "threads": args.threads}
    runs = [dict(base, label="full", section="lm", policy="full")]
    for b in budgets:
        for policy in policies:
            if b == 100 and policy != "committee":
                continue  # at 100 % every keep policy is the full model
            opts = {"profile": args.profile} if policy == "static-frequency" else {}
            if policy == "on-demand" or policy == "committee":
                opts["io_bandwidth"] = None
            runs.append(dict(base, label=f"{policy}@{b}%", section="lm", policy=policy, budget=f"{b}%experts",
                             expert_fraction=b / 100, options=opts))
    if "topk" not in skip:
        runs.append(dict(base, label="topk-reduce", section="lm", policy="topk-reduce"))
    if "storage" not in skip:
        for storage in ("nvme", "ufs", "emmc"):
            for policy in ("committee", "on-demand"):
                runs.append(dict(base, label=f"{policy}@50%/{storage}", section="storage", policy=policy,
                                 budget="50%experts", expert_fraction=0.5, options={"io_bandwidth": storage},
                                 eval_tokens=eval_tokens // 2, storage=storage))
    if "quant" not in skip:
        for q in ("int8", "int4"):
            runs.append(dict(base, label=f"full/{q}", section="quant", policy="full", options={"quantize": q}))
            for b in ((25,) if args.quick else (15, 25, 35)):
                runs.append(dict(base, label=f"committee/{q}@{b}%", section="quant", policy="committee",
                                 budget=f"{b}%experts", expert_fraction=b / 100, options={"quantize": q}))
    if "peers" not in skip:
        runs.append(dict(base, label="transformers", section="peers", kind="transformers",
                         eval_tokens=min(eval_tokens, 2048)))
        runs.append(dict(base, label="accelerate-offload@50%", section="peers", kind="accelerate",
                         expert_fraction=0.5, eval_tokens=min(eval_tokens, 512), prompts=prompts[:1],
                         decode_tokens=min(args.decode_tokens, 16)))
    if args.vision and Path(args.vision, "config.json").exists() and "vision" not in skip:
        frames = 300 if args.quick else 2000
        vbase = {"kind": "pcmoe", "model": args.vision, "vision": True, "frames": frames, "threads": args.threads,
                 "options": {"update_unit": "inputs", "update_every": 4}}
        runs.append(dict(vbase, label="vision full", section="vision", policy="full"))
        for b in budgets:
            for policy in ("committee", "random-keep", "magnitude-keep", "on-demand"):
                if b == 100:
                    continue
                runs.append(dict(vbase, label=f"vision {policy}@{b}%", section="vision", policy=policy,
                                 budget=f"{b}%experts", expert_fraction=b / 100))
    return runs


def _key(spec: dict) -> str:
    return hashlib.sha1(json.dumps({k: v for k, v in spec.items() if k != "prompts"}, sort_keys=True,
                                   default=str).encode()).hexdigest()[:12]


# -- running -------------------------------------------------------------------------------------


def _worker_cmd(spec: dict) -> list[str]:
    return [sys.executable, "-m", "pcmoe.bench.worker", json.dumps(spec)]


def run_one(spec: dict, limit: int | None, use_cgroup: bool) -> dict:
    t0 = time.perf_counter()
    if use_cgroup:
        from pcmoe.bench.cgroup import run_limited

        r = run_limited(_worker_cmd(spec), limit, timeout=7200)
        rc, stdout, stderr = r.returncode, r.stdout, r.stderr
        extra = {"cgroup_limit_bytes": limit, "cgroup_max_usage_bytes": r.max_usage_bytes,
                 "cgroup_failcnt": r.failcnt, "oom_killed": r.oom_killed}
    else:
        p = subprocess.run(_worker_cmd(spec), capture_output=True, text=True, timeout=7200)
        rc, stdout, stderr, extra = p.returncode, p.stdout, p.stderr, {}
    result = {"label": spec["label"], "section": spec["section"], "returncode": rc, "wall_s": time.perf_counter() - t0}
    result.update(extra)
    if rc == 0:
        result.update(json.loads(stdout.strip().splitlines()[-1]))
    else:
        result["error"] = (stderr.strip().splitlines() or ["(no output)"])[-1][:500]
    return result


def _model_sizes(model: str) -> dict:
    import pcmoe

    with pcmoe.load(model, policy="committee", budget="100%", progress=False) as engine:
        sizes = engine.sizes
        return {"nonexpert": sizes.nonexpert, "all_experts": sizes.all_experts, "full": sizes.full,
                "tokenizer": engine.tokenizer is not None}


def _weight_bytes(spec, sizes) -> int:
    """The weight bytes a run is allowed (its cgroup limit before the overhead allowance)."""
    if spec.get("kind") == "accelerate":
        return int(sizes["nonexpert"] + spec["expert_fraction"] * sizes["all_experts"])
    if spec.get("expert_fraction") is not None:
        return int(sizes["nonexpert"] + spec["expert_fraction"] * sizes["all_experts"])
    return sizes["full"]


def _prompts(model: str, data: str, n: int, length: int = 64) -> list[list[int]]:
    from transformers import AutoTokenizer

    from pcmoe.evaluate import read_documents

    tok = AutoTokenizer.from_pretrained(model)
    docs = read_documents(data)
    step = max(1, len(docs) // n)
    prompts = []
    for doc in docs[::step]:
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == n:
            break
    return prompts


def cmd_bench(args) -> int:
    from pcmoe.bench import cgroup

    model = Path(args.model)
    if not (model / "config.json").exists():
        raise SystemExit(f"error: {model} is not a checkpoint folder")
    args.data = args.data or str(model / "eval" / "heldout.txt")
    args.profile = args.profile or str(model / "profile.json")
    if not Path(args.data).exists():
        raise SystemExit(f"error: held-out data {args.data} does not exist; pass --data FILE.txt")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    use_cgroup = not args.no_cgroup and cgroup.available()
    sizes = _model_sizes(args.model)
    prompts = _prompts(args.model, args.data, args.prompts)
    runs = plan_runs(args, prompts)
    if not Path(args.profile).exists():
        runs = [r for r in runs if r.get("policy") != "static-frequency"]
    done = {}
    log = out / "runs.jsonl"
    if log.exists() and not args.fresh:
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("returncode") == 0:
                done[rec["key"]] = rec
    # Calibration: the runtime's own overhead (peak RSS minus resident weights), unlimited.
    overhead = None
    calib = next((r for r in done.values() if r["label"] == "calibration"), None)
    if use_cgroup and calib is None:
        spec = dict(runs[0], label="calibration", section="calibration", policy="committee", budget="50%experts",
                    expert_fraction=0.5)
        calib = run_one(spec, None, True)
        calib["key"] = "calibration"
        with open(log, "a") as f:
            f.write(json.dumps(calib) + "\n")
    if use_cgroup and calib and calib.get("returncode") == 0:
        overhead = int(calib["peak_rss_bytes"] - calib["resident_bytes"]) + (64 << 20)  # + allocator slack
    limits = f"on, overhead allowance {format_bytes(overhead)}" if overhead else "off"
    print(f"{len(runs)} runs; cgroup limits {limits}", file=sys.stderr)
    results = []
    for i, spec in enumerate(runs):
        key = _key(spec)
        if key in done:
            results.append(done[key])
            continue
        if spec["kind"] == "accelerate":
            spec["budget_bytes"] = _weight_bytes(spec, sizes)
        vision = spec.get("vision")
        limit = None
        if overhead and not vision:
            limit = _weight_bytes(spec, sizes) + overhead
        t0 = time.perf_counter()
        rec = run_one(spec, limit, use_cgroup and not vision)
        rec["key"] = key
        results.append(rec)
        with open(log, "a") as f:
            f.write(json.dumps(rec) + "\n")
        status = "ok" if rec["returncode"] == 0 else f"FAILED ({rec.get('error')})"
        print(f"[{i + 1}/{len(runs)}] {spec['label']:28s} {time.perf_counter() - t0:6.1f}s {status}", file=sys.stderr)
    if "llamacpp" not in args.skip and "peers" not in args.skip:
        from pcmoe.bench import llamacpp

        results.extend(llamacpp.run_all(args, sizes, overhead, use_cgroup, log, done))
    from pcmoe.bench.report import write_report

    meta = _meta(args, sizes, overhead, use_cgroup)
    report = write_report(out, results, meta)
    print(report)
    return 0


def _meta(args, sizes, overhead, use_cgroup) -> dict:
    import torch
    import transformers

    def run(cmd):
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"command": "pcmoe bench " + " ".join(sys.argv[2:]), "commit": run(["git", "rev-parse", "--short", "HEAD"]),
            "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu, "cores": _cores(), "threads": args.threads,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "model": args.model, "model_sizes": sizes, "overhead_allowance": overhead, "cgroup": use_cgroup,
            "data": args.data}


def _cores() -> int:
    import os

    return os.cpu_count() or 0
