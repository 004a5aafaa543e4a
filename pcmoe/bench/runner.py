"""Run one measurement in a fresh process: the one way the suite, the scaling study and the
llama.cpp peer start their workers.

The files the worker will read are dropped from the page cache first (a cold start: weights come
from the disk); where cgroup v1 is used, the worker runs inside a memory cgroup with the given
limit (pcmoe.bench.cgroup) and its peak charge is recorded. The worker prints its result as the
JSON object on the last line of its stdout. A failed, killed or timed-out worker is a record with
its return code and the last line of its stderr, never an exception.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable

from pcmoe.bench.common import weight_files
from pcmoe.system import evict_file

TIMEOUT_S = 7200
WORKER = "pcmoe.bench.worker"  # pcmoe, transformers and accelerate runs; llama.cpp has its own
# What identifies a measurement besides its spec: not the prompt ids, nor the run's bookkeeping.
KEY_IGNORES = ("prompts", "key", "skip")


def spec_key(spec: dict, prefix: str = "", ignore: Iterable[str] = ()) -> str:
    """A run's key in runs.jsonl: a hash of its spec (which holds the checkpoint's fingerprint)."""
    skip = set(KEY_IGNORES) | set(ignore)
    keep = {k: v for k, v in spec.items() if k not in skip}
    return prefix + hashlib.sha1(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]


def worker_cmd(module: str, spec: dict) -> list[str]:
    return [sys.executable, "-m", module, json.dumps(spec)]


def emit(result: dict, spec: dict, hide: Iterable[str] = ("prompts",)) -> int:
    """The worker's side: print the result, with its spec (less the bulky `hide` fields), as the
    JSON last line of stdout; 0 for the exit status."""
    result["spec"] = {k: v for k, v in spec.items() if k not in set(hide)}
    print(json.dumps(result), flush=True)
    return 0


def run_worker(cmd: list[str], limit: int | None = None, use_cgroup: bool = False, threads: int | None = None,
               timeout: float = TIMEOUT_S, evict: Iterable[str | os.PathLike] = (), cwd: str | None = None) -> dict:
    """Evict `evict`, run `cmd` (inside a memory cgroup of `limit` bytes when `use_cgroup`) and
    return {"returncode", "wall_s", cgroup figures, "timed_out"?} + its JSON result or "error"."""
    for path in evict:
        evict_file(path)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads or 1))
    t0 = time.perf_counter()
    out: dict = {}
    if use_cgroup:
        from pcmoe.bench.cgroup import run_limited

        r = run_limited(cmd, limit, env=env, timeout=timeout, cwd=cwd)
        rc, stdout, stderr, timed_out = r.returncode, r.stdout, r.stderr, r.timed_out
        out = {"cgroup_limit_bytes": limit, "cgroup_max_usage_bytes": r.max_usage_bytes,
               "cgroup_failcnt": r.failcnt, "oom_killed": r.oom_killed}
    else:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
            rc, stdout, stderr, timed_out = p.returncode, p.stdout, p.stderr, False
        except subprocess.TimeoutExpired:
            rc, stdout, stderr, timed_out = 124, "", f"timed out after {timeout:g} s", True
    out = {"returncode": rc, "wall_s": time.perf_counter() - t0, **out}
    if timed_out:
        out["timed_out"] = True
    if rc == 0:
        try:
            out.update(json.loads(stdout.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            out.update(returncode=1, error="the worker printed no JSON result")
    else:
        out["error"] = (stderr.strip().splitlines() or [f"(no output, exit {rc})"])[-1][:500]
    return out


def measure(spec: dict, limit: int | None = None, use_cgroup: bool = False, timeout: float = TIMEOUT_S,
            module: str = WORKER, evict: Iterable[str | os.PathLike] | None = None) -> dict:
    """Measure one spec in a fresh `module` process; the record of the run. `evict` defaults to
    the weight files of spec["model"] (nothing when spec["evict"] is false)."""
    if evict is None:
        evict = weight_files(spec["model"]) if spec.get("evict", True) and spec.get("model") else ()
    cmd = worker_cmd(module, {k: v for k, v in spec.items() if k not in ("key", "skip")})
    return record(spec, run_worker(cmd, limit, use_cgroup, spec.get("threads"), timeout, evict))


def record(spec: dict, result: dict, copy: Iterable[str] = ("mem_pct", "weight_bytes", "matched_to", "storage",
                                                            "key")) -> dict:
    """A run's record: its label, section, curve and the named fields of its spec, then `result`."""
    rec = {"label": spec["label"], "section": spec["section"], "curve": spec.get("curve")}
    rec.update({k: spec[k] for k in copy if k in spec})
    rec.update(result)
    return rec


def skipped(spec: dict, message: str) -> dict:
    """The record of a run that was not made, and why."""
    return record(spec, {"returncode": None, "skipped": message}, ("mem_pct", "weight_bytes", "matched_to", "key"))
