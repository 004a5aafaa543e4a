"""Does `--memory X` hold? Run `pcmoe eval|generate|serve --memory X` inside a cgroup v1 memory limit
of exactly X and report whether the process survived, its peak RSS (VmHWM) and the group's peak
charge (RSS + page cache it caused), beside what the planner predicted:

    python -m pcmoe.planner.memcheck --model models/pcmoe-lm --memory 425MB --memory 450MB \
        [--command eval --command generate --command serve] [--out runs/planner/memcheck_lm.json]

serve: the server starts in the group, answers three chat completions (64 tokens each), then is
stopped with SIGINT; its peak RSS is read from /proc before it stops. Needs root and cgroup v1
(/sys/fs/cgroup/memory). The last stdout line is the JSON of all rows; --out also gets the JSON and a
Markdown table beside it (atomic writes). The vision model has no generate or serve; eval only.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pcmoe.budget import format_bytes

COMMANDS = ("eval", "generate", "serve")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_of(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _group_stats(group: Path) -> dict:
    stats = {"cgroup_max_usage_bytes": int((group / "memory.max_usage_in_bytes").read_text()),
             "cgroup_failcnt": int((group / "memory.failcnt").read_text()), "oom_killed": False}
    control = group / "memory.oom_control"
    if control.exists():
        for line in control.read_text().splitlines():
            if line.startswith("oom_kill ") and int(line.split()[1]) > 0:
                stats["oom_killed"] = True
    return stats


def run_serve(model: str, memory: str, limit: int, threads: int = 1, requests: int = 3,
              timeout: float = 600) -> dict:
    """`pcmoe serve --memory X` in a cgroup of `limit` bytes; three chat completions; then SIGINT."""
    from pcmoe.bench.cgroup import entering, new_group, remove_group

    group = new_group("pcmoe-serve", limit)
    port = _free_port()
    out: dict = {"command": "serve", "memory": memory, "limit_bytes": limit}
    try:
        cmd = [sys.executable, "-m", "pcmoe", "serve", "--model", model, "--memory", memory, "--threads",
               str(threads), "--port", str(port), "--quiet", "--log-level", "warning", "--no-user-state"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=entering(group))
        base = f"http://127.0.0.1:{port}"
        t0, answered = time.perf_counter(), 0
        try:
            while time.perf_counter() - t0 < timeout and proc.poll() is None:
                try:
                    urllib.request.urlopen(base + "/health", timeout=2).read()
                    break
                except OSError:
                    time.sleep(0.5)
            for i in range(requests):
                if proc.poll() is not None:
                    break
                body = json.dumps({"messages": [{"role": "user", "content": f"Tell me about the number {i}."}],
                                   "max_tokens": 64, "temperature": 0}).encode()
                req = urllib.request.Request(base + "/v1/chat/completions", body,
                                             {"Content-Type": "application/json"})
                reply = json.loads(urllib.request.urlopen(req, timeout=timeout).read())
                answered += bool(reply.get("choices"))
        except OSError as e:
            out["error"] = f"{type(e).__name__}: {e}"
        out["peak_rss_bytes"] = _peak_rss_of(proc.pid)
        alive = proc.poll() is None
        if alive:
            proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        out.update(_group_stats(group), answered=answered, alive_after_requests=alive,
                   returncode=0 if alive and answered == requests else proc.returncode,
                   planned=next((line for line in err.splitlines() if line.startswith("planned for")), None))
        if out["returncode"] != 0 and "error" not in out:
            out["error"] = (err.strip().splitlines() or ["?"])[-1]
        return out
    finally:
        remove_group(group)


def run_command(command: str, model: str, memory: str, limit: int, data: str | None, threads: int = 1,
                timeout: float = 900) -> dict:
    """`pcmoe eval|generate --memory X` in a cgroup of `limit` bytes."""
    from pcmoe.bench.cgroup import run_limited

    if command == "serve":
        return run_serve(model, memory, limit, threads, timeout=timeout)
    cmd = [sys.executable, "-m", "pcmoe", command, "--model", model, "--memory", memory, "--threads", str(threads),
           "--quiet"]
    if command == "eval":
        cmd += ["--max-tokens", "3000"] + (["--data", data] if data else ["--frames", "500"])
    else:
        cmd += ["--prompt", "The history of the city begins", "--max-tokens", "200", "--json"]
    r = run_limited(cmd, limit, timeout=timeout)
    out = {"command": command, "memory": memory, "limit_bytes": limit, "returncode": r.returncode,
           "cgroup_max_usage_bytes": r.max_usage_bytes, "cgroup_failcnt": r.failcnt, "oom_killed": r.oom_killed,
           "planned": next((line for line in r.stderr.splitlines() if line.startswith("planned for")), None)}
    if r.returncode == 0:
        try:
            out["peak_rss_bytes"] = json.loads(r.stdout.strip().splitlines()[-1]).get("peak_rss_bytes")
        except (ValueError, IndexError):
            pass
    else:
        out["error"] = (r.stderr.strip().splitlines() or ["?"])[-1]
    return out


def check(row: dict, predicted: int | None) -> dict:
    row["predicted_bytes"] = predicted
    ok = row.get("returncode") == 0 and not row.get("oom_killed")
    if row.get("peak_rss_bytes") and row["peak_rss_bytes"] > row["limit_bytes"]:
        ok = False
    row["survived"] = ok
    if predicted and row.get("peak_rss_bytes"):
        row["rss_over_predicted"] = row["peak_rss_bytes"] / predicted - 1
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| command | --memory | planned | predicted | peak RSS | cgroup peak | failcnt | survived |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        planned = (r.get("planned") or "").split(": ", 1)[-1].split("; memory")[0]
        err = r.get("rss_over_predicted")
        survived = "yes" if r["survived"] else "NO: " + str(r.get("error") or "over the limit")
        if r["survived"] is None:
            survived = "not run: below the least memory this command can plan for"
        lines.append(f"| {r['command']} | {r['memory']} | {planned} | {format_bytes(r.get('predicted_bytes'))} | "
                     f"{format_bytes(r.get('peak_rss_bytes'))}{f' ({err:+.1%})' if err is not None else ''} | "
                     f"{format_bytes(r.get('cgroup_max_usage_bytes'))} | {r.get('cgroup_failcnt')} | "
                     f"{survived} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from pcmoe.bench.cgroup import available
    from pcmoe.planner.planning import Planner, parse_memory, profile_file
    from pcmoe.system import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/pcmoe-lm")
    ap.add_argument("--memory", action="append", required=True, help="a --memory value (repeatable)")
    ap.add_argument("--command", action="append", choices=COMMANDS, help="default: all three (vision: eval)")
    ap.add_argument("--data", help="eval: text file (default <model>/eval/heldout.txt)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="JSON results (and a .md beside it)")
    args = ap.parse_args(argv)
    if not available():
        print("error: needs root and the cgroup v1 memory controller at /sys/fs/cgroup/memory", file=sys.stderr)
        return 2
    data = json.loads(profile_file(args.model).read_text())
    vision = data.get("model_type") == "pcmoe_vit_moe"
    commands = args.command or (["eval"] if vision else list(COMMANDS))
    text = None if vision else (args.data or str(Path(args.model) / "eval" / "heldout.txt"))
    rows = []
    for memory in args.memory:
        for command in commands:
            extra = int((data.get("frontend_bytes") or {}).get(command, 0))
            planner = Planner.from_data(data, extra_bytes=extra)
            limit = parse_memory(memory, planner.full_memory())
            try:
                predicted = int(planner.plan(limit).memory)
            except ValueError as e:   # below the least memory this command can plan for: nothing to run
                rows.append({"command": command, "memory": memory, "limit_bytes": limit, "survived": None,
                             "error": str(e)})
                print(f"{command:9} --memory {memory:>8}: skipped ({e})", flush=True)
                continue
            row = check(run_command(command, args.model, memory, limit, text, args.threads), predicted)
            rows.append(row)
            print(f"{command:9} --memory {memory:>8}: {'survived' if row['survived'] else 'FAILED'}; peak RSS "
                  f"{format_bytes(row.get('peak_rss_bytes'))}, cgroup peak "
                  f"{format_bytes(row.get('cgroup_max_usage_bytes'))} of {format_bytes(limit)}; "
                  f"predicted {format_bytes(predicted)}"
                  + (f"; {row['error']}" if row.get("error") else ""), flush=True)
    if args.out:
        atomic_write_text(Path(args.out), json.dumps({"model": args.model, "rows": rows}, indent=1))
        atomic_write_text(Path(args.out).with_suffix(".md"), markdown(rows))
    print(json.dumps(rows))
    return 0 if all(r["survived"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
