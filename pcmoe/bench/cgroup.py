"""Run a command inside a cgroup v1 memory limit and report what it used.

The page cache a process causes is charged to its group too, so a limit here is a real limit:
nothing can cheat by keeping weights in the OS cache. Needs root and the cgroup v1 memory
controller (mounted at /sys/fs/cgroup/memory on this project's machines).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

MEMORY_ROOT = Path("/sys/fs/cgroup/memory")


def available() -> bool:
    return (MEMORY_ROOT / "cgroup.procs").exists() and os.access(MEMORY_ROOT, os.W_OK)


@dataclass
class LimitedRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    limit_bytes: int | None
    max_usage_bytes: int | None   # peak of the group's charge (RSS + page cache)
    failcnt: int | None           # times the group hit its limit (reclaim pressure)
    oom_killed: bool
    timed_out: bool = False       # killed after `timeout` seconds (returncode 124)


def new_group(name: str, limit_bytes: int | None = None) -> Path:
    """A fresh memory cgroup `<name>-<random>` with the given limit (None: no limit, still measured)."""
    group = MEMORY_ROOT / f"{name}-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    if limit_bytes is not None:
        (group / "memory.limit_in_bytes").write_text(str(int(limit_bytes)))
    return group


def entering(group: Path):
    """A preexec_fn that moves the child into `group` before exec: its memory is charged there."""
    procs = str(group / "cgroup.procs")

    def enter_group():
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    return enter_group


def remove_group(group: Path) -> None:
    """Remove a group; it can be removed once its last process is gone, so retry for up to 5 s."""
    for _ in range(50):
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def run_limited(cmd: list[str], limit_bytes: int | None, env: dict | None = None, timeout: float | None = None,
                cwd: str | None = None) -> LimitedRun:
    """Run `cmd` in a fresh memory cgroup with the given limit (None: no limit, still measured)."""
    if not available():
        raise RuntimeError("cgroup v1 memory controller not writable (need root and /sys/fs/cgroup/memory)")
    group = MEMORY_ROOT / f"pcmoe-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        if limit_bytes is not None:
            (group / "memory.limit_in_bytes").write_text(str(int(limit_bytes)))
        t0 = time.perf_counter()
        timed_out = False
        try:
            proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                                  preexec_fn=entering(group))
        except subprocess.TimeoutExpired as e:  # subprocess.run has killed the child
            timed_out = True
            proc = subprocess.CompletedProcess(cmd, 124, _text(e.stdout), _text(e.stderr)
                                               + f"\ntimed out after {timeout:g} s")
        seconds = time.perf_counter() - t0
        usage = int((group / "memory.max_usage_in_bytes").read_text())
        failcnt = int((group / "memory.failcnt").read_text())
        oom = False
        oom_control = group / "memory.oom_control"
        if oom_control.exists():
            for line in oom_control.read_text().splitlines():
                if line.startswith("oom_kill ") and int(line.split()[1]) > 0:
                    oom = True
        oom = (oom or proc.returncode == -9) and not timed_out
        return LimitedRun(proc.returncode, proc.stdout, proc.stderr, seconds, limit_bytes, usage, failcnt, oom,
                          timed_out)
    finally:
        remove_group(group)


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data
