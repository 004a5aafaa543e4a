"""The planner table of docs/PLANNER.md: plan for (memory, latency) limits from a model's committed
device profile, run every plan inside a cgroup limit of its memory limit, and compare at the same
memory limits with the ablations, all measured in one run:

    planned     the full system: per-layer sizes and precisions and F from the genetic search
    uniform     "simple planning": the best uniform configuration (same size and precision in
                every layer) within the same limits, by the same predictors
    static      "simple scheduling": the planned sizes and precisions served by static-frequency
                (the experts the routing profile counted most tokens for, never updated): pcmoe has
                no token-count importance mode, and this is the closest it has (no amortised update)
    cli         `pcmoe eval --memory X` itself inside a cgroup of exactly X (the planner picks at load)

    python benchmarks/planner_table.py --model models/pcmoe-lm --out runs/planner/table_lm.json \
        --pair 400MB: --pair 420MB:1.2ms --pair 420MB:1.1x ... [--ablations] [--cli]

Results are appended to --out as they finish (atomic rewrite; a Markdown table beside it, same name
with .md) and a rerun skips what is there. The last stdout line is the JSON of all rows. Latency
rows timed while other processes used more than 15 % of the CPU are flagged "busy"; memory and
quality do not depend on contention.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pcmoe.bench.common import git_commit
from pcmoe.budget import format_bytes
from pcmoe.planner.planning import Planner, best_uniform, format_latency, parse_latency, parse_memory, profile_file
from pcmoe.planner.validate import compare, run_plan
from pcmoe.system import atomic_write_text


def parse_pair(text: str) -> tuple[str, str | None]:
    memory, _, latency = text.partition(":")
    return memory, latency or None


def cli_run(model: str, memory: int, planner: Planner, threads: int) -> dict:
    """`pcmoe eval --memory X` inside a cgroup of X bytes (text: the held-out documents' file)."""
    from pcmoe.bench.cgroup import available, run_limited

    stream = planner.data["calibration"]["ident"]["stream"]
    cmd = [sys.executable, "-m", "pcmoe", "eval", "--model", model, "--memory", str(memory), "--threads",
           str(threads), "--quiet"]
    cmd += ["--data", stream["data"], "--max-tokens", "4000"] if stream["kind"] == "text" else ["--frames", "500"]
    if not available():
        return {"returncode": None, "error": "no cgroup v1"}
    r = run_limited(cmd, memory, timeout=1200)
    out = {"returncode": r.returncode, "cgroup_limit_bytes": memory, "cgroup_max_usage_bytes": r.max_usage_bytes,
           "oom_killed": r.oom_killed, "cgroup_failcnt": r.failcnt, "planned": r.stderr.strip().splitlines()[:1]}
    if r.returncode == 0:
        out.update(json.loads(r.stdout.strip().splitlines()[-1]))
    else:
        out["error"] = (r.stderr.strip().splitlines() or ["?"])[-1]
    return out


def _pct(value) -> str:
    return "-" if value is None else f"{value:+.1%}"


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(meta: dict, rows: list[dict], quality_name: str) -> str:
    """The docs table: one line per measured row (variants at the same limits next to each other)."""
    head = ("| limits (memory : latency) | variant | sizes / precisions / F | "
            "memory pred (run's KV) -> peak RSS (err) | "
            "cgroup peak | latency pred -> meas (err; at calib. speed) | "
            f"{quality_name} pred -> meas (err) | held-out | violations |")
    lines = [f"Model {meta['model']}, commit {meta['commit']}, quality model {meta['quality_model']}, "
             f"threads {meta['threads']}, {meta.get('started', '')} .. {meta.get('finished', '')}.", "",
             head, "|" + "---|" * 9]
    for r in rows:
        violations = "; ".join(r["violations"]) or "none"
        if r.get("variant") == "infeasible":
            lines.append(f"| {r['key'].rsplit('/', 1)[0]} | none: {r['reason']} | | | | | | | |")
            continue
        if r.get("variant") == "cli":
            rec = r["record"]
            lines.append(f"| {r['key'].split('/')[0]} | `pcmoe eval --memory` | {(rec.get('planned') or [''])[0]} | "
                         f"- -> {format_bytes(rec.get('peak_rss_bytes'))} | "
                         f"{format_bytes(rec.get('cgroup_max_usage_bytes'))} | | | | {violations} |")
            continue
        p, m, e, c = r["predicted"], r["measured"], r["errors"], r["config"]
        opts = c.get("options") or {}
        ne = c.get("nonexpert_precision") or "full"
        cfg = (f"{' '.join(map(str, c['committee_sizes']))} / {' '.join(c.get('precisions') or [])} / "
               f"F {opts.get('update_every', '-')}" + (f" / non-expert {ne}" if ne != "full" else "")
               + (f" / shadows {c['shadow']}" if c.get("shadow") else ""))
        busy = (r.get("record") or {}).get("cpu_other_share")
        flag = f" (busy {busy:.0%})" if busy is not None and busy > 0.15 else ""
        at_speed = e.get("latency_at_calibration_speed")
        variant = r["variant"] + (f" ({r['policy']})" if r["policy"] != "committee" else "")
        memory = (f"{format_bytes(p.get('memory_bytes_at_run_context', p.get('memory_bytes')))} -> "
                  f"{format_bytes(m.get('memory_bytes'))} ({_pct(e.get('memory_bytes'))})")
        latency = (f"{format_latency(p.get('latency_s'))} -> {format_latency(m.get('latency_s'))} "
                   f"({_pct(e.get('latency_s'))}{'; ' + _pct(at_speed) if at_speed is not None else ''}){flag}")
        quality = f"{_num(p.get('quality'))} -> {_num(m.get('quality'))} ({_pct(e.get('quality'))})"
        lines.append(f"| {r['key'].rsplit('/', 1)[0]} | {variant} | {cfg} | {memory} | "
                     f"{format_bytes(m.get('cgroup_peak_bytes'))} | {latency} | {quality} | "
                     f"{_num(m.get('heldout_quality'))} | {violations} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pair", action="append", required=True,
                    help="MEMORY:LATENCY (latency may be empty, or 1.2x: a multiple of the least latency)")
    ap.add_argument("--ablations", action="store_true", help="also the uniform and static rows at each pair")
    ap.add_argument("--cli", action="store_true", help="also `pcmoe eval --memory X` in a cgroup of X per pair")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    planner = Planner.from_file(profile_file(args.model), seed=args.seed)
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    done = {r["key"] for r in rows}
    meta = {"model": args.model, "commit": git_commit(), "profile": str(profile_file(args.model)),
            "quality_model": planner.quality.name, "threads": args.threads, "started": time.strftime("%F %T")}

    def save():
        atomic_write_text(out, json.dumps({"meta": meta, "rows": rows}, indent=1))
        name = {"log_ppl": "ppl", "error_rate": "accuracy"}.get(planner.metric, "quality")
        atomic_write_text(out.with_suffix(".md"), markdown(meta, rows, name))

    def measure(key, variant, plan_data, limits, policy="committee"):
        if key in done:
            return
        limit = int(limits.get("memory_bytes") or plan_data["predicted"]["memory_bytes"])
        rec = run_plan(planner, args.model, plan_data, limit, args.threads, policy=policy)
        config = {k: plan_data.get(k) for k in ("committee_sizes", "precisions", "options", "nonexpert_precision",
                                                 "shadow")}
        row = {"key": key, "variant": variant, "policy": policy, "config": config,
               **compare(planner, {**plan_data, "limits": limits}, rec, limit)}
        row["record"] = {k: rec.get(k) for k in ("peak_rss_bytes", "cgroup_max_usage_bytes", "cgroup_failcnt",
                                                 "latency_s", "loss", "heldout", "cpu_other_share", "resident_bytes",
                                                 "returncode", "error", "decode_trials_tokens_per_s")}
        rows.append(row)
        done.add(key)
        save()
        m = row["measured"]
        print(f"{key:28} {variant:8} mem {format_bytes(m['memory_bytes']):>10} lat {format_latency(m['latency_s']):>9}"
              f" q {m.get('quality')}  violations {row['violations'] or 'none'}", flush=True)

    full = planner.predict(planner.space.decode(planner.space.full(), 0))
    full_plan = {"format": "pcmoe-plan/1", "model_type": planner.model_type,
                 "num_experts": list(planner.space.num_experts), "committee_sizes": list(planner.space.num_experts),
                 "precisions": ["full"] * planner.space.layers, "options": {}, "predicted": full}
    measure("full", "full", full_plan, {"memory_bytes": int(full["memory_bytes"] * 1.05)})
    for pair in args.pair:
        mem_s, lat_s = parse_pair(pair)
        memory = parse_memory(mem_s, planner.full_memory())
        # "1.2x": that multiple of the least latency any configuration has (limits that stay meaningful
        # when the profile is remeasured on a quieter or faster machine)
        if lat_s and lat_s.endswith("x"):
            latency = float(lat_s[:-1]) * planner.latency.least()[0]
        else:
            latency = parse_latency(lat_s)
        limits = {"memory_bytes": memory, **({"latency_s": latency} if latency else {})}
        try:
            plan = planner.plan(memory, latency, seed=args.seed)
        except ValueError as e:      # an impossible pair is a row of the table, not the end of it
            if f"{pair}/planned" not in done:
                rows.append({"key": f"{pair}/planned", "variant": "infeasible", "limits": limits,
                             "violations": [], "reason": str(e).splitlines()[0]})
                done.add(f"{pair}/planned")
                save()
            print(f"{pair}: {str(e).splitlines()[0]}", flush=True)
            continue
        planned = planner.plan_dict(plan, limits)
        measure(f"{pair}/planned", "planned", planned, limits)
        if args.ablations:
            try:
                uni = planner.plan_dict(best_uniform(planner, memory, latency), limits)
                measure(f"{pair}/uniform", "uniform", uni, limits)
            except ValueError as e:
                print(f"{pair}: no uniform configuration ({e})")
            if (Path(args.model) / "profile.json").exists():   # static-frequency needs the routing profile
                measure(f"{pair}/static", "static", planned, limits, policy="static-frequency")
        if args.cli and f"{pair}/cli" not in done and not latency:
            rec = cli_run(args.model, memory, planner, args.threads)
            rows.append({"key": f"{pair}/cli", "variant": "cli", "limits": limits, "record": rec,
                         "violations": [] if rec.get("returncode") == 0 and rec.get("peak_rss_bytes", 0) <= memory
                         else [rec.get("error") or "over the limit"]})
            done.add(f"{pair}/cli")
            save()
            print(f"{pair}/cli: rc {rec.get('returncode')}, peak RSS {format_bytes(rec.get('peak_rss_bytes'))}, "
                  f"cgroup peak {format_bytes(rec.get('cgroup_max_usage_bytes'))}", flush=True)
    meta["finished"] = time.strftime("%F %T")
    save()
    print(json.dumps({"meta": meta, "rows": [{k: v for k, v in r.items() if k != "record"} for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
