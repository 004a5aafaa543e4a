"""Live budget inside a cgroup (issue 14, item 4): the server keeps answering while its box shrinks.

`pcmoe serve` runs inside a cgroup v1 memory limit (root; pcmoe.bench.cgroup's controller). A client
streams requests one after another. Mid-stream the engine is told a lower budget (POST /admin/budget),
then the cgroup's limit is lowered below what the process used before: to its usage then, less
the weight bytes the engine freed (or its usage after the shrink, if lower), plus --headroom. The
stream goes on; at the end the demonstration reports every request's outcome, the OOM kills and
failcnt of the group, the RSS and the engine's resident bytes before and after. Success = zero
OOMs and zero failed requests. Writes live_budget_cgroup.json and .md atomically.

    python benchmarks/live_budget_cgroup.py --out docs/results            # the shipped LM
    python benchmarks/live_budget_cgroup.py --model data/scaling/mid-32 --budget 60%experts --low 25%experts
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pcmoe.bench.cgroup import available, entering, new_group, remove_group  # noqa: E402
from pcmoe.budget import format_bytes  # noqa: E402
from pcmoe.system import atomic_write_text  # noqa: E402

TOKEN = "live-budget-demo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read(group: Path, name: str) -> int:
    return int((group / name).read_text().split()[0])


def _oom_kills(group: Path) -> int:
    for line in (group / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


class Client(threading.Thread):
    """Requests one after another until stopped: each a streamed completion of `tokens` tokens."""

    def __init__(self, url: str, tokens: int):
        super().__init__(daemon=True)
        self.url, self.tokens = url, tokens
        self.results: list[dict] = []
        self.stop = threading.Event()

    def run(self):
        import httpx

        prompts = ["def fibonacci(n):", "import os\n\ndef main():", "class Stack:\n    def __init__(self):",
                   "# read a file line by line\n"]
        with httpx.Client(base_url=self.url, timeout=120) as http:
            i = 0
            while not self.stop.is_set():
                t0, text, ok, error = time.monotonic(), "", False, None
                try:
                    with http.stream("POST", "/v1/completions", json={
                            "prompt": prompts[i % len(prompts)], "max_tokens": self.tokens, "temperature": 0,
                            "stream": True}) as r:
                        if r.status_code != 200:
                            error = f"HTTP {r.status_code}"
                        else:
                            done = False
                            for line in r.iter_lines():
                                if line == "data: [DONE]":
                                    done = True
                                elif line.startswith("data: "):
                                    chunk = json.loads(line[6:])
                                    if "error" in chunk:
                                        error = chunk["error"]["message"]
                                    elif chunk.get("choices"):
                                        text += chunk["choices"][0].get("text", "")
                            ok = done and error is None and bool(text)
                except Exception as e:  # the server died or the connection broke: a failed request
                    error = f"{type(e).__name__}: {e}"
                self.results.append({"index": i, "ok": ok, "error": error, "chars": len(text),
                                     "start_s": t0, "seconds": time.monotonic() - t0})
                i += 1


def _set_limit(group: Path, limit: int) -> str | None:
    """Lower the group's limit; the kernel's refusal (EBUSY: it could not reclaim enough), if any."""
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        return None
    except OSError as e:
        return e.strerror


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "pcmoe-lm"))
    ap.add_argument("--budget", default=None, help="budget at start (default: the whole model)")
    ap.add_argument("--low", default="30%experts", help="the budget the engine is told mid-stream")
    ap.add_argument("--limit", type=float, default=900e6, help="cgroup limit at start, bytes (default 900 MB)")
    ap.add_argument("--headroom", type=float, default=24e6,
                    help="the lowered cgroup limit: the usage before the shrink less the weights freed, or the "
                         "usage after it if lower, + this (default 24 MB)")
    ap.add_argument("--follow", action="store_true",
                    help="no admin call: the server runs with --follow-cgroup and the limit is lowered to the "
                         "usage + --follow-margin; the engine must shrink by itself")
    ap.add_argument("--follow-margin", type=float, default=8e6,
                    help="--follow: the lowered limit is the usage + this (default 8 MB; the server keeps 32 MB free)")
    ap.add_argument("--tokens", type=int, default=48, help="tokens per request")
    ap.add_argument("--phase-s", type=float, default=20.0, help="seconds of streaming per phase")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = ap.parse_args(argv)
    if not available():
        print("error: needs root and the cgroup v1 memory controller at /sys/fs/cgroup/memory", file=sys.stderr)
        return 2
    import httpx

    group = new_group("pcmoe-live", args.limit)
    port = _free_port()
    cmd = [sys.executable, "-m", "pcmoe", "serve", "--model", args.model, "--policy", "committee", "--port",
           str(port), "--admin-token", TOKEN, "--no-user-state", "--threads", str(args.threads), "--log-level",
           "warning"] + (["--budget", args.budget] if args.budget else [])
    cmd += ["--follow-cgroup"] if args.follow else []
    log = open("/tmp/live_budget_server.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=entering(group), cwd=str(ROOT),
                              env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    url = f"http://127.0.0.1:{port}"
    events, result = [], {}
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("error: the server did not start (see /tmp/live_budget_server.log)")
            time.sleep(0.5)

        def snapshot(what: str) -> dict:
            stats = httpx.get(url + "/v1/pcmoe/stats", timeout=30).json()
            row = {"event": what, "t_s": time.monotonic() - t_start,
                   "cgroup_limit": _read(group, "memory.limit_in_bytes"),
                   "cgroup_usage": _read(group, "memory.usage_in_bytes"), "rss_bytes": stats["rss_bytes"],
                   "resident_bytes": stats["resident_bytes"], "budget_bytes": stats["budget_bytes"],
                   "committee_sizes": stats["committee_sizes"]}
            events.append(row)
            return row

        t_start = time.monotonic()
        client = Client(url, args.tokens)
        snapshot("start")
        client.start()
        time.sleep(args.phase_s)
        before = snapshot("before the budget change")
        if args.follow:  # the engine follows the group's limit by itself (--follow-cgroup)
            new_limit = int(before["cgroup_usage"] + args.follow_margin)
            limit_error = _set_limit(group, new_limit)
            t_told = time.monotonic()
            events.append({"event": "cgroup limit lowered", "t_s": t_told - t_start, "to": new_limit,
                           "error": limit_error})
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                told = httpx.get(url + "/v1/pcmoe/stats", timeout=30).json()
                if told["budget_bytes"] < before["budget_bytes"]:
                    break
                time.sleep(0.5)
            status = None
            told = {"budget_bytes": told["budget_bytes"], "committee_sizes": told["committee_sizes"]}
            shrunk = snapshot("after the engine followed")
        else:
            r = httpx.post(url + "/admin/budget", json={"budget": args.low},
                           headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
            told, t_told, status = r.json(), time.monotonic(), r.status_code
            events.append({"event": "engine told", "t_s": time.monotonic() - t_start, "status": status,
                           "reply": told})
            time.sleep(2.0)  # the running request applies it at its next token; its reply refreshes the stats
            shrunk = snapshot("after the budget change")
            # Below what the group used before: its usage then, less the weight bytes the engine
            # freed, + the headroom (the usage now can stay high on page cache, which the kernel
            # reclaims under the lower limit: e.g. torch's libraries read by this very process).
            freed = max(0, before["resident_bytes"] - shrunk["resident_bytes"])
            new_limit = int(min(_read(group, "memory.usage_in_bytes"), before["cgroup_usage"] - freed)
                            + args.headroom)
            limit_error = _set_limit(group, new_limit)
            events.append({"event": "cgroup limit lowered", "t_s": time.monotonic() - t_start, "to": new_limit,
                           "error": limit_error})
        in_flight = [x["index"] for x in client.results if x["start_s"] <= t_told] or [-1]
        time.sleep(args.phase_s)
        snapshot("end")
        client.stop.set()
        client.join(180)
        ok = [x for x in client.results if x["ok"]]
        failed = [x for x in client.results if not x["ok"]]
        result = {
            "benchmark": "live_budget_cgroup", "model": args.model, "command": " ".join(cmd[3:]),
            "start_limit_bytes": int(args.limit), "lowered_limit_bytes": new_limit, "limit_error": limit_error,
            "mode": "followed" if args.follow else "told", "low_budget": None if args.follow else args.low,
            "admin_status": status, "admin_reply": told,
            "requests": len(client.results), "succeeded": len(ok), "failed": len(failed),
            "failures": failed[:5],
            "request_in_flight_at_the_change": in_flight[-1] + 1,
            "oom_kills": _oom_kills(group), "failcnt": _read(group, "memory.failcnt"),
            "max_usage_bytes": _read(group, "memory.max_usage_in_bytes"), "server_alive": server.poll() is None,
            "usage_before_shrink": before["cgroup_usage"], "usage_after_shrink": shrunk["cgroup_usage"],
            "events": events, "note": "timings under contention (other jobs on the machine); counts are exact",
        }
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        remove_group(group)
    out = Path(args.out)
    stem = "live_budget_cgroup_follow" if args.follow else "live_budget_cgroup"
    atomic_write_text(out / f"{stem}.json", json.dumps(result, indent=1))
    atomic_write_text(out / f"{stem}.md", markdown(result))
    print(markdown(result))
    return 0 if result["failed"] == 0 and result["oom_kills"] == 0 and result["server_alive"] else 1


def markdown(r: dict) -> str:
    lines = ["# Live budget inside a cgroup (issue 14)", "",
             f"`pcmoe {r['command']}` in a cgroup v1 memory limit of {format_bytes(r['start_limit_bytes'])}; a "
             f"client streams completions one after another. "
             + (f"Mid-stream the cgroup limit is lowered to {format_bytes(r['lowered_limit_bytes'])} and the "
                f"engine, following it (`--follow-cgroup`), shrinks its budget to "
                f"{format_bytes(r['admin_reply']['budget_bytes'])} by itself"
                if r["mode"] == "followed" else
                f"Mid-stream the engine is told `{r['low_budget']}` (POST /admin/budget: HTTP {r['admin_status']}), "
                f"then the cgroup limit is lowered to {format_bytes(r['lowered_limit_bytes'])}, below the "
                f"{format_bytes(r['usage_before_shrink'])} the group used before")
             + (f" (the kernel refused: {r['limit_error']})" if r["limit_error"] else "") + ".", "",
             f"**{r['requests']} requests, {r['succeeded']} succeeded, {r['failed']} failed; OOM kills: "
             f"{r['oom_kills']}; server alive at the end: {r['server_alive']}.** Group failcnt {r['failcnt']}, peak "
             f"usage {format_bytes(r['max_usage_bytes'])}.", "",
             "| event | t (s) | cgroup limit | cgroup usage | RSS | engine resident weights | budget "
             "| committee sizes |",
             "|---|---|---|---|---|---|---|---|"]
    for e in r["events"]:
        if "cgroup_usage" in e:
            lines.append(f"| {e['event']} | {e['t_s']:.1f} | {format_bytes(e['cgroup_limit'])} | "
                         f"{format_bytes(e['cgroup_usage'])} | {format_bytes(e['rss_bytes'])} | "
                         f"{format_bytes(e['resident_bytes'])} | {format_bytes(e['budget_bytes'])} | "
                         f"{e['committee_sizes']} |")
        else:
            lines.append(f"| {e['event']} | {e['t_s']:.1f} | " + (f"{format_bytes(e['to'])}" if "to" in e else "")
                         + " | | | | | |")
    lines += ["", "Rerun: `python benchmarks/live_budget_cgroup.py --out docs/results` (root, cgroup v1; `--follow`: "
              "the engine follows the limit by itself, written to live_budget_cgroup_follow.*).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
