"""Helpers shared by the bench suite, its workers and the peers (torch-free at import).

- RunLog: runs.jsonl, rewritten atomically on every record (an interrupted sweep resumes from it);
- fingerprint: what identifies a checkpoint's contents for resuming (by content, the engine's rule);
- CpuMeter: the CPU share other processes used while a run was measured (/proc/stat minus ours);
- savefig: PNGs written atomically; missing(): the one-line message for a missing optional extra.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from pathlib import Path

from pcmoe.system import atomic_write_bytes, atomic_write_text

BUSY_CPU_SHARE = 0.10  # runs where other processes used more of the machine than this are flagged
# The checkpoint's torch dtype -> the GGUF type of the same precision, and bytes per weight.
GGUF_TYPE = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}
BYTES_PER_WEIGHT = {"bf16": 2, "f16": 2, "f32": 4, "bfloat16": 2, "float16": 2, "float32": 4}
EXTRAS = {"accelerate": "pcmoe[bench]", "matplotlib": "pcmoe[bench]", "llama_cpp": "pcmoe[llamacpp]"}


def missing(module: str) -> str | None:
    """None if `module` imports, else the one-line skip message naming what to pip install."""
    import importlib.util

    try:
        if importlib.util.find_spec(module) is not None:
            return None
    except (ImportError, ValueError):
        pass
    name = {"llama_cpp": "llama-cpp-python"}.get(module, module)
    hint = f"pip install '{EXTRAS[module]}'" if module in EXTRAS else f"pip install {name}"
    extra = " (builds llama.cpp from source, ~7 min)" if module == "llama_cpp" else ""
    return f"skipped: {name} is not installed; {hint}{extra}"


SIDE_FILES = (".json", ".model", ".txt")  # config, tokenizer, pcmoe_options.json, profile.json, ...
DERIVED = ("pcmoe_expert_norms.json",)     # computed from the weights: not an input of its own


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint's safetensors files (what a cold start must read from the disk)."""
    return sorted(Path(model_dir).glob("*.safetensors"))


def fingerprint(model_dir: str | os.PathLike) -> str:
    """What a result measured on a checkpoint depends on, by content, never by mtime (a fresh
    clone resumes from the same results): the weights as the engine identifies them
    (Checkpoint.fingerprint: every tensor's layout and content samples of each file) and the whole
    content of each side file (config, tokenizer, pcmoe_options.json, profile.json)."""
    from pcmoe.checkpoint import Checkpoint

    folder = Path(model_dir)
    h = hashlib.sha1(Checkpoint(folder).fingerprint().encode())
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in SIDE_FILES and f.name not in DERIVED:
            h.update(f"{f.name}:".encode() + hashlib.sha1(f.read_bytes()).digest())
    return h.hexdigest()[:16]


class RunLog:
    """runs.jsonl: one JSON record per finished run, rewritten atomically on every append."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: list[dict] = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    self.records.append(json.loads(line))
                except ValueError:
                    continue  # a torn line from a crash before atomic writes: ignore it

    def done(self) -> dict[str, dict]:
        """The successful records by key (the latest wins)."""
        return {r["key"]: r for r in self.records if r.get("returncode") == 0 and r.get("key")}

    def append(self, rec: dict) -> None:
        self.records.append(rec)
        atomic_write_text(self.path, "".join(json.dumps(r, default=str) + "\n" for r in self.records))

    def restart(self) -> None:
        """--fresh: keep the earlier log as runs.jsonl.old and start an empty one."""
        if self.path.exists():
            os.replace(self.path, self.path.with_name(self.path.name + ".old"))
        self.records = []


# -- CPU share ----------------------------------------------------------------------------------


def _cpu_times() -> tuple[int, int, int] | None:
    """(all CPUs' jiffies, their busy jiffies, this process's jiffies) or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]  # user .. steal (guest is inside user)
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    total = sum(fields)
    busy = total - fields[3] - fields[4]  # minus idle and iowait
    return total, busy, int(own[11]) + int(own[12])  # utime + stime (all threads)


class CpuMeter:
    """The share of the machine's CPU time (all cores) other processes used between start and stop."""

    def __init__(self):
        self.t0 = _cpu_times()

    def stop(self) -> dict:
        t1 = _cpu_times()
        if self.t0 is None or t1 is None or t1[0] <= self.t0[0]:
            return {"cpu_other_share": None, "cpu_own_share": None}
        total = t1[0] - self.t0[0]
        busy, own = t1[1] - self.t0[1], t1[2] - self.t0[2]
        # Jiffy counters of /proc/stat and /proc/self/stat tick apart: over short spans own can pass total.
        return {"cpu_other_share": min(1.0, max(0.0, (busy - own) / total)), "cpu_own_share": min(1.0, own / total)}


def process_read_bytes() -> int | None:
    """Bytes this process caused to be read from storage (/proc/self/io read_bytes, every thread;
    page faults of a memory-mapped file included, page-cache hits not); None where unavailable."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def process_age_s() -> float | None:
    """Seconds since this process started (/proc: the kernel's clock-tick resolution, 10 ms)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))  # field 22: starttime
    except (OSError, ValueError, IndexError):
        return None


class ReadMeter:
    """Storage reads of a decode measurement, split into prefill and decode, and the time to the
    first token of a cold start (process start to the first prefill's logits).

        meter = ReadMeter()
        decode_trials(meter.wrap(prefill), step, ..., after_warmup=meter.reset)
        meter.stop()  # {"ttft_cold_s", "prefill_read_bytes", "decode_read_bytes"}

    The decode phase of a generation runs from its prefill's return to the next prefill (or stop)."""

    def __init__(self):
        self.first_token_s: float | None = None
        self.reset()

    def reset(self) -> None:
        self.read = {"prefill": 0, "decode": 0}
        self._phase: str | None = None
        self._mark = process_read_bytes()

    def _enter(self, phase: str | None) -> None:
        now = process_read_bytes()
        if self._phase is not None and now is not None and self._mark is not None:
            self.read[self._phase] += now - self._mark
        self._phase, self._mark = phase, now

    def wrap(self, prefill_fn):
        def prefill(ids):
            self._enter("prefill")
            out = prefill_fn(ids)
            if self.first_token_s is None:
                self.first_token_s = process_age_s()
            self._enter("decode")
            return out
        return prefill

    def stop(self) -> dict:
        self._enter(None)
        known = self._mark is not None
        return {"ttft_cold_s": self.first_token_s,
                "prefill_read_bytes": self.read["prefill"] if known else None,
                "decode_read_bytes": self.read["decode"] if known else None}


def read_figures(meter: ReadMeter, result: dict, prompts, decode_tokens: int, cold: bool = True) -> dict:
    """A ReadMeter's figures for one decode_trials `result`, with "decode_read_bytes_per_token":
    storage reads (the kernel's count) during the timed rounds' decode steps, over those steps
    (trials x prompts x (decode_tokens - 1)). Not the engine's own "bytes_per_token" (the bytes
    its store read, prefill included, over every timed token). `cold`: the first prefill was the
    process's first work (no perplexity before it), so "ttft_cold_s" is a cold start's; else None."""
    out = meter.stop()
    if not cold:
        out["ttft_cold_s"] = None
    steps = result["trials"] * len(prompts) * max(decode_tokens - 1, 1)
    out["decode_read_bytes_per_token"] = None if out["decode_read_bytes"] is None else out["decode_read_bytes"] / steps
    return out


# -- files ---------------------------------------------------------------------------------------


def interleaved_decode_s(engines, prompt: list[int], repeats: int = 5, tokens: int = 48) -> list[float]:
    """Each engine's best seconds per greedy decode step over `repeats` runs of `tokens` steps after
    a prefill of `prompt`, the engines taking turns (machine load then slows every one alike)."""
    import time

    import torch

    best = [float("inf")] * len(engines)
    with torch.inference_mode():
        for _ in range(repeats):
            for i, engine in enumerate(engines):
                logits, state = engine.prefill(prompt)
                token = int(logits.argmax())
                t0 = time.perf_counter()
                for _ in range(tokens):
                    logits = engine.decode_step(state, token)
                    token = int(logits.argmax())
                best[i] = min(best[i], (time.perf_counter() - t0) / tokens)
    return best


def savefig(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    """Render a matplotlib figure to PNG and write it atomically (temporary name beside it, then
    os.replace): a reader never sees half a PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(Path(path), buf.getvalue())


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """The short commit hash, with "-dirty" when the working tree has uncommitted changes."""
    import subprocess

    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=cwd, timeout=30)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict:
    """CPU model, cores, RAM and kernel of this machine."""
    import platform

    cpu, ram = platform.processor(), None
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
        ram = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemTotal:")), None)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count() or 0, "ram_bytes": ram, "kernel": platform.release(),
            "python": platform.python_version()}


def versions() -> dict:
    """Installed versions of the packages the numbers depend on (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("pcmoe", "torch", "transformers", "accelerate", "llama-cpp-python", "matplotlib", "numpy",
                 "safetensors", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def model_sizes(model: str, quant: bool = True) -> dict:
    """Weight bytes of a checkpoint at its precision and quantised, from its headers (no weight is
    read), and its fingerprint."""
    from pcmoe.engine import inspect

    def info(quantize=None):
        i = inspect(model, quantize=quantize)
        return {"nonexpert": i["nonexpert_bytes"], "all_experts": i["all_expert_bytes"],
                "full": i["full_model_bytes"], "dtype": i["dtype"], "tokenizer": i["tokenizer"],
                "nonexpert_quantized": i["nonexpert_bytes_quantized"],  # --quantize-nonexpert int8 / int4
                "min_budget": {True: i.get("minimum_budget", i["minimum_budget_committee"]),
                               False: i["minimum_budget_static"]}}

    sizes = info()
    sizes["quant"], sizes["quant_errors"] = {}, {}
    for q in ("int8", "int4") if quant else ():
        try:
            sizes["quant"][q] = info(q)
        except Exception as e:  # noqa: BLE001 - e.g. int4 needs input sizes divisible by 32
            sizes["quant_errors"][q] = str(e).splitlines()[0][:200]
    sizes["fingerprint"] = fingerprint(model)
    return sizes


def log_status(i: int, n: int, rec: dict) -> None:
    if rec.get("returncode") is None:  # not run ("skipped" of a run that ran counts masked expert choices)
        status = rec.get("skipped") or "not run"
    elif rec["returncode"] == 0:
        status = "ok"
    else:
        status = f"FAILED ({rec.get('error')})"
    print(f"[{i}/{n}] {rec['label']:30s} {rec.get('wall_s', 0):6.1f}s {status}", file=sys.stderr, flush=True)
