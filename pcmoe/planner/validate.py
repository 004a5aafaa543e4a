"""Run a plan for real and compare with what the planner predicted (`pcmoe plan --validate`).

The plan runs in a fresh worker (pcmoe.planner.worker) inside a cgroup v1 memory limit of the
plan's memory limit (its predicted memory when it has none), on the profile's own profiling
stream (what the quality model predicts) and then on the held-out stream (text: the odd
documents of the same file; vision: another frame-stream seed). Memory is the process's peak RSS
(VmHWM), which is what the planner predicts; the cgroup's peak charge (RSS and page cache charged
to the group, without shared library pages already cached) is reported beside it.
"""

from __future__ import annotations

import math

from pcmoe.budget import format_bytes
from pcmoe.planner.planning import Planner, config_of_plan, format_latency
from pcmoe.planner.space import PlanError


def streams_of(planner: Planner) -> tuple[dict, dict]:
    """(profiling stream, held-out stream) of the profile's calibration."""
    ident = (planner.data.get("calibration") or {}).get("ident") or {}
    stream = ident.get("stream")
    if not stream:
        raise PlanError("the device profile does not say which stream it was calibrated on; recalibrate it")
    from pcmoe.planner.calibrate import heldout_stream

    return stream, heldout_stream(stream)


def worker_spec(planner: Planner, model_dir: str, plan: dict | None, threads: int = 1, policy: str = "committee",
                heldout: bool = True, options: dict | None = None) -> dict:
    from pcmoe.planner.calibrate import DECODE_DEFAULTS

    stream, held = streams_of(planner)
    spec = {"model": str(model_dir), "plan": plan, "threads": threads, "policy": policy, "stream": stream,
            "options": options or {}}
    if stream["kind"] == "text":
        spec["decode"] = dict(DECODE_DEFAULTS)
    if heldout:
        spec["heldout"] = held
    return spec


def run_plan(planner: Planner, model_dir: str, plan: dict | None, limit: int | None, threads: int = 1,
             use_cgroup: bool | None = None, policy: str = "committee", heldout: bool = True,
             options: dict | None = None, timeout: float = 1800) -> dict:
    """The worker's record for `plan` (None: everything resident) run inside `limit` bytes."""
    from pcmoe.bench.cgroup import available
    from pcmoe.bench.common import weight_files
    from pcmoe.bench.runner import run_worker, worker_cmd

    cgroup = available() if use_cgroup is None else use_cgroup
    spec = worker_spec(planner, model_dir, plan, threads, policy, heldout, options)
    rec = run_worker(worker_cmd("pcmoe.planner.worker", spec), limit if cgroup else None, cgroup, threads,
                     timeout=timeout, evict=weight_files(model_dir))
    rec.pop("spec", None)
    return rec


def compare(planner: Planner, plan: dict, rec: dict, limit: int | None) -> dict:
    """Predicted vs measured memory, latency and quality; relative errors; limit violations."""
    predicted = plan.get("predicted") or planner.predict(config_of_plan(plan, planner.space))
    limits = plan.get("limits") or {}
    measured = {"memory_bytes": rec.get("peak_rss_bytes"), "cgroup_peak_bytes": rec.get("cgroup_max_usage_bytes"),
                "latency_s": rec.get("latency_s"), "loss": rec.get("loss"), "returncode": rec.get("returncode"),
                "error": rec.get("error"), "oom_killed": rec.get("oom_killed"),
                "cgroup_failcnt": rec.get("cgroup_failcnt"), "cpu_other_share": rec.get("cpu_other_share")}
    if rec.get("loss") is not None:
        measured["quality"] = planner.quality_value(rec["loss"])
    if rec.get("heldout"):
        measured["heldout_loss"] = rec["heldout"]["loss"]
        measured["heldout_quality"] = planner.quality_value(rec["heldout"]["loss"])
    reference = ((planner.data.get("latency") or {}).get("probe_s"))
    if reference and rec.get("probe_s") and rec.get("latency_s"):
        # The machine's speed during this run relative to the calibration's median (worker.speed_probe).
        measured["speed_factor"] = rec["probe_s"] / reference
        measured["latency_at_calibration_speed_s"] = rec["latency_s"] / measured["speed_factor"]
    # The plan reserves a KV cache for the profile's whole context; the run holds the calibration's
    # window. The memory error compares with what the model predicts for the run as it ran.
    predicted = dict(predicted)
    if predicted.get("memory_bytes"):
        from pcmoe.planner.calibrate import MEASURED_KV_TOKENS

        prof = planner.profile
        unheld = prof.kv_bytes_per_token * max(0, prof.context_tokens - MEASURED_KV_TOKENS)
        predicted["memory_bytes_at_run_context"] = predicted["memory_bytes"] - unheld
    errors = {}
    for key, pred in (("memory_bytes", "memory_bytes_at_run_context"), ("latency_s", "latency_s")):
        if predicted.get(pred) and measured.get(key):
            errors[key] = measured[key] / predicted[pred] - 1
    if predicted.get("memory_bytes") and measured.get("memory_bytes"):
        errors["memory_bytes_at_plan_context"] = measured["memory_bytes"] / predicted["memory_bytes"] - 1
    if predicted.get("latency_s") and measured.get("latency_at_calibration_speed_s"):
        errors["latency_at_calibration_speed"] = measured["latency_at_calibration_speed_s"] / predicted["latency_s"] - 1
    if measured.get("loss") is not None:
        q_pred, q_meas = planner.quality_value(predicted["loss"]), measured["quality"]
        errors["quality"] = q_meas / q_pred - 1 if q_pred else None
        errors["loss"] = measured["loss"] - predicted["loss"]
    violations = []
    if rec.get("returncode") != 0:
        violations.append("killed (out of memory)" if rec.get("oom_killed") else f"failed: {rec.get('error')}")
    memory_limit = limits.get("memory_bytes") or limit
    if memory_limit and measured["memory_bytes"] and measured["memory_bytes"] > memory_limit:
        violations.append(f"peak RSS {format_bytes(measured['memory_bytes'])} > limit {format_bytes(memory_limit)}")
    if limits.get("latency_s") and measured["latency_s"] and measured["latency_s"] > limits["latency_s"]:
        violations.append(f"latency {format_latency(measured['latency_s'])} > limit "
                          f"{format_latency(limits['latency_s'])}")
    return {"predicted": predicted, "measured": measured, "errors": errors, "violations": violations,
            "cgroup_limit_bytes": rec.get("cgroup_limit_bytes"), "limits": limits}


def validate(planner: Planner, model_dir: str, plan: dict, threads: int = 1, use_cgroup: bool | None = None) -> dict:
    limits = plan.get("limits") or {}
    predicted = plan.get("predicted") or planner.predict(config_of_plan(plan, planner.space))
    limit = limits.get("memory_bytes") or predicted["memory_bytes"]
    rec = run_plan(planner, model_dir, plan, int(math.ceil(limit)), threads, use_cgroup)
    return {**compare(planner, plan, rec, int(limit)), "record": rec}


def report_lines(planner: Planner, result: dict) -> list[str]:
    p, m, e = result["predicted"], result["measured"], result["errors"]

    def pct(key):
        return f" ({e[key]:+.1%})" if e.get(key) is not None else ""

    lines = [f"{'':10}{'predicted':>16}{'measured':>16}"]
    lines.append(f"{'memory':10}{format_bytes(p.get('memory_bytes')):>16}{format_bytes(m.get('memory_bytes')):>16}"
                 f"{pct('memory_bytes_at_plan_context')}  peak RSS; cgroup peak "
                 f"{format_bytes(m.get('cgroup_peak_bytes'))} under a limit of "
                 f"{format_bytes(result.get('cgroup_limit_bytes'))}")
    if p.get("memory_bytes_at_run_context") not in (None, p.get("memory_bytes")):
        lines.append(f"{'':10}{format_bytes(p['memory_bytes_at_run_context']):>16}{'':>16}{pct('memory_bytes')}  "
                     "predicted with the KV cache this run held (the plan reserves the whole context)")
    lines.append(f"{'latency':10}{format_latency(p.get('latency_s')):>16}{format_latency(m.get('latency_s')):>16}"
                 f"{pct('latency_s')}  per {'token' if planner.metric == 'log_ppl' else 'frame'}")
    if m.get("speed_factor"):
        lines.append(f"{'':10}{'':>16}{format_latency(m['latency_at_calibration_speed_s']):>16}"
                     f"{pct('latency_at_calibration_speed')}  at the calibration's machine speed (this run: "
                     f"{m['speed_factor']:.2f}x slower by the speed probe)")
    if m.get("loss") is not None:
        q = planner.quality_text
        lines.append(f"{'quality':10}{q(p['loss']):>16}{q(m['loss']):>16}{pct('quality')}  on the profiling stream")
    if m.get("heldout_loss") is not None:
        lines.append(f"{'':10}{'':>16}{planner.quality_text(m['heldout_loss']):>16}  on the held-out stream")
    if m.get("cpu_other_share") is not None and m["cpu_other_share"] > 0.15:
        lines.append(f"warning: other processes used {m['cpu_other_share']:.0%} of the CPU while this run was timed; "
                     "its latency is not a quiet machine's")
    lines.append("violations: " + ("; ".join(result["violations"]) if result["violations"] else "none"))
    return lines
