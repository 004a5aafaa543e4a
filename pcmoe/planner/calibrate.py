"""`pcmoe calibrate`: measure a model on this machine and write the planner's device profile.

Every measurement is a fresh worker process (pcmoe.planner.worker: cold page cache, --threads,
inside a memory cgroup without a limit where cgroup v1 is writable, so its peak charge is seen).

    load          one expert read from disk with the page cache evicted, and quantised into a slot
    imports:serve the RSS the server's imports add (fastapi, uvicorn, ...): --memory of `pcmoe serve`
    kv:short/long the same documents scored in windows of 128 and 1024 tokens: KV bytes per token
    latency:P:n   uniform configurations (every layer n experts at precision P, n in 1, N/2, N):
                  decode time inside each MoE block, in the step boundary and outside (non-expert)
    nonexpert:Q   every expert resident at full precision, the non-expert weights (attention, LM
                  head) at Q (int8, int4; lean-decoder families only): their bytes and time
    shadow:S:n    the twin of latency:P:n (P the most compressed precision, n in 1, N/2) with S shadows
                  (int2, int3) of every non-member: their runtime memory and decode time
    sample:i      random configurations (per-layer sizes and precisions, F, non-expert precision), seeded
    near:i        half as many again with every committee at least half its layer (where plans live)
    shadow-sample:i  half as many again with a shadow form drawn for each (where the model has shadows)

Every configuration measurement also scores the profiling stream (text: the even documents of
the data file, each cut to --doc-tokens; vision: a seeded frame stream) and reports peak RSS,
so each one is a quality sample, a memory sample and a latency sample. Results go into the
profile file as each finishes (atomic rewrite); a second run with the same arguments resumes.

Derived (`derive`, torch-free): bytes per expert per precision and staging buffers from the
loader's own accounting (pcmoe.loader.inspect); runtime bytes = the largest measured peak RSS
minus predicted weights minus the KV cache held, over the runs without a full-precision bank of
two or more slots, plus three standard deviations of those overheads (a margin for runs not seen),
plus the heap growth of the long runs (profiling then held-out stream) over their single-stream twins,
and full_gemm_bytes = how much more the largest of the other runs needed (their
multi-token steps run bf16 matmuls over varying token counts, which raised peak RSS by 20-65 MB
on the shipped LM, by an amount that varies from run to run; not torch's grouped GEMM: the per-slot
loop does the same, and capping oneDNN's primitive cache removes about a third of it); KV bytes
per token = the larger of the measured slope and the cache's own size; per-layer decode time
points; the committee-update cost per non-full layer, by F and precision, fitted on the residuals
of the samples timed on a quiet machine (the worker records the CPU share other processes used);
the quality model chosen on held-out samples, with both models' held-out errors.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import numpy as np

from pcmoe.planner.predict import PROFILE_FORMAT, DeviceProfile, LatencyModel, MemoryModel
from pcmoe.planner.quality import fit_quality, samples_from_dicts, split
from pcmoe.planner.space import NO_SHADOW, Config, PlanError, SearchSpace

VERSION = 3                      # of the measurement list; a profile of another version is not resumed
                                 # (2: the non-expert precision is measured and sampled; 3: shadows are)
KV_WINDOWS = (128, 1024)
MEASURED_KV_TOKENS = 256         # the KV cache capacity the configuration measurements hold (window 256, prompt 128)
TEXT_DEFAULTS = {"documents": "even", "doc_tokens": 512, "window": 256, "chunk": 32}
DECODE_DEFAULTS = {"prompts": 3, "prompt_tokens": 64, "tokens": 64, "trials": 3, "warmup": 1}
INTERVALS = {"tokens": (8, 16, 32), "inputs": (1, 2, 4)}
# The shadow forms a calibration measures (so the planner can choose them), of those the experts allow:
# version 3's two, then the vector-quantised forms below 2 bits (their samples come from streams of
# their own, so that version 3's measurements stay valid). int1 and vq8 are served, not planned
# (docs/results/shadow_forms.md: int1 loses to vq6 at fewer bytes' cost, vq8 ties int2).
V3_SHADOWS = ("int2", "int3")
PLANNED_SHADOWS = (*V3_SHADOWS, "vq6", "vq7")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def model_facts(model_dir: str) -> dict:
    """What the loader's own accounting says a configuration weighs (no weight is read)."""
    from pcmoe import qcache
    from pcmoe.checkpoint import read_config_dict
    from pcmoe.formats import read_model_options
    from pcmoe.loader import inspect

    info = {q or "full": inspect(model_dir, quantize=q) for q in (None, "int8", "int4")}
    full = info["full"]
    config = read_config_dict(Path(model_dir))
    L, N = full["moe_layers"], full["experts_per_layer"]
    options = read_model_options(model_dir)
    unit = options.get("update_unit", "tokens")
    kv = 0
    vision = config.get("model_type") == "pcmoe_vit_moe"
    if not vision:  # what the lean decoder's KV cache allocates per token: K and V of every layer
        heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}.get(full["dtype"], 4)
        kv = 2 * config["num_hidden_layers"] * heads * head_dim * itemsize
    planned = [f for f in PLANNED_SHADOWS if f in full["shadow_bytes"]]
    return {
        "model_type": full["model_type"], "num_experts": [N] * L, "vision": vision,
        "expert_bytes": {p: [info[p]["expert_bytes"]] * L for p in info},
        "nonexpert_bytes": {"full": full["nonexpert_bytes"], **full["nonexpert_bytes_quantized"]},
        # where the runtime can quantise them (the lean decoder): a planner dimension
        "nonexpert_precisions": ["full", *full["nonexpert_bytes_quantized"]] * bool(full["nonexpert_bytes_quantized"]),
        # shadows of the non-members (pcmoe.shadow), in the group-quantised forms the experts allow
        "shadow_modes": [NO_SHADOW, *planned] * bool(planned),
        "shadow_bytes": {f: [full["shadow_bytes"][f]] * L for f in planned},
        "n_buffers": full["swap_buffers"],
        # one staging buffer with every layer at a precision (quantised layers stage quantised bytes
        # when read from quantised copies, pcmoe.qcache; then no full-precision buffer per layer either)
        "staging_bytes": {p: info[p]["swap_buffer_bytes"] // max(info[p]["swap_buffers"], 1) for p in info},
        "quant_staging": 0 if qcache.enabled() else 1,
        "dtype": full["dtype"], "update_unit": unit, "default_interval": options.get("update_every", 16),
        "kv_bytes_per_token_cache": kv, "context_tokens": 0 if vision else config.get("max_position_embeddings", 0),
    }


def model_fingerprint(model_dir: str) -> str:
    """What the measurements depend on in the model folder, by content: the weights (as the engine
    identifies them) and the side files a load reads. Not the device profile itself, which is
    rewritten as the measurements go."""
    import contextlib
    import hashlib

    from pcmoe.checkpoint import Checkpoint

    folder = Path(model_dir)
    with contextlib.closing(Checkpoint(folder)) as ckpt:
        h = hashlib.sha1(ckpt.fingerprint().encode())
    for name in ("config.json", "pcmoe_options.json", "profile.json", "tokenizer.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            h.update(f"{name}:".encode() + hashlib.sha1((folder / name).read_bytes()).digest())
    return h.hexdigest()[:16]


def measurement_specs(model_dir: str, facts: dict, stream: dict, samples: int, seed: int, threads: int) -> list[dict]:
    """Every measurement of a calibration, in the order they run; each has a unique "key"."""
    L, N = len(facts["num_experts"]), facts["num_experts"][0]
    precisions = list(facts["expert_bytes"])
    intervals = INTERVALS[facts["update_unit"]]
    default_f = facts["default_interval"] if facts["default_interval"] in intervals else intervals[len(intervals) // 2]
    decode = None if facts["vision"] else dict(DECODE_DEFAULTS)
    base = {"model": str(model_dir), "threads": threads, "policy": "committee"}

    nonexpert = facts.get("nonexpert_precisions") or []
    shadows = facts.get("shadow_modes") or []

    def config_spec(key, sizes, precs, f, ne=None, shadow=None):
        options = {"update_every": int(f), "update_unit": facts["update_unit"]}
        plan = {"format": "pcmoe-plan/1", "model_type": facts["model_type"], "num_experts": facts["num_experts"],
                "committee_sizes": [int(n) for n in sizes], "precisions": list(precs), "options": options,
                "nonexpert_precision": ne or "full", **({"shadow": shadow} if shadow else {})}
        config = {"committee_sizes": list(map(int, sizes)), "expert_precisions": list(precs),
                  "update_every": int(f), "nonexpert_precision": (ne or "full") if nonexpert else None}
        if shadows:
            config["shadow"] = shadow or NO_SHADOW
        return {**base, "key": key, "plan": plan, "stream": stream, "decode": decode, "config": config}

    specs = [{**base, "key": "load", "load_timing": {"experts": 16}},
             {**base, "key": "imports:serve", "imports": ["pcmoe.server.api", "uvicorn"]}]
    if not facts["vision"]:
        for w in KV_WINDOWS:
            specs.append({**base, "key": f"kv:{w}", "stream": {**stream, "doc_tokens": max(KV_WINDOWS), "window": w}})
    for p in precisions:
        for n in sorted({1, N // 2, N}):
            specs.append(config_spec(f"latency:{p}:{n}", [n] * L, [p] * L, default_f))
    for q in nonexpert[1:]:
        specs.append(config_spec(f"nonexpert:{q}", [N] * L, [precisions[0]] * L, default_f, q))
    for form in shadows[1:]:
        for n in shadow_sizes(N):
            specs.append(config_spec(f"shadow:{form}:{n}", [n] * L, [precisions[-1]] * L, default_f, shadow=form))
    # Long runs: the profiling stream and then the held-out one (what --validate and a server run),
    # repeating a latency configuration; their peak over its single-stream peak is heap growth with
    # running time, which derive adds to runtime_bytes.
    held = heldout_stream(stream)
    for p, n in long_runs(precisions, N):
        specs.append({**config_spec(f"long:{p}:{n}", [n] * L, [p] * L, default_f), "heldout": held})
    rng = np.random.default_rng(seed)
    # the non-expert precision from streams of its own (one per kind of sample, so that more samples
    # extend the same list): the other genes stay those of version 1's samples
    ne_rng = {"sample": np.random.default_rng([seed, 2]), "near": np.random.default_rng([seed, 3])}

    def draw_nonexpert(kind):
        return nonexpert[int(ne_rng[kind].integers(0, len(nonexpert)))] if nonexpert else None

    for i in range(samples):
        sizes = rng.integers(1, N + 1, L)
        precs = [precisions[j] for j in rng.integers(0, len(precisions), L)]
        specs.append(config_spec(f"sample:{i}", sizes, precs, intervals[int(rng.integers(0, len(intervals)))],
                                 draw_nonexpert("sample")))
    # Plans live where quality is high: more samples with every committee at least half its layer.
    rng = np.random.default_rng([seed, 1])
    for i in range(samples // 2):
        sizes = rng.integers(N // 2, N + 1, L)
        precs = [precisions[j] for j in rng.integers(0, len(precisions), L)]
        specs.append(config_spec(f"near:{i}", sizes, precs, intervals[int(rng.integers(0, len(intervals)))],
                                 draw_nonexpert("near")))
    # With shadows: random configurations with a shadow form each (streams of their own again, so the
    # samples above are those of version 2), committees below their layer's size where shadows exist.
    first = [f for f in shadows[1:] if f in V3_SHADOWS]
    if first:
        rng, ne_rng["shadow"] = np.random.default_rng([seed, 4]), np.random.default_rng([seed, 5])
        for i in range(samples // 2):
            sizes = rng.integers(1, N, L) if N > 1 else np.ones(L, dtype=np.int64)
            precs = [precisions[j] for j in rng.integers(0, len(precisions), L)]
            f = intervals[int(rng.integers(0, len(intervals)))]
            form = first[int(rng.integers(0, len(first)))]
            specs.append(config_spec(f"shadow-sample:{i}", sizes, precs, f, draw_nonexpert("shadow"), form))
    for later in [f for f in shadows[1:] if f not in V3_SHADOWS]:   # a quarter as many per later form
        k = PLANNED_SHADOWS.index(later) if later in PLANNED_SHADOWS else len(PLANNED_SHADOWS)
        rng, ne_rng[later] = np.random.default_rng([seed, 6, k]), np.random.default_rng([seed, 7, k])
        for i in range(max(1, samples // 4)):
            sizes = rng.integers(1, N, L) if N > 1 else np.ones(L, dtype=np.int64)
            precs = [precisions[j] for j in rng.integers(0, len(precisions), L)]
            f = intervals[int(rng.integers(0, len(intervals)))]
            ne = nonexpert[int(ne_rng[later].integers(0, len(nonexpert)))] if nonexpert else None
            specs.append(config_spec(f"shadow-sample:{later}:{i}", sizes, precs, f, ne, later))
    return specs


def shadow_sizes(n: int) -> list[int]:
    """Committee sizes of the shadow:S:n runs: one member, and half the layer."""
    return sorted({1, max(1, n // 2)} - {n})


def run_calibration(model_dir: str, out: str, data: str | None = None, samples: int = 150, seed: int = 0,
                    threads: int = 1, frames: int = 1000, use_cgroup: bool | None = None, progress: bool = True,
                    doc_tokens: int | None = None, log=print) -> dict:
    """Measure what is missing from `out`, rewriting it after every measurement; the final profile."""
    from pcmoe.bench.cgroup import available
    from pcmoe.bench.common import weight_files
    from pcmoe.bench.runner import run_worker, worker_cmd

    facts = model_facts(model_dir)
    if facts["vision"]:
        stream = {"kind": "frames", "data": data, "frames": frames, "seed": 0}
    else:
        stream = {"kind": "text", "data": data or str(Path(model_dir) / "eval" / "heldout.txt"), **TEXT_DEFAULTS}
        if doc_tokens:
            stream["doc_tokens"] = doc_tokens
    specs = measurement_specs(model_dir, facts, stream, samples, seed, threads)
    ident = {"version": VERSION, "fingerprint": model_fingerprint(model_dir), "stream": stream, "seed": seed,
             "threads": threads, "cpu": cpu_name()}
    done: dict = {}
    path = Path(out)
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        if old.get("calibration", {}).get("ident") == ident:
            done = {k: v for k, v in old.get("measurements", {}).items() if v.get("returncode") == 0}
            log(f"resuming {path}: {len(done)} of {len(specs)} measurements already made")
        elif old:
            raise PlanError(f"{out} holds a profile measured with other settings (model, data, seed, threads or "
                            "machine); pass another --out or delete it to start again")
    cgroup = available() if use_cgroup is None else use_cgroup
    todo = [s for s in specs if s["key"] not in done]
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc="calibrate", unit="run", dynamic_ncols=True)
    evict = weight_files(model_dir)
    t_start = time.perf_counter()
    try:
        for spec in todo:
            worker_spec = {k: v for k, v in spec.items() if k not in ("key", "config")}
            rec = run_worker(worker_cmd("pcmoe.planner.worker", worker_spec), None, cgroup, threads,
                             timeout=1800, evict=evict)
            rec.pop("spec", None)
            if spec.get("config") is not None:
                rec["config"] = spec["config"]
            done[spec["key"]] = _compact(rec)
            if rec.get("returncode") != 0:
                log(f"warning: measurement {spec['key']} failed: {rec.get('error')}")
            _save(path, facts, ident, done, specs, complete=False)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    profile = _save(path, facts, ident, done, specs, complete=True, elapsed=time.perf_counter() - t_start)
    return profile


def rederive(model_dir: str, out: str) -> dict:
    """Recompute a profile's tables and fits from the measurements it stores, measuring nothing
    (`pcmoe calibrate --derive-only`): for a new version of the predictors. A changed runtime (its
    memory, its speed) needs new measurements: `pcmoe calibrate` again."""
    from pcmoe.system import atomic_write_text

    path = Path(out)
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PlanError(f"cannot read the device profile {out} ({e})") from None
    if not isinstance(old, dict) or not old.get("measurements"):
        raise PlanError(f"{out} stores no measurements to derive a profile from; run `pcmoe calibrate`")
    calibration = old.get("calibration") or {}
    if calibration.get("ident", {}).get("fingerprint") not in (None, model_fingerprint(model_dir)):
        raise PlanError(f"{out} was measured on other weights than {model_dir}; run `pcmoe calibrate` again")
    profile = derive(model_facts(model_dir), old["measurements"], fit=bool(calibration.get("complete", True)))
    profile["calibration"] = calibration
    profile["measurements"] = old["measurements"]
    atomic_write_text(path, json.dumps(profile, indent=None, separators=(",", ":")))
    return profile


QUALITY_ONLY = "quality:"


def import_quality(out: str, source: str, tolerance: float = 1e-3) -> int:
    """Add the random samples' losses of an earlier profile `source` of the same model and stream to
    `out` as quality-only measurements ("quality:<key>"), then re-derive `out`. Losses do not depend
    on the runtime's memory or speed, so samples of a calibration made before a runtime change stay
    valid where the two calibrations measured the same configuration alike: every key both hold
    must agree within `tolerance` (loss units), else nothing is imported. Returns how many were added."""
    from pcmoe.system import atomic_write_text

    new, old = (json.loads(Path(p).read_text()) for p in (out, source))
    a, b = new.get("measurements") or {}, old.get("measurements") or {}
    if (new.get("calibration") or {}).get("ident", {}).get("stream") != \
            (old.get("calibration") or {}).get("ident", {}).get("stream"):
        raise PlanError(f"{source} was scored on another stream than {out}; its losses are not comparable")
    def same(x, y):   # the same configuration (null non-expert precision = full)
        def norm(c):
            return {**c, "nonexpert_precision": c.get("nonexpert_precision") or "full"}
        return bool(x.get("config")) and bool(y.get("config")) and norm(x["config"]) == norm(y["config"])

    shared = [k for k in a if k in b and "loss" in a[k] and "loss" in b[k] and same(a[k], b[k])]
    worst = max((abs(a[k]["loss"] - b[k]["loss"]) for k in shared), default=None)
    if worst is None:
        raise PlanError(f"{source} and {out} share no scored configuration to compare; not importing")
    if worst > tolerance:
        raise PlanError(f"{source} and {out} share {len(shared)} scored configurations and disagree by up to "
                        f"{worst:.3g} in loss; not importing")
    added = 0
    for k, r in b.items():
        if k.startswith(("sample:", "near:")) and _ok(r) and "loss" in r and k not in a:
            a[QUALITY_ONLY + k] = {"returncode": 0, "config": r["config"], "loss": r["loss"], "imported_from": source}
            added += 1
    new["measurements"] = a
    atomic_write_text(Path(out), json.dumps(new, indent=None, separators=(",", ":")))
    return added


def _compact(rec: dict) -> dict:
    drop = ("read_s_all",)
    if "expert_load" in rec:
        rec["expert_load"] = {k: v for k, v in rec["expert_load"].items() if k not in drop}
    return rec


def _save(path: Path, facts: dict, ident: dict, done: dict, specs: list[dict], complete: bool,
          elapsed: float | None = None) -> dict:
    from pcmoe.system import atomic_write_text

    missing = [s["key"] for s in specs if s["key"] not in done or done[s["key"]].get("returncode") != 0]
    finished = complete and not missing
    profile = derive(facts, done, fit=finished)
    profile["calibration"] = {"ident": ident, "complete": finished, "missing": missing,
                              "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                              **({"seconds": round(elapsed, 1)} if elapsed is not None else {})}
    profile["measurements"] = done
    atomic_write_text(path, json.dumps(profile, indent=None, separators=(",", ":")))
    return profile


# -- derivation (torch-free except fitting the MLP) ----------------------------------------------------------


def _ok(rec: dict | None) -> bool:
    return rec is not None and rec.get("returncode") == 0


def derive(facts: dict, done: dict, fit: bool = True) -> dict:
    """The device profile from the measurements made so far (partial ones give partial tables)."""
    precisions = list(facts["expert_bytes"])
    unit = facts["update_unit"]
    profile = {"format": PROFILE_FORMAT, "model_type": facts["model_type"], "num_experts": facts["num_experts"],
               "precisions": precisions, "intervals": list(INTERVALS[unit]), "update_unit": unit,
               "expert_bytes": facts["expert_bytes"], "nonexpert_bytes": facts["nonexpert_bytes"],
               "nonexpert_precisions": facts.get("nonexpert_precisions") or [],
               "shadow_bytes": facts.get("shadow_bytes") or {},
               "full_precision": "full", "n_buffers": facts["n_buffers"], "spare_slots": 0,
               "staging_bytes": facts["staging_bytes"], "quant_staging": facts.get("quant_staging", 1),
               "context_tokens": facts["context_tokens"], "machine": {"cpu": cpu_name(), "threads": None}}
    # The shadow gene exists once its forms' memory and time are measured (shadow:S:n and their twins).
    forms = measured_shadow_forms(facts, done)
    profile["shadow_modes"] = [NO_SHADOW, *forms] if forms else []
    space = SearchSpace(num_experts=tuple(facts["num_experts"]), precisions=tuple(precisions),
                        intervals=tuple(INTERVALS[unit]),
                        nonexpert_precisions=tuple(facts.get("nonexpert_precisions") or ()),
                        shadow_modes=tuple(profile["shadow_modes"]))
    # long runs repeat a latency configuration: only their peak RSS is used (long_run_growth)
    scored = {k: r for k, r in done.items() if _ok(r) and r.get("config") and "loss" in r and not k.startswith("long:")
              and r["config"].get("shadow") in (None, NO_SHADOW, *forms)}
    # "quality:" records carry a loss alone (imported from an earlier calibration, see import_quality):
    # quality samples, never memory or latency samples.
    configs = {k: r for k, r in scored.items() if not k.startswith(QUALITY_ONLY)}

    # KV cache: the slope of peak RSS between the two windows, never below what the cache allocates.
    kv = facts["kv_bytes_per_token_cache"]
    short, long = done.get(f"kv:{KV_WINDOWS[0]}"), done.get(f"kv:{KV_WINDOWS[1]}")
    kv_measured = None
    if _ok(short) and _ok(long):
        kv_measured = (long["peak_rss_bytes"] - short["peak_rss_bytes"]) / (KV_WINDOWS[1] - KV_WINDOWS[0])
        kv = max(kv, int(math.ceil(kv_measured)))
    profile["kv_bytes_per_token"] = kv

    # Runtime bytes: the largest measured peak RSS beyond the predicted weights and the KV cache held, apart
    # for runs where a full-precision bank of >= 2 slots computes multi-token steps (bf16 matmul workspaces).
    weights_only = DeviceProfile.from_dict({**profile, "runtime_bytes": 0, "kv_bytes_per_token": 0,
                                            "context_tokens": 0, "full_gemm_bytes": 1})
    mem = MemoryModel(space, weights_only)
    held_kv = 0 if facts["vision"] else kv * MEASURED_KV_TOKENS
    overhead, gemm, cg_ratio = [], [], []
    if configs:
        batch = space.encode([Config.from_dict(r["config"], space) for r in configs.values()])
        weights = mem(batch)
        layers = np.arange(space.layers)
        gemm = list(mem.gemm_cells[layers, batch.prec, batch.sizes - 1].any(axis=1))
        for r, w, g in zip(configs.values(), weights, gemm):
            overhead.append(r["peak_rss_bytes"] - (w - g) - held_kv)
            if r.get("cgroup_max_usage_bytes"):
                cg_ratio.append(r["cgroup_max_usage_bytes"] / r["peak_rss_bytes"])
        # Shadows need memory beyond their bytes (the native kernel's scratch, a dequantised expert for
        # longer prefills, the reads of demoted members' shadows): measured against the twin without
        # (first: the non-expert offsets below compare runs with and without shadows).
        shadow_deltas = _shadow_runtime_deltas(space, list(configs), overhead)
        if shadow_deltas:
            profile["shadow_runtime_bytes"] = shadow_deltas
            swapping = batch.sizes < np.array(space.num_experts)                           # [P, L]
            overhead = [o - max([shadow_deltas.get(space.shadow_modes[int(j)], 0) for j, s in zip(forms, sw)
                                 if s and j > 0], default=0)
                        for o, forms, sw in zip(overhead, batch.shadow, swapping)]
        # The runtime's own memory depends on the non-expert precision (on the shipped LM, runs with
        # int8 / int4 non-expert weights need 5-12 MB less beyond their bytes than full ones: the
        # quantised head returns bf16 logits): measured per precision, as an offset from full.
        deltas = _nonexpert_runtime_deltas(space, batch, overhead, gemm)
        if deltas:
            profile["nonexpert_runtime_bytes"] = deltas
            keys = space.nonexpert_precisions
            overhead = [o - deltas.get(keys[int(i)], 0) for o, i in zip(overhead, batch.nonexpert)]
    if overhead:
        plain = [o for o, g in zip(overhead, gemm) if not g] or overhead
        with_gemm = [o for o, g in zip(overhead, gemm) if g]
        # Margin: a run the calibration did not see can need a little more than the largest it saw
        # (a vision plan at its limit peaked 0.55 MB above the maximum of 33 runs, sd 0.34 MB).
        margin = int(MARGIN_SD * np.std(plain))
        growth = long_run_growth(done)
        profile["runtime_bytes"] = int(max(plain)) + margin + growth
        profile["full_gemm_bytes"] = int(max(0, max(with_gemm) - max(plain))) if with_gemm else 0

        def spread(values):
            return {"runs": len(values), "max": int(max(values)), "mean": int(np.mean(values)),
                    "min": int(min(values)), "sd": int(np.std(values))} if values else None

        profile["memory_fit"] = {"samples": len(overhead), "runtime_bytes_max": int(max(plain)), "margin_bytes": margin,
                                 "long_run_bytes": growth,
                                 "runtime_bytes_mean": int(np.mean(plain)), "runtime_bytes_min": int(min(plain)),
                                 "runtime_bytes_sd": int(np.std(plain)), "without_full_gemm": spread(plain),
                                 "with_full_gemm": spread(with_gemm),
                                 "kv_bytes_per_token_measured": kv_measured,
                                 "kv_bytes_per_token_cache": facts["kv_bytes_per_token_cache"],
                                 "kv_tokens_in_measurements": 0 if facts["vision"] else MEASURED_KV_TOKENS,
                                 "cgroup_peak_over_rss_max": max(cg_ratio) if cg_ratio else None}
    else:
        profile["runtime_bytes"] = 0
    if _ok(done.get("imports:serve")):
        profile["frontend_bytes"] = {"serve": int(done["imports:serve"]["import_rss_bytes"])}
    if _ok(done.get("load")):
        profile["expert_load"] = done["load"]["expert_load"]
    speed, speed_source = _speed_factors(space, configs)
    timed = {k: _at_speed(r, speed.get(k, 1.0)) for k, r in configs.items()}
    raw_latency = _latency(facts, configs, configs, space, profile)
    profile["latency"] = _latency(facts, timed, timed, space, profile) if speed else raw_latency
    latency_fit = None
    if fit and speed and raw_latency.get("layer_points"):
        # Keep the speed correction only where it predicts held-out runs better: a probe too short for
        # the run it brackets (bursty contention) can add more noise than it removes.
        corrected = _latency_errors(space, profile, timed)
        raw = _latency_errors(space, {**profile, "latency": raw_latency}, configs)
        used = bool(corrected) and (not raw or corrected["heldout"]["mae"] <= raw["heldout"]["mae"])
        latency_fit = {**(corrected if used else raw), "raw": raw, "corrected": corrected,
                       "speed": {**_speed_summary(speed, speed_source), "used": used}}
        if not used:
            profile["latency"], timed = raw_latency, configs
    probes = [r["probe_s"] for r in configs.values() if r.get("probe_s")]
    if speed_source == "probe" and profile["latency"] and timed is not configs:   # what validate.py divides by
        profile["latency"]["probe_s"] = float(np.median(probes))
    if configs:
        profile["quality_samples"] = [{"config": r["config"], "loss": r["loss"], "latency_s": r.get("latency_s"),
                                       "peak_rss_bytes": r.get("peak_rss_bytes"), "key": k} for k, r in scored.items()]
        full_key = f"latency:full:{facts['num_experts'][0]}"
        metric = "error_rate" if facts["vision"] else "log_ppl"
        profile["quality"] = {"metric": metric, "full_loss": configs[full_key]["loss"] if full_key in configs else None}
        if fit and len(scored) >= 8:
            samples = samples_from_dicts(profile["quality_samples"], space)
            q = fit_quality(space, samples)
            profile["quality"].update(model=q.name, heldout=q.heldout, n_train=q.n_train, n_heldout=q.n_heldout)
            if "latency" in profile and profile["latency"].get("layer_points"):
                profile["latency_fit"] = latency_fit or {**_latency_errors(space, profile, configs),
                                                         "speed": _speed_summary(speed, speed_source)}
    return profile


def measured_shadow_forms(facts: dict, done: dict) -> list[str]:
    """The shadow forms whose shadow:S:n runs and their twins (latency:P:n, P the most compressed
    precision) have all been measured."""
    N, last = facts["num_experts"][0], list(facts["expert_bytes"])[-1]
    return [f for f in (facts.get("shadow_modes") or [])[1:]
            if all(_ok(done.get(f"shadow:{f}:{n}")) and _ok(done.get(f"latency:{last}:{n}")) for n in shadow_sizes(N))]


def _shadow_runtime_deltas(space: SearchSpace, keys: list[str], overhead: list) -> dict[str, int]:
    """Per shadow form: the largest overhead of its shadow:S:n runs over that of their twins without
    shadows (either sign: the shadows' memory beyond their bytes)."""
    at = dict(zip(keys, overhead))
    out = {}
    for form in space.shadow_modes[1:]:
        twins = {k: f"latency:{space.precisions[-1]}:{k.rsplit(':', 1)[1]}" for k in keys
                 if k.startswith(f"shadow:{form}:")}
        diffs = [at[k] - at[twin] for k, twin in twins.items() if twin in at]
        if diffs:
            out[form] = int(max(diffs))
    return out


MIN_RUNS_PER_PRECISION = 3   # plain runs at a non-expert precision (and at full) before its offset is trusted


def _nonexpert_runtime_deltas(space: SearchSpace, batch, overhead: list, gemm: list) -> dict[str, int]:
    """Per quantised non-expert precision q: max overhead of the plain runs (no full-precision bank of
    >= 2 slots) at q minus that at full, where both have MIN_RUNS_PER_PRECISION runs; never above 0
    (a larger need stays in runtime_bytes, which is the full precision's)."""
    if len(space.nonexpert_precisions) < 2:
        return {}
    plain = {}
    for o, g, i in zip(overhead, gemm, batch.nonexpert):
        if not g:
            plain.setdefault(int(i), []).append(o)
    if len(plain.get(0, [])) < MIN_RUNS_PER_PRECISION:
        return {}
    return {q: int(min(0, max(plain[j]) - max(plain[0]))) for j, q in enumerate(space.nonexpert_precisions)
            if j and len(plain.get(j, [])) >= MIN_RUNS_PER_PRECISION}


def _latency(facts: dict, done: dict, configs: dict, space: SearchSpace, profile: dict) -> dict:
    """Per-layer decode-time points of the uniform configurations, non-expert time, update cost."""
    points, nonexpert = [], []
    for key, r in done.items():
        if not (_ok(r) and key.startswith("latency:") and r.get("layer_s")):
            continue
        _, p, n = key.split(":")
        points.append({"layer": None, "size": int(n), "precision": p,
                       "seconds": float(np.mean(r["layer_s"]))})
        # Non-expert time from the full committees: nothing swaps there, so nothing else is left over.
        nonexpert.append((int(n) >= max(space.num_experts), r["latency_s"] - sum(r["layer_s"]) - r.get("step_s", 0.0)))
    if not points:
        return {}
    outside = [t for full, t in nonexpert if full] or [t for _, t in nonexpert]
    lat = {"nonexpert_s": {"full": float(max(np.median(outside), 0.0))}, "layer_points": points, "update_s": {}}
    for q in space.nonexpert_precisions[1:]:   # the same full committees with the non-expert weights at q
        r = done.get(f"nonexpert:{q}")
        if _ok(r) and r.get("layer_s"):
            lat["nonexpert_s"][q] = float(max(r["latency_s"] - sum(r["layer_s"]) - r.get("step_s", 0.0), 0.0))
    N = max(space.num_experts)
    for form in space.shadow_modes[1:]:   # per layer and token, per share of the layer's experts shadowed
        extra = []
        for n in shadow_sizes(N):
            r, twin = done.get(f"shadow:{form}:{n}"), done.get(f"latency:{space.precisions[-1]}:{n}")
            if _ok(r) and _ok(twin) and r.get("latency_s") and twin.get("latency_s"):
                extra.append((r["latency_s"] - twin["latency_s"]) / (space.layers * (N - n) / N))
        if extra:
            lat.setdefault("shadow_s", {})[form] = float(max(np.mean(extra), 0.0))
    if set(space.precisions) <= {p["precision"] for p in points} and \
            set(space.nonexpert_precisions) <= set(lat["nonexpert_s"]) and \
            set(space.shadow_modes[1:]) <= set(lat.get("shadow_s", {})):
        lat["update_s"] = _update_costs(space, {**profile, "latency": lat}, _sample_rows(space, configs))
    return lat


def _speed_features(space: SearchSpace, r: dict) -> list[float]:
    """What a run's time depends on in its configuration: layers by precision, full or not, the
    members of the non-full ones, and the non-full layers by F (a linear model's features)."""
    c = Config.from_dict(r["config"], space)
    N = space.num_experts
    f = [1.0]
    for p in space.precisions:
        full = [n == N[i] and q == p for i, (n, q) in enumerate(zip(c.sizes, c.precisions))]
        part = [n < N[i] and q == p for i, (n, q) in enumerate(zip(c.sizes, c.precisions))]
        f += [sum(full), sum(part), sum(n / N[i] for i, (n, ok) in enumerate(zip(c.sizes, part)) if ok)]
    nonfull = sum(n < N[i] for i, n in enumerate(c.sizes))
    forms = c.layer_shadows(space.layers)
    return (f + [nonfull * (c.interval == F) for F in space.intervals]
            + [float(c.nonexpert_precision == q) for q in space.nonexpert_precisions[1:]]
            + [sum((N[i] - n) / N[i] for i, n in enumerate(c.sizes) if forms[i] == form)
               for form in space.shadow_modes[1:]])


def _speed_factors(space: SearchSpace, configs: dict) -> tuple[dict[str, float], str | None]:
    """How much slower than usual the machine ran during each measurement (1.0 = the median run).

    The machine's speed drifts between measurements by more than the configurations differ (on the
    shipped LM's committed profile, prefill time / its prediction from the configuration spans 0.76 ..
    1.31, p5 .. p95, while the worker saw other processes use ~0 % of the CPU: the drift is invisible
    to cpu_other_share, e.g. a shared host). A run's own reference work tells its speed: the worker's
    speed probe (a fixed matrix-vector loop timed around the decode trials) when every run has one,
    else the run's prefill time over what the configuration predicts for it (text only). Decode times
    are divided by the factor before anything is fitted, so the latency model predicts the median
    machine; a plan's validation applies its own run's factor (validate.py)."""
    keys = [k for k, r in configs.items() if r.get("latency_s")]
    if len(keys) < 8:
        return {}, None
    probes = [configs[k].get("probe_s") for k in keys]
    if all(p for p in probes):
        ref = float(np.median(probes))
        return {k: p / ref for k, p in zip(keys, probes)}, "probe"
    pre = [configs[k].get("prefill_tokens_per_s") for k in keys]
    if not all(pre):
        return {}, None
    x = np.array([_speed_features(space, configs[k]) for k in keys])                          # [R, D]
    y = 1.0 / np.array(pre)                                                                  # [R] s per token
    fit = x @ np.linalg.lstsq(x, y, rcond=None)[0]
    ratio = y / np.where(fit > 0, fit, np.nan)
    ratio = np.where(np.isfinite(ratio) & (ratio > 0), ratio, 1.0)
    return {k: float(v) for k, v in zip(keys, ratio / np.median(ratio))}, "prefill"


def _at_speed(r: dict, factor: float) -> dict:
    """A measurement's decode times as on the median machine (see _speed_factors)."""
    if factor == 1.0 or not r.get("latency_s"):
        return r
    out = {**r, "latency_s": r["latency_s"] / factor, "speed_factor": factor}
    if r.get("layer_s"):
        out["layer_s"] = [t / factor for t in r["layer_s"]]
    if r.get("step_s") is not None:
        out["step_s"] = r["step_s"] / factor
    return out


def _speed_summary(speed: dict[str, float], source: str | None) -> dict:
    if not speed:
        return {"source": None}
    v = np.array(list(speed.values()))
    return {"source": source, "runs": len(v), "p5": float(np.percentile(v, 5)), "p95": float(np.percentile(v, 95)),
            "min": float(v.min()), "max": float(v.max())}


def heldout_stream(stream: dict) -> dict:
    """The held-out twin of a profiling stream: the odd documents of the same text, or the next
    seed of the frame stream."""
    return {**stream, "documents": "odd"} if stream["kind"] == "text" else {**stream, "seed": stream["seed"] + 1}


def long_runs(precisions: list[str], n: int) -> list[tuple[str, int]]:
    """(precision, committee size) of the long runs: everything resident, and the most compressed
    precision at half the experts (swapping, where the heap churns most)."""
    return [(precisions[0], n)] + ([(precisions[-1], max(1, n // 2))] if len(precisions) > 1 or n > 1 else [])


def long_run_growth(done: dict) -> int:
    """The largest peak-RSS growth of a long run over its configuration's single-stream run (0 if none)."""
    growth = 0
    for key, r in done.items():
        short = done.get("latency:" + key[len("long:"):]) if key.startswith("long:") else None
        if _ok(r) and _ok(short) and r.get("peak_rss_bytes") and short.get("peak_rss_bytes"):
            growth = max(growth, int(r["peak_rss_bytes"] - short["peak_rss_bytes"]))
    return growth


MARGIN_SD = 3   # runtime_bytes = the largest overhead measured + this many standard deviations of them

QUIET = 0.15   # a latency sample counts when other processes used at most this share of the CPU while it was timed


def _sample_rows(space: SearchSpace, configs: dict, quiet_only: bool = True) -> list[tuple[Config, float]]:
    """(config, latency) of the random samples, those timed on a quiet machine when there are enough."""
    rows = [(Config.from_dict(r["config"], space), r["latency_s"], r.get("cpu_other_share"))
            for k, r in configs.items() if k.startswith(("sample:", "near:")) and r.get("latency_s")]
    quiet = [(c, t) for c, t, other in rows if other is not None and other <= QUIET]
    return quiet if quiet_only and len(quiet) >= 10 else [(c, t) for c, t, _ in rows]


def _update_costs(space: SearchSpace, profile: dict, rows: list) -> dict[str, dict[str, float]]:
    """Seconds per token per non-full layer, by F and precision: least squares (through 0, clamped at
    0) on what the layers and the non-expert time leave of the measured latency (update work, swaps
    switched in and quantised on the compute thread, I/O thread contention)."""
    out = {}
    if not rows:
        return out
    model = LatencyModel(space, DeviceProfile.from_dict({**profile, "latency": {**profile["latency"],
                                                                                 "update_s": {}}}))
    batch = space.encode([c for c, _ in rows])
    resid = np.array([t for _, t in rows]) - model(batch)
    nonfull = batch.sizes < np.array(space.num_experts)                                  # [R, L]
    counts = np.stack([(nonfull & (batch.prec == p)).sum(axis=1) for p in range(len(space.precisions))], axis=1)
    for f_idx, f in enumerate(space.intervals):
        m = batch.interval == f_idx
        if not m.any():
            continue
        x, y = counts[m].astype(float), resid[m]
        keep = np.ones(x.shape[1], dtype=bool)
        for _ in range(x.shape[1]):   # drop precisions whose cost came out negative, refit the rest
            u = np.zeros(x.shape[1])
            if keep.any():
                u[keep] = np.linalg.lstsq(x[:, keep], y, rcond=None)[0]
            if (u >= 0).all():
                break
            keep &= u > 0
        out[str(f)] = {p: max(float(u[i]), 0.0) for i, p in enumerate(space.precisions)}
    return out


def _latency_errors(space: SearchSpace, profile: dict, configs: dict) -> dict:
    """The latency model's relative error on random samples it did not see: the update costs refitted
    on a seeded 75 % of the samples, errors on the other 25 % (and, for reference, on all)."""
    rows = _sample_rows(space, configs)
    if len(rows) < 8:
        return {}
    train, test = split(len(rows), 0.25, 0)

    def rel_errors(prof, idx):
        model = LatencyModel(space, DeviceProfile.from_dict(prof))
        batch = space.encode([rows[i][0] for i in idx])
        rel = model(batch) / np.array([rows[i][1] for i in idx]) - 1
        return {"mean": float(rel.mean()), "mae": float(np.abs(rel).mean()), "max": float(np.abs(rel).max())}

    held = {**profile, "latency": {**profile["latency"],
                                   "update_s": _update_costs(space, profile, [rows[i] for i in train])}}
    return {"samples": len(rows), "samples_timed": len(_sample_rows(space, configs, quiet_only=False)),
            "n_heldout": len(test), "heldout": rel_errors(held, test), "all": rel_errors(profile, range(len(rows)))}


def summary(profile: dict) -> list[str]:
    """What a calibration found, in a few lines."""
    from pcmoe.budget import format_bytes

    lines = [f"runtime {format_bytes(profile.get('runtime_bytes'))}, KV {profile.get('kv_bytes_per_token')} B/token, "
             f"{len(profile.get('quality_samples', []))} quality samples"]
    q = profile.get("quality", {})
    if q.get("heldout"):
        errs = ", ".join(f"{k} rmse {v['rmse']:.4f}" for k, v in q["heldout"].items())
        lines.append(f"quality model {q['model']} (held-out {errs} in {q['metric']})")
    lf = profile.get("latency_fit", {})
    if lf:
        lines.append(f"latency model: mean abs error {lf['heldout']['mae']:.1%} on {lf['n_heldout']} held-out samples "
                     f"(max {lf['heldout']['max']:.1%})")
        speed = lf.get("speed") or {}
        if speed.get("source") and lf.get("raw") and lf.get("corrected"):
            lines.append(f"  runs' speed by {speed['source']} spans {speed['p5']:.2f} .. {speed['p95']:.2f}x "
                         f"(p5 .. p95); held-out error {lf['corrected']['heldout']['mae']:.1%} with the correction, "
                         f"{lf['raw']['heldout']['mae']:.1%} without: "
                         f"{'corrected' if speed.get('used') else 'uncorrected'} model kept")
    mf = profile.get("memory_fit", {})
    if mf:
        lines.append(f"runtime bytes over {mf['samples']} runs: {format_bytes(mf['runtime_bytes_min'])} .. "
                     f"{format_bytes(mf['runtime_bytes_max'])} (sd {format_bytes(mf['runtime_bytes_sd'])})")
    return lines
