"""llama.cpp (through llama-cpp-python) as an external peer in `pcmoe bench`.

What it does, for the benchmark's checkpoint:

1. Converts it to GGUF (f32, bf16, q8_0 with the converter vendored in the llama-cpp-python sdist,
   then q4_K_M with `llama_cpp.llama_model_quantize`), cached under `--gguf-dir` (default
   data/llamacpp/gguf/<model name>/) and reused while the checkpoint is unchanged.
   pcmoe's own tokenizers are byte-level BPEs (GPT-2 style) whose pre-tokenizer hash the converter
   does not know: the converter is run through a wrapper (`python -m pcmoe.bench.llamacpp convert
   SRC -- ARGS`) that makes `conversion.base.TextModel.get_vocab_base_pre` fall back to "gpt-2"
   when the hash is unknown. Measurements feed token ids, so the vocabulary only matters for text.
2. Measures each GGUF in a fresh process (`python -m pcmoe.bench.llamacpp '<json spec>'`, the last
   stdout line is the JSON result) with the protocol of pcmoe.bench.worker: perplexity over the same
   held-out token streams (windows of 256 predicted tokens, no overlap), then greedy decode speed,
   peak RSS, the GGUF size as "model_bytes". The file is evicted from the page cache first.
3. Runs: "llama.cpp resident/{CK,q8_0,q4_K_M}" (use_mmap=False, no limit; CK is the checkpoint's own
   precision, bf16 for the shipped LM; the full sweep adds the other of bf16 / f32) and
   "llama.cpp mmap@50%/{CK}" (+ the other in the full sweep): use_mmap=True inside a cgroup memory
   limit of non-expert weights + 50 % of the expert weights, both at the GGUF's precision, +
   llama.cpp's runtime overhead (the peak RSS of the resident run of the same precision minus its
   model bytes) + 64 MiB. Decode speed: one warm-up generation, then the median of `trials` rounds.

The converter source is found in `--llamacpp-src` / $PCMOE_LLAMACPP_SRC (a llama.cpp checkout, an
extracted llama-cpp-python sdist, a folder holding one, or the sdist .tar.gz), else fetched with
`pip download --no-deps --no-binary :all: llama-cpp-python==<installed version>` into the pcmoe
cache ($PCMOE_CACHE or ~/.cache/pcmoe), of which only the converter parts are extracted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from pcmoe.bench import common
from pcmoe.system import atomic_write_text

logger = logging.getLogger("pcmoe.bench.llamacpp")

SKIP_MESSAGE = (common.missing("llama_cpp")
                or "skipped: llama-cpp-python is not installed; pip install 'pcmoe[llamacpp]'")
CONVERTER_TYPES = ("f32", "bf16", "q8_0")  # written by convert_hf_to_gguf.py
QUANTIZED_TYPES = ("q4_K_M",)  # made from the bf16 (else f32) GGUF by llama_model_quantize
OUTTYPES = CONVERTER_TYPES + QUANTIZED_TYPES
RESIDENT = ("bf16", "f32", "q8_0", "q4_K_M")  # every resident precision (the full sweep, a bf16 checkpoint)
MMAP = ("bf16", "f32")
FALLBACK_PRE = "gpt-2"
ALLOCATOR_SLACK = 64 << 20  # the same slack the suite adds to pcmoe's measured overhead
N_CTX = 1024
N_BATCH = 256
WINDOW = 256
# What the sdist is reduced to: the converter script, its model classes and its own gguf-py.
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


# -- finding the converter -----------------------------------------------------------------------


def _cache_root() -> Path:
    return Path(os.environ.get("PCMOE_CACHE") or Path.home() / ".cache" / "pcmoe")


def installed_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("llama-cpp-python")
    except Exception:
        return None


def converter_root(path: str | Path) -> Path | None:
    """The folder holding convert_hf_to_gguf.py, conversion/ and gguf-py/ in or under `path`
    (a llama.cpp tree, an extracted llama-cpp-python sdist, or a folder holding one); None if absent."""
    p = Path(path)
    if not p.is_dir():
        return None
    candidates = [p, p / "vendor" / "llama.cpp"]
    for child in sorted(p.glob("llama_cpp_python-*"), reverse=True):
        candidates.append(child / "vendor" / "llama.cpp")
    for c in candidates:
        if (c / "convert_hf_to_gguf.py").is_file() and (c / "conversion").is_dir() and (c / "gguf-py").is_dir():
            return c
    return None


def _converter_member(name: str) -> str | None:
    """The path under vendor/llama.cpp/ of an sdist member that is part of the converter, else None."""
    marker = "/vendor/llama.cpp/"
    if marker not in name:
        return None
    rel = name.split(marker, 1)[1]
    if rel == CONVERTER_PARTS[0] or any(rel.startswith(d) for d in CONVERTER_PARTS[1:]):
        if ".." in Path(rel).parts or rel.startswith("/"):
            return None
        return rel
    return None


def extract_converter(sdist: str | Path, dest: str | Path) -> Path:
    """Extract only the converter parts of a llama-cpp-python sdist into `dest`; returns `dest`."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist, "r:*") as tar:
        for member in tar.getmembers():
            rel = _converter_member(member.name)
            if rel is None or not (member.isfile() or member.isdir()):
                continue
            target = tmp / rel
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as out:
                out.write(src.read())
    if converter_root(tmp) is None:
        raise RuntimeError(f"{sdist} does not contain vendor/llama.cpp/convert_hf_to_gguf.py")
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def find_converter(src: str | Path | None = None, fetch: bool = True) -> Path:
    """The converter folder: `src`, else $PCMOE_LLAMACPP_SRC, else the cache (fetching the sdist of
    the installed llama-cpp-python version with pip when `fetch`)."""
    for given in (src, os.environ.get("PCMOE_LLAMACPP_SRC")):
        if not given:
            continue
        given = Path(given)
        if given.is_file() and given.name.endswith((".tar.gz", ".tgz", ".tar")):
            dest = _cache_root() / "llamacpp-src" / given.name.split(".tar")[0]
            return converter_root(dest) or extract_converter(given, dest)
        root = converter_root(given)
        if root is None:
            raise RuntimeError(f"no convert_hf_to_gguf.py (with conversion/ and gguf-py/) in {given}")
        return root
    version = installed_version()
    if version is None:
        raise RuntimeError("llama-cpp-python is not installed; pass --llamacpp-src with a llama.cpp source tree")
    dest = _cache_root() / "llamacpp-src" / f"llama_cpp_python-{version}"
    if converter_root(dest):
        return dest
    if not fetch:
        raise RuntimeError(f"no converter in {dest}; pass --llamacpp-src")
    download = _cache_root() / "llamacpp-src" / "sdist"
    download.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(download),
           f"llama-cpp-python=={version}"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    sdists = sorted(download.glob(f"llama_cpp_python-{version}.tar.gz"))
    if p.returncode != 0 or not sdists:
        raise RuntimeError(f"pip download of the llama-cpp-python {version} sdist failed: "
                           f"{(p.stderr.strip().splitlines() or ['?'])[-1]}; pass --llamacpp-src")
    root = extract_converter(sdists[0], dest)
    sdists[0].unlink()  # 77 MB, of which the converter is 2 MB
    return root


# -- conversion ----------------------------------------------------------------------------------


def with_pre_fallback(original, default: str = FALLBACK_PRE):
    """Wrap TextModel.get_vocab_base_pre: an unknown pre-tokenizer hash gives `default` instead of
    NotImplementedError. The fallback is exact for byte-level BPEs with the GPT-2 split regex
    (tokenizers' ByteLevel pre-tokenizer with use_regex=True), which is what pcmoe trains."""

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError as e:
            if "pre-tokenizer" not in str(e):
                raise
            kind = byte_level_kind(tokenizer)
            logger.warning("unknown BPE pre-tokenizer hash (pre-tokenizer %s): writing tokenizer.ggml.pre=%r",
                           kind, default)
            return default

    get_vocab_base_pre.__wrapped__ = original
    return get_vocab_base_pre


def byte_level_kind(tokenizer) -> str:
    """'gpt2-byte-level' when the HF tokenizer pre-tokenizes like GPT-2, else a short description."""
    try:
        pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    except Exception:
        return "unknown"
    return pre_tokenizer_kind(pre)


def pre_tokenizer_kind(pre: dict) -> str:
    """Classify a tokenizer.json "pre_tokenizer" entry."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2-byte-level"
    return str(pre.get("type", "none"))


def patch_converter() -> None:
    """Patch the converter already on sys.path (`conversion` package) in place."""
    from conversion import base

    if not hasattr(base.TextModel.get_vocab_base_pre, "__wrapped__"):
        base.TextModel.get_vocab_base_pre = with_pre_fallback(base.TextModel.get_vocab_base_pre)


def _convert_main(argv: list[str]) -> int:
    """`python -m pcmoe.bench.llamacpp convert SRC -- CONVERTER_ARGS...`: the patched converter."""
    import runpy

    src = Path(argv[0])
    args = argv[argv.index("--") + 1:] if "--" in argv else argv[1:]
    sys.path.insert(0, str(src))
    sys.path.insert(1, str(src / "gguf-py"))
    patch_converter()
    sys.argv = [str(src / "convert_hf_to_gguf.py"), *args]
    runpy.run_path(str(src / "convert_hf_to_gguf.py"), run_name="__main__")
    return 0


def _quantize_main(argv: list[str]) -> int:
    """`python -m pcmoe.bench.llamacpp quantize IN OUT TYPE THREADS`."""
    import ctypes

    import llama_cpp

    src, out, kind, threads = argv[0], argv[1], argv[2], int(argv[3])
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")
    return 0


fingerprint = common.fingerprint  # what a cached GGUF depends on: the checkpoint's files


def default_gguf_dir(model_dir: str | Path) -> Path:
    return Path("data") / "llamacpp" / "gguf" / Path(model_dir).resolve().name


def gguf_path(gguf_dir: str | Path, model_dir: str | Path, outtype: str) -> Path:
    return Path(gguf_dir) / f"{Path(model_dir).resolve().name}-{outtype}.gguf"


def _sibling(out: Path, outtype: str, other: str) -> Path:
    """The GGUF of precision `other` next to `out` (NAME-q4_K_M.gguf -> NAME-bf16.gguf)."""
    suffix = f"-{outtype}.gguf"
    stem = out.name[:-len(suffix)] if out.name.endswith(suffix) else out.stem
    return out.with_name(f"{stem}-{other}.gguf")


def _cached(out: Path, meta: dict) -> bool:
    side = out.with_name(out.name + ".json")
    if not (out.is_file() and side.is_file()):
        return False
    try:
        return json.loads(side.read_text()).get("source") == meta
    except ValueError:
        return False


def _mark(out: Path, meta: dict, **extra) -> None:
    atomic_write_text(out.with_name(out.name + ".json"), json.dumps(dict(extra, source=meta), indent=1))


def _run_checked(cmd: list[str], what: str, env: dict | None = None) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{what} failed (exit {p.returncode}):\n{tail}")


def convert(model_dir: str | Path, out_gguf: str | Path, outtype: str, src: str | Path | None = None,
            threads: int = 1, force: bool = False) -> Path:
    """Write the checkpoint as a GGUF of `outtype` (f32, bf16, q8_0, q4_K_M); reuses a cached file
    converted from the same checkpoint files. q4_K_M is quantised from the bf16 (else f32) GGUF
    next to `out_gguf`, which is made first if missing."""
    model_dir, out = Path(model_dir), Path(out_gguf)
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {OUTTYPES}, not {outtype!r}")
    meta = dict(fingerprint(model_dir), outtype=outtype)
    if outtype in QUANTIZED_TYPES:  # made by the installed llama.cpp
        meta["llama_cpp_python"] = installed_version()
    if not force and _cached(out, meta):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".part{os.getpid()}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use its own gguf-py
    t0 = time.perf_counter()
    try:
        if outtype in CONVERTER_TYPES:
            root = find_converter(src)
            _run_checked([sys.executable, "-m", "pcmoe.bench.llamacpp", "convert", str(root), "--", str(model_dir),
                          "--outfile", str(tmp), "--outtype", outtype], f"convert_hf_to_gguf ({outtype})", env)
        else:
            base = next((p for b in ("bf16", "f32") if _cached(p := _sibling(out, outtype, b),
                                                                  dict(fingerprint(model_dir), outtype=b))), None)
            if base is None:
                base = convert(model_dir, _sibling(out, outtype, "bf16"), "bf16", src=src, threads=threads)
            _run_checked([sys.executable, "-m", "pcmoe.bench.llamacpp", "quantize", str(base), str(tmp), outtype,
                          str(threads)], f"llama_model_quantize ({outtype})", env)
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    _mark(out, meta, seconds=round(time.perf_counter() - t0, 1), bytes=out.stat().st_size)
    return out


# -- measurement (the worker process) ------------------------------------------------------------


def evict(path: str | Path) -> None:
    """Drop a file's pages from the page cache (the next read is cold)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages (a file just written) would stay cached
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def windows(streams: list[list[int]], eval_tokens: int, window: int = WINDOW):
    """The pcmoe.evaluate protocol: yields (ids fed, targets) per window of up to `window` predicted
    tokens, consecutive, no overlap, stopping after `eval_tokens` predicted tokens in all."""
    total = min(sum(max(len(s) - 1, 0) for s in streams), eval_tokens)
    count = 0
    for stream in streams:
        if count >= total:
            break
        for start in range(0, len(stream) - 1, window):
            piece = stream[start:start + window + 1]
            n = min(len(piece) - 1, total - count)
            if n <= 0:
                break
            yield piece[:n], piece[1:n + 1]
            count += n


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

    from pcmoe.evaluate import read_documents

    tok = Tokenizer.from_file(str(Path(spec["model"]) / "tokenizer.json"))
    eos = spec["eos"]
    return [[eos] + tok.encode(d, add_special_tokens=False).ids + [eos] for d in read_documents(spec["data"])]


def measure(spec: dict) -> dict:
    """One llama.cpp measurement (run in its own process: peak RSS is the process's)."""
    import numpy as np
    from llama_cpp import Llama

    path = spec["gguf"]
    cpu = common.CpuMeter()
    if spec.get("evict", True):
        evict(path)
    threads = spec.get("threads") or 1
    # llama.cpp's default KV cache is f16 (logits then differ from a f32 reference by ~1e-4..1e-2,
    # growing with activation size); "kv_f32" makes it f32 (GGML_TYPE_F32 = 0) for exact parity checks.
    kv = {"type_k": 0, "type_v": 0} if spec.get("kv_f32") else {}
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=spec.get("n_ctx", N_CTX), n_batch=spec.get("n_batch", N_BATCH),
                n_ubatch=spec.get("n_batch", N_BATCH), n_threads=threads, n_threads_batch=threads,
                use_mmap=spec.get("use_mmap", False), logits_all=True, verbose=False, **kv)
    out = {"load_s": time.perf_counter() - t0, "policy": "llama.cpp", "model_bytes": os.path.getsize(path),
           "use_mmap": bool(spec.get("use_mmap", False)), "outtype": spec.get("outtype"),
           "kv_cache": "f32" if kv else "f16", "llama_cpp_python": installed_version()}
    if spec.get("eval_tokens"):
        nll, count = 0.0, 0
        t0 = time.perf_counter()
        for ids, targets in windows(_load_streams(spec), spec["eval_tokens"], spec.get("window", WINDOW)):
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
            return None, np.asarray(llm.scores[llm.n_tokens - 1])

        def step(_, token):
            llm.eval([token])
            return np.asarray(llm.scores[llm.n_tokens - 1])

        out.update(common.decode_trials(prefill, step, spec["prompts"], spec.get("decode_tokens", 64),
                                        trials=spec.get("trials", 3), warmup=spec.get("warmup", 1)))
    if spec.get("logits_for"):  # parity checks: the logits of every position of one id sequence
        llm.reset()
        llm.eval(spec["logits_for"])
        out["logits"] = llm.scores[:len(spec["logits_for"])].tolist()
    llm.close()
    out["peak_rss_bytes"] = _peak_rss()
    out.update(cpu.stop())
    return out


# -- the suite's peer runs -----------------------------------------------------------------------


def _worker_cmd(spec: dict) -> list[str]:
    return [sys.executable, "-m", "pcmoe.bench.llamacpp", json.dumps(spec)]


def run_spec(spec: dict, limit: int | None, use_cgroup: bool, timeout: float = 7200) -> dict:
    """Run one measurement in a fresh process (inside a cgroup when `use_cgroup`), like suite.run_one."""
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.get("threads") or 1))
    extra = {}
    if use_cgroup:
        from pcmoe.bench.cgroup import run_limited

        r = run_limited(_worker_cmd(spec), limit, env=env, timeout=timeout)
        rc, stdout, stderr = r.returncode, r.stdout, r.stderr
        extra = {"cgroup_limit_bytes": limit, "cgroup_max_usage_bytes": r.max_usage_bytes,
                 "cgroup_failcnt": r.failcnt, "oom_killed": r.oom_killed}
        if r.timed_out:
            extra["timed_out"] = True
    else:
        try:
            p = subprocess.run(_worker_cmd(spec), capture_output=True, text=True, timeout=timeout, env=env)
            rc, stdout, stderr = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired:
            rc, stdout, stderr, extra = 124, "", f"timed out after {timeout:g} s", {"timed_out": True}
    result = {"label": spec["label"], "section": spec["section"], "returncode": rc,
              "wall_s": time.perf_counter() - t0}
    result.update(extra)
    if rc == 0:
        try:
            result.update(json.loads(stdout.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            result.update(returncode=1, error="the worker printed no JSON result")
    else:
        result["error"] = (stderr.strip().splitlines() or [f"(no output, exit {rc})"])[-1][:500]
    return result


def _key(spec: dict) -> str:
    keep = {k: v for k, v in spec.items() if k not in ("prompts", "streams", "gguf")}
    return "llamacpp-" + hashlib.sha1(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]


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
    """Tokenize the held-out documents exactly as pcmoe's workers do (AutoTokenizer, [eos]+ids+[eos])."""
    from transformers import AutoTokenizer

    from pcmoe.evaluate import read_documents

    tok = AutoTokenizer.from_pretrained(args.model)
    eos = tok.eos_token_id
    streams, total = [], 0
    for doc in read_documents(args.data):
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        s = ([eos] if eos is not None else []) + ids + ([eos] if eos is not None else [])
        streams.append(s)
        total += len(s) - 1
        if total >= eval_tokens:
            break
    text = json.dumps(streams)
    path = out_dir / f"llamacpp-streams-{hashlib.sha1(text.encode()).hexdigest()[:10]}.json"
    if not path.exists():
        atomic_write_text(path, text)
    return path


def _window(model_dir: str) -> int:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return WINDOW
    return min(WINDOW, cfg.get("max_position_embeddings") or WINDOW)


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
    from pcmoe.bench.suite import _prompts

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

    prompts = _prompts(args.model, args.data, n_prompts)
    streams = _streams_file(args, out_dir, eval_tokens)
    base = {"kind": "llamacpp", "model": str(args.model), "model_fp": fingerprint(args.model), "data": str(args.data),
            "eval_tokens": eval_tokens, "decode_tokens": decode_tokens, "trials": trials, "warmup": 1,
            "threads": threads, "n_ctx": N_CTX, "n_batch": N_BATCH, "window": _window(args.model),
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
        rec = run_spec(spec, None, use_cgroup)
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
        rec = run_spec(spec, limit, True)
        rec.update(key=key, overhead_bytes=measured, overhead_allowance_bytes=allowance,
                   budget_bytes=limit - allowance, curve=f"llama.cpp mmap/{t}", mem_pct=50.0,
                   limit_basis="weights at the GGUF's precision + llama.cpp's measured overhead + 64 MiB")
        record(rec)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "convert":
        return _convert_main(argv[1:])
    if argv and argv[0] == "quantize":
        return _quantize_main(argv[1:])
    spec = json.loads(argv[0])
    result = measure(spec)
    result["spec"] = {k: v for k, v in spec.items() if k not in ("prompts", "streams", "logits_for")}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
