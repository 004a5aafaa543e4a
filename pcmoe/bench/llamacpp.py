"""llama.cpp (through llama-cpp-python) as an external peer in `pcmoe bench`.

What it does, for the benchmark's checkpoint:

1. Converts it to GGUF (f32, bf16, q8_0, q4_K_M; pcmoe.bench.gguf), cached under `--gguf-dir`
   (default data/llamacpp/gguf/<model name>/) and reused while the checkpoint is unchanged.
   Measurements feed token ids, so the vocabulary only matters for text.
2. Measures each GGUF in a fresh process (`python -m pcmoe.bench.llamacpp '<json spec>'`, started
   by pcmoe.bench.runner, which evicts the file from the page cache first; the last stdout line is
   the JSON result) with pcmoe's protocol (pcmoe.protocol): perplexity over the same held-out token
   streams and windows, then greedy decode speed; peak RSS, the GGUF size as "model_bytes".
3. Runs: "llama.cpp resident/{CK,q8_0,q4_K_M}" (use_mmap=False, no limit; CK is the checkpoint's own
   precision, bf16 for the shipped LM; the full sweep adds the other of bf16 / f32) and
   "llama.cpp mmap@50%/{CK}" (+ the other in the full sweep): use_mmap=True inside a cgroup memory
   limit of non-expert weights + 50 % of the expert weights, both at the GGUF's precision, +
   llama.cpp's runtime overhead (the peak RSS of the resident run of the same precision minus its
   model bytes) + 64 MiB. Decode speed: one warm-up generation, then the median of `trials` rounds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

from pcmoe import protocol
from pcmoe.bench import common, runner
from pcmoe.bench.gguf import CONVERTER_TYPES, convert, default_gguf_dir, gguf_path, installed_version
from pcmoe.system import atomic_write_text

SKIP_MESSAGE = (common.missing("llama_cpp")
                or "skipped: llama-cpp-python is not installed; pip install 'pcmoe[llamacpp]'")
RESIDENT = ("bf16", "f32", "q8_0", "q4_K_M")  # every resident precision (the full sweep, a bf16 checkpoint)
MMAP = ("bf16", "f32")
ALLOCATOR_SLACK = 64 << 20  # the same slack the suite adds to pcmoe's measured overhead
N_CTX = 1024
N_BATCH = 256
WORKER = "pcmoe.bench.llamacpp"


# -- measurement (the worker process) ------------------------------------------------------------


def log_softmax_nll(logits, targets) -> float:
    """Summed negative log-likelihood of `targets` (length n) under `logits` (n x vocab), in float64."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return float((lse - x[np.arange(len(targets)), np.asarray(targets)]).sum())


def _peak_rss() -> int:
    from pcmoe.system import peak_rss_bytes

    return peak_rss_bytes()


def _load_streams(spec: dict) -> list[list[int]]:
    s = spec.get("streams")
    if isinstance(s, str):
        return json.loads(Path(s).read_text())
    if s is not None:
        return s
    # Standalone use: tokenize with the `tokenizers` library (no torch in this process).
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(spec["model"]) / "tokenizer.json"))
    return protocol.token_streams(protocol.read_documents(spec["data"]),
                                  lambda text: tok.encode(text, add_special_tokens=False).ids, spec["eos"])


def last_logits(llm, logits_all: bool):
    """The logits [vocab] of the last position evaluated (without logits_all the context keeps
    only that row: llama-cpp-python's `scores` is not filled then)."""
    import numpy as np

    if logits_all:
        return np.asarray(llm.scores[llm.n_tokens - 1])
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),)).copy()


def measure(spec: dict) -> dict:
    """One llama.cpp measurement (run in its own process: peak RSS is the process's)."""
    from llama_cpp import Llama

    path = spec["gguf"]
    cpu = common.CpuMeter()
    threads = spec.get("threads") or 1
    # llama.cpp's default KV cache is f16 (logits then differ from a f32 reference by ~1e-4..1e-2,
    # growing with activation size); "kv_f32" makes it f32 (GGML_TYPE_F32 = 0) for exact parity checks.
    kv = {"type_k": 0, "type_v": 0} if spec.get("kv_f32") else {}
    # Logits of every position (an n_ctx x vocab float32 array) are needed only to score text;
    # "logits_all": false leaves them out (decode only: llama.cpp's runtime as a user's would be).
    logits_all = spec.get("logits_all", True)
    if not logits_all and (spec.get("eval_tokens") or spec.get("logits_for")):
        raise ValueError("perplexity and logits_for need logits_all")
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=spec.get("n_ctx", N_CTX), n_batch=spec.get("n_batch", N_BATCH),
                n_ubatch=spec.get("n_batch", N_BATCH), n_threads=threads, n_threads_batch=threads,
                use_mmap=spec.get("use_mmap", False), logits_all=logits_all, verbose=False, **kv)
    out = {"load_s": time.perf_counter() - t0, "policy": "llama.cpp", "model_bytes": os.path.getsize(path),
           "use_mmap": bool(spec.get("use_mmap", False)), "outtype": spec.get("outtype"),
           "kv_cache": "f32" if kv else "f16", "llama_cpp_python": installed_version()}
    if spec.get("eval_tokens"):
        nll, count = 0.0, 0
        t0 = time.perf_counter()
        window = spec.get("window", protocol.WINDOW)
        for stream in protocol.windows(_load_streams(spec), window, spec["eval_tokens"]):
            for ids, targets in stream:
                llm.reset()
                llm.eval(ids)
                nll += log_softmax_nll(llm.scores[:len(ids)], targets)
                count += len(ids)
        dt = time.perf_counter() - t0
        out.update({"ppl": math.exp(nll / count) if count else float("nan"), "nll_per_token": nll / max(count, 1),
                    "tokens": count, "eval_tokens_per_s": count / dt if dt > 0 else 0.0})
    if spec.get("prompts"):
        def prefill(ids):
            llm.reset()
            llm.eval(ids)
            return None, last_logits(llm, logits_all)

        def step(_, token):
            llm.eval([token])
            return last_logits(llm, logits_all)

        meter = common.ReadMeter()
        d = protocol.decode_trials(meter.wrap(prefill), step, spec["prompts"], spec.get("decode_tokens", 64),
                                   trials=spec.get("trials", 3), warmup=spec.get("warmup", 1),
                                   after_warmup=meter.reset, continuations=spec.get("continuations"))
        out.update(d)
        out.update(common.read_figures(meter, d, spec["prompts"], spec.get("decode_tokens", 64),
                                       cold=not spec.get("eval_tokens")))
    if spec.get("logits_for"):  # parity checks: the logits of every position of one id sequence
        llm.reset()
        llm.eval(spec["logits_for"])
        out["logits"] = llm.scores[:len(spec["logits_for"])].tolist()
    llm.close()
    out["peak_rss_bytes"] = _peak_rss()
    out.update(cpu.stop())
    return out


# -- the suite's peer runs -----------------------------------------------------------------------


def _key(spec: dict) -> str:
    return runner.spec_key(spec, prefix="llamacpp-", ignore=("streams", "gguf"))


def mmap_limit(sizes: dict, outtype: str, overhead: int, fraction: float = 0.5) -> int:
    """The cgroup limit of a mmap run: non-expert weights + `fraction` of the expert weights at the
    GGUF's precision + llama.cpp's overhead. `sizes` are the checkpoint's bytes at its own dtype
    (sizes["dtype"]: bfloat16, float32, ...), rescaled to the GGUF's bytes per weight."""
    if sizes.get("dtype") not in common.BYTES_PER_WEIGHT or outtype not in common.BYTES_PER_WEIGHT:
        raise ValueError(f"mmap limits need a float checkpoint and GGUF (dtype {sizes.get('dtype')!r}, "
                         f"outtype {outtype!r})")
    scale = common.BYTES_PER_WEIGHT[outtype] / common.BYTES_PER_WEIGHT[sizes["dtype"]]
    return int(scale * (sizes["nonexpert"] + fraction * sizes["all_experts"])) + int(overhead)


def precisions(checkpoint_dtype: str | None, quick: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(resident, mmap) GGUF types of the peer runs: the checkpoint's own precision first, then the
    quantised ones; the full sweep adds the other of bf16 / f32."""
    own = common.GGUF_TYPE.get(checkpoint_dtype or "", "bf16")
    own = own if own in CONVERTER_TYPES else "bf16"
    other = () if quick else tuple(t for t in MMAP if t != own)
    return (own, *other, "q8_0", "q4_K_M"), (own, *other)


def runtime_overhead(resident: dict) -> int | None:
    """llama.cpp's own memory: peak RSS of a resident (use_mmap=False) run minus its model bytes."""
    if resident.get("returncode") != 0 or not resident.get("peak_rss_bytes"):
        return None
    return max(int(resident["peak_rss_bytes"] - resident["model_bytes"]), 0)


def _streams_file(args, out_dir: Path, eval_tokens: int) -> Path:
    """The held-out token streams as pcmoe's workers make them (pcmoe.protocol), in a file."""
    encode, eos = protocol.tokenizer_encoder(args.model)
    text = json.dumps(protocol.token_streams(protocol.read_documents(args.data), encode, eos, eval_tokens))
    path = out_dir / f"llamacpp-streams-{hashlib.sha1(text.encode()).hexdigest()[:10]}.json"
    if not path.exists():
        atomic_write_text(path, text)
    return path


def _window(model_dir: str) -> int:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return protocol.WINDOW
    return protocol.fit_window(protocol.WINDOW, cfg.get("max_position_embeddings"))


def run_all(args, sizes, overhead, use_cgroup, log, done) -> list[dict]:
    """The llama.cpp peer runs of `pcmoe bench` (see the module docstring). `sizes` are the
    checkpoint's (suite._model_sizes: bytes at its own dtype, sizes["dtype"]); `overhead` is pcmoe's
    (unused: llama.cpp's own is measured here); `log` is runs.jsonl (a path or a common.RunLog),
    `done` the successful records of an earlier sweep by key."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print(f"[llama.cpp] {SKIP_MESSAGE}", file=sys.stderr)
        return [{"label": "llama.cpp", "section": "peers", "returncode": None, "skipped": SKIP_MESSAGE}]
    threads = getattr(args, "threads", 1) or 1
    quick = getattr(args, "quick", False)
    eval_tokens = getattr(args, "eval_tokens", None) or (1024 if quick else 8192)
    decode_tokens = getattr(args, "decode_tokens", None) or (32 if quick else 64)
    n_prompts = getattr(args, "prompts", None) or (2 if quick else 3)
    trials = getattr(args, "trials", None) or 3
    resident_types, mmap_types = precisions(sizes.get("dtype"), quick)
    gguf_dir = Path(getattr(args, "gguf_dir", None) or os.environ.get("PCMOE_GGUF_DIR") or default_gguf_dir(args.model))
    src = getattr(args, "llamacpp_src", None)
    out_dir = Path(getattr(args, "out", None) or gguf_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = log if isinstance(log, common.RunLog) else common.RunLog(log)
    results: list[dict] = []

    def record(rec: dict) -> dict:
        results.append(rec)
        if rec.get("returncode") is not None:
            log.append(rec)
        status = "ok" if rec["returncode"] == 0 else f"FAILED ({rec.get('error')})"
        print(f"[llama.cpp] {rec['label']:28s} {rec.get('wall_s', 0):6.1f}s {status}", file=sys.stderr)
        return rec

    # Conversion, on first need (cached across sweeps): a failure fails the runs that need that file.
    ggufs: dict[str, Path | str] = {}

    def gguf(t: str) -> Path | str:
        """The GGUF of precision t, or the error message of its conversion."""
        if t not in ggufs:
            t0 = time.perf_counter()
            try:
                ggufs[t] = convert(args.model, gguf_path(gguf_dir, args.model, t), t, src=src, threads=threads)
            except Exception as e:  # noqa: BLE001 - reported in the records
                lines = str(e).strip().splitlines()
                ggufs[t] = f"conversion to {t} failed: {lines[-1] if lines else repr(e)}"
            dt = time.perf_counter() - t0
            if dt > 1 and isinstance(ggufs[t], Path):
                print(f"[llama.cpp] converted {t} in {dt:.0f}s -> {ggufs[t]}", file=sys.stderr)
        return ggufs[t]

    encode, _ = protocol.tokenizer_encoder(args.model)
    prompts = protocol.prompts(protocol.read_documents(args.data), encode, n_prompts)
    streams = _streams_file(args, out_dir, eval_tokens)
    base = {"kind": "llamacpp", "model": str(args.model), "model_fp": common.fingerprint(args.model),
            "data": str(args.data), "eval_tokens": eval_tokens, "decode_tokens": decode_tokens, "trials": trials,
            "warmup": 1, "threads": threads, "n_ctx": N_CTX, "n_batch": N_BATCH, "window": _window(args.model),
            "prompts": prompts, "streams": str(streams)}

    resident: dict[str, dict] = {}
    for t in resident_types:
        spec = dict(base, label=f"llama.cpp resident/{t}", section="peers", outtype=t, use_mmap=False)
        key = _key(spec)
        if key in done:
            resident[t] = done[key]
            results.append(done[key])
            continue
        path = gguf(t)
        if not isinstance(path, Path):
            resident[t] = record({"label": spec["label"], "section": "peers", "returncode": 1, "error": path,
                                  "key": key})
            continue
        spec["gguf"] = str(path)
        rec = runner.measure(spec, None, use_cgroup, module=WORKER, evict=[path])
        rec.update(key=key, curve="llama.cpp resident", limit_basis="none: fully resident (use_mmap=False)")
        resident[t] = record(rec)

    for t in mmap_types:
        spec = dict(base, label=f"llama.cpp mmap@50%/{t}", section="peers", outtype=t, use_mmap=True,
                    expert_fraction=0.5)
        key = _key(spec)
        if key in done:
            results.append(done[key])
            continue
        fail = {"label": spec["label"], "section": "peers", "returncode": 1, "key": key}
        measured = runtime_overhead(resident.get(t, {}))
        if not use_cgroup:
            record(dict(fail, returncode=None,
                        skipped="skipped: needs cgroup v1 memory limits (root, /sys/fs/cgroup/memory)"))
            continue
        if measured is None:
            record(dict(fail, returncode=None, skipped=f"skipped: no resident {t} run to measure llama.cpp's overhead"))
            continue
        path = gguf(t)
        if not isinstance(path, Path):
            record(dict(fail, error=path))
            continue
        allowance = measured + ALLOCATOR_SLACK
        limit = mmap_limit(sizes, t, allowance)
        spec["gguf"] = str(path)
        rec = runner.measure(spec, limit, True, module=WORKER, evict=[path])
        rec.update(key=key, overhead_bytes=measured, overhead_allowance_bytes=allowance,
                   budget_bytes=limit - allowance, curve=f"llama.cpp mmap/{t}", mem_pct=50.0,
                   limit_basis="weights at the GGUF's precision + llama.cpp's measured overhead + 64 MiB")
        record(rec)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    return runner.emit(measure(spec), spec, hide=("prompts", "streams", "logits_for"))


if __name__ == "__main__":
    sys.exit(main())
