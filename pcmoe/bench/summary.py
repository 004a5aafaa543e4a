"""What the benchmark runs say, computed: the memory a run holds, the headline targets, quantised
setups against the committee at matched memory, the achieved cold read rate and the effect of the
emulated storage profiles. Read by the reports (pcmoe.bench.report) and the plots (pcmoe.bench.plots).

Memory axis: the weight bytes a setup holds or is allowed to hold, without the runtime's own
overhead — pcmoe: its resident weights (non-experts + expert slots); transformers and accelerate:
the parameter bytes in RAM after loading; llama.cpp resident: the GGUF's bytes; llama.cpp
memory-mapped: its cgroup limit minus its measured runtime overhead.
"""

from __future__ import annotations

from pcmoe.bench.common import BUSY_CPU_SHARE, GGUF_TYPE
from pcmoe.budget import format_bytes

MATCH_TOLERANCE = 0.05  # a quantised run and a committee are "matched" within 5 % of memory


def succeeded(results):
    return [r for r in results if r.get("returncode") == 0]


def by_label(results):
    return {r["label"]: r for r in succeeded(results)}


def quantized(r) -> str | None:
    """int8 / int4 (pcmoe) or q8_0 / q4_K_M (llama.cpp) when the run's weights are quantised."""
    q = ((r.get("spec") or {}).get("options") or {}).get("quantize")
    if q:
        return q
    return r.get("outtype") if r.get("outtype") in ("q8_0", "q4_K_M") else None


def memory_x(r) -> int | None:
    """The weight bytes a run holds or is allowed to hold (see the module docstring)."""
    if r.get("policy") == "llama.cpp":
        if r.get("use_mmap"):
            return r.get("budget_bytes") or r.get("cgroup_limit_bytes")
        return r.get("model_bytes")
    if r.get("policy") in ("transformers", "accelerate-offload"):
        return r.get("held_bytes")
    return r.get("resident_bytes")


def checkpoint_type(meta) -> str | None:
    return GGUF_TYPE.get(((meta or {}).get("model_sizes") or {}).get("dtype"))


def is_busy(r) -> bool:
    share = r.get("cpu_other_share")
    return isinstance(share, (int, float)) and share > BUSY_CPU_SHARE


# -- targets -------------------------------------------------------------------------------------


def runtime_overhead(full: dict | None) -> int | None:
    """The runtime's own memory, measured on the `full` run: its peak RSS minus its resident weights."""
    if not full or not full.get("peak_rss_bytes") or not full.get("resident_bytes"):
        return None
    return max(0, int(full["peak_rss_bytes"] - full["resident_bytes"]))


def why_missing(labels, every: dict, error_chars: int | None = None) -> str:
    """Why a target has no value: the first of its runs that is absent, skipped or failed."""
    for label in labels:
        r = every.get(label)
        if r is None:
            return f"no `{label}` run"
        if r.get("skipped"):
            return f"`{label}` {r['skipped']}"
        if r.get("returncode") != 0:
            return f"`{label}` failed: {str(r.get('error', '?'))[:error_chars]}"
    return "a needed measurement is missing"


def targets(results, meta=None) -> list[dict]:
    """The issue's targets at 50 % of expert memory, as measured ratios; a target whose runs are
    missing is listed with value None and the reason."""
    ok, every = by_label(results), {r["label"]: r for r in results}
    ck = checkpoint_type(meta) or "bf16"
    rows = []

    def add(name, op, goal, labels, fn, note=""):
        recs = [ok.get(label) for label in labels]
        value = None
        if all(recs):
            try:
                value = fn(*recs)
            except (TypeError, ZeroDivisionError, KeyError):
                value = None
        row = {"target": name, "goal": f"{op} {goal:g}", "op": op, "goal_value": goal, "value": value,
               "runs": labels, "note": note}
        if value is None:
            row.update(met=None, margin=None, note=why_missing(labels, every) if not all(recs) else
                       "a needed measurement is missing in the runs")
        else:
            row["met"] = value >= goal if op == ">=" else value <= goal
            row["margin"] = (value / goal - 1) if op == ">=" else (1 - value / goal)
            busy = [f"`{r['label']}` {100 * r['cpu_other_share']:.0f} %" for r in recs if is_busy(r)]
            if busy:
                row["note"] = "; ".join(filter(None, [note, "others' CPU during " + ", ".join(busy)]))
        rows.append(row)

    def ratio(key):
        return lambda a, b: a[key] / b[key]

    def increase(com, full, mag):
        inc_c, inc_m = com["ppl"] - full["ppl"], mag["ppl"] - full["ppl"]
        if inc_c <= 0:
            return 0.0
        return inc_c / inc_m if inc_m > 0 else float("inf")

    add("committee ppl / full ppl", "<=", 1.05, ["committee@50%", "full"], ratio("ppl"))
    add("committee ppl increase / magnitude-keep's", "<=", 0.5, ["committee@50%", "full", "magnitude-keep@50%"],
        increase)
    add("committee decode / full decode", ">=", 0.95, ["committee@50%", "full"], ratio("decode_tokens_per_s"))
    add("committee decode / on-demand decode (page cache evicted)", ">=", 5, ["committee@50%", "on-demand@50%"],
        ratio("decode_tokens_per_s"))
    add("committee decode / accelerate offload decode (same budget and precision)", ">=", 5,
        ["committee@50%", "accelerate-offload@50%"], ratio("decode_tokens_per_s"))
    add(f"committee decode / llama.cpp mmap {ck} decode (same memory limit and precision)", ">=", 1.0,
        ["committee@50%", f"llama.cpp mmap@50%/{ck}"], ratio("decode_tokens_per_s"))
    overhead = runtime_overhead(ok.get("full"))
    add("committee peak RSS / (budget + runtime overhead)", "<=", 1.03, ["committee@50%", "full"],
        lambda com, full: com["peak_rss_bytes"] / (com["budget_bytes"] + runtime_overhead(full)),
        note=f"overhead measured on the `full` run (its peak RSS - its resident weights): {format_bytes(overhead)}"
        if overhead is not None else "")
    add(f"pcmoe full decode / llama.cpp resident {ck} decode (same precision)", ">=", 0.8,
        ["full", f"llama.cpp resident/{ck}"], ratio("decode_tokens_per_s"))
    return rows


# -- quantisation at matched memory --------------------------------------------------------------


def quant_comparison(results) -> list[dict]:
    """Every quantised setup next to the bf16 committee (same checkpoint precision) whose memory is
    closest, with who wins on quality and on speed."""
    ok = succeeded(results)
    committees = [r for r in ok if r.get("policy") == "committee" and not quantized(r) and not r.get("storage")
                  and r.get("section") in ("lm", "quant") and memory_x(r)]
    rows = []
    for q in ok:
        if not quantized(q) or not memory_x(q) or not committees:
            continue
        c = min(committees, key=lambda r: abs(memory_x(r) - memory_x(q)))
        row = {"quantised": q["label"], "quantised_bytes": memory_x(q), "committee": c["label"],
               "committee_bytes": memory_x(c), "memory_gap": memory_x(c) / memory_x(q) - 1,
               "quantised_ppl": q.get("ppl"), "committee_ppl": c.get("ppl"),
               "quantised_decode": q.get("decode_tokens_per_s"), "committee_decode": c.get("decode_tokens_per_s")}
        if row["quantised_ppl"] and row["committee_ppl"]:
            row["ppl_ratio"] = c["ppl"] / q["ppl"]
            row["quality"] = "committee" if c["ppl"] < q["ppl"] else "quantised"
        if row["quantised_decode"] and row["committee_decode"]:
            row["speed_ratio"] = c["decode_tokens_per_s"] / q["decode_tokens_per_s"]
            row["speed"] = "committee" if row["speed_ratio"] > 1 else "quantised"
        row["matched"] = abs(row["memory_gap"]) <= MATCH_TOLERANCE
        rows.append(row)
    return rows


def quant_verdicts(rows) -> list[str]:
    out = []
    for r in rows:
        gap = f"{100 * r['memory_gap']:+.1f} % memory"
        parts = []
        if "quality" in r:
            better = r["committee"] if r["quality"] == "committee" else r["quantised"]
            parts.append(f"quality: {better} better (ppl {r['committee_ppl']:.3f} vs {r['quantised_ppl']:.3f}, "
                         f"committee {100 * (r['ppl_ratio'] - 1):+.1f} %)")
        if "speed" in r:
            faster = r["committee"] if r["speed"] == "committee" else r["quantised"]
            parts.append(f"speed: {faster} faster (committee {r['speed_ratio']:.2f}x)")
        match = "" if r["matched"] else " (not closely matched: add a committee run at this memory)"
        out.append(f"- `{r['committee']}` vs `{r['quantised']}` ({gap}){match}: " + ("; ".join(parts) or "no data"))
    matched = [r for r in rows if r["matched"]]
    if matched:
        q_wins = sum(r.get("quality") == "committee" for r in matched)
        s_wins = sum(r.get("speed") == "committee" for r in matched)
        out.append(f"- Over {len(matched)} closely matched pair(s) the bf16 committee wins on quality in {q_wins} "
                   f"and on speed in {s_wins}.")
    return out


# -- storage -------------------------------------------------------------------------------------


def expert_reads(r) -> tuple[int, float, int]:
    """Bytes, seconds and count of the expert reads of a run (evaluation + decode phases)."""
    b, s, n = r.get("bytes_read") or 0, r.get("read_s") or 0.0, r.get("reads") or 0
    ev = r.get("eval_stats") or {}
    return b + (ev.get("bytes_read") or 0), s + (ev.get("read_s") or 0.0), n + (ev.get("reads") or 0)


def read_bandwidth(results) -> dict | None:
    """The achieved cold read rate of this disk for expert-sized reads, from the runs without
    storage emulation (on-demand@50% preferred: every miss is a read from the evicted file)."""
    ok = [r for r in succeeded(results) if r.get("section") == "lm" and r.get("policy") in ("on-demand", "committee")]
    ok.sort(key=lambda r: (r["label"] != "on-demand@50%", r.get("policy") != "on-demand"))
    for r in ok:
        b, s, n = expert_reads(r)
        if b and s > 0:
            return {"mb_per_s": b / s / 1e6, "read_bytes": b / max(n, 1), "reads": n, "run": r["label"]}
    return None


def storage_rows(results) -> list[dict]:
    from pcmoe.store import STORAGE_PROFILES

    by = by_label(results)
    bw = read_bandwidth(results)
    rows = []
    for policy in ("committee", "on-demand"):
        base = by.get(f"{policy}@50%")
        if base:
            rows.append({"run": base["label"], "profile": "this disk (no emulation)", "profile_mb_per_s": None,
                         "rec": base, "vs_disk": 1.0})
        for r in results:
            if r.get("section") != "storage" or not r["label"].startswith(f"{policy}@"):
                continue
            profile = r.get("storage") or r["label"].rsplit("/", 1)[-1]
            mbps = STORAGE_PROFILES.get(profile)
            row = {"run": r["label"], "profile": profile, "profile_mb_per_s": mbps, "rec": r}
            if base and r.get("decode_tokens_per_s") and base.get("decode_tokens_per_s"):
                row["vs_disk"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            if bw and mbps:
                row["effect"] = ("slows reads to the profile" if mbps < bw["mb_per_s"] else
                                 "none expected: the profile is faster than this disk")
            rows.append(row)
    return rows
