"""The checkpoint as a GGUF, for the llama.cpp peer (pcmoe.bench.llamacpp).

Converts it to f32, bf16 or q8_0 with the converter vendored in the llama-cpp-python sdist, and to
q4_K_M with `llama_cpp.llama_model_quantize` from the bf16 (else f32) file; every file is cached
beside a note of what it was made from (the checkpoint's fingerprint, the type) and reused while
the checkpoint is unchanged. pcmoe's own tokenizers are byte-level BPEs (GPT-2 style) whose
pre-tokenizer hash the converter does not know: the converter is run through a wrapper
(`python -m pcmoe.bench.gguf convert SRC -- ARGS`) that makes
`conversion.base.TextModel.get_vocab_base_pre` fall back to "gpt-2" when the hash is unknown.

The converter source is found in `--llamacpp-src` / $PCMOE_LLAMACPP_SRC (a llama.cpp checkout, an
extracted llama-cpp-python sdist, a folder holding one, or the sdist .tar.gz), else fetched with
`pip download --no-deps --no-binary :all: llama-cpp-python==<installed version>` into the pcmoe
cache ($PCMOE_CACHE or ~/.cache/pcmoe), of which only the converter parts are extracted.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from pcmoe.bench.common import fingerprint
from pcmoe.system import atomic_write_text

logger = logging.getLogger("pcmoe.bench.gguf")

CONVERTER_TYPES = ("f32", "bf16", "q8_0")  # written by convert_hf_to_gguf.py
QUANTIZED_TYPES = ("q4_K_M",)  # made from the bf16 (else f32) GGUF by llama_model_quantize
OUTTYPES = CONVERTER_TYPES + QUANTIZED_TYPES
FALLBACK_PRE = "gpt-2"
# What the sdist is reduced to: the converter script, its model classes and its own gguf-py.
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


# -- finding the converter -----------------------------------------------------------------------


def _cache_root() -> Path:
    from pcmoe.system import cache_root

    return cache_root()


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
    """`python -m pcmoe.bench.gguf convert SRC -- CONVERTER_ARGS...`: the patched converter."""
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
    """`python -m pcmoe.bench.gguf quantize IN OUT TYPE THREADS`."""
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


def source(model_dir: str | Path, outtype: str) -> dict:
    """What a GGUF of `outtype` is made from: the checkpoint's contents (the bench fingerprint)."""
    return {"fingerprint": fingerprint(model_dir), "outtype": outtype}


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
    meta = source(model_dir, outtype)
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
            _run_checked([sys.executable, "-m", "pcmoe.bench.gguf", "convert", str(root), "--", str(model_dir),
                          "--outfile", str(tmp), "--outtype", outtype], f"convert_hf_to_gguf ({outtype})", env)
        else:
            base = next((p for b in ("bf16", "f32") if _cached(p := _sibling(out, outtype, b),
                                                                  source(model_dir, b))), None)
            if base is None:
                base = convert(model_dir, _sibling(out, outtype, "bf16"), "bf16", src=src, threads=threads)
            _run_checked([sys.executable, "-m", "pcmoe.bench.gguf", "quantize", str(base), str(tmp), outtype,
                          str(threads)], f"llama_model_quantize ({outtype})", env)
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    _mark(out, meta, seconds=round(time.perf_counter() - t0, 1), bytes=out.stat().st_size)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m pcmoe.bench.gguf convert SRC -- ARGS` or `... quantize IN OUT TYPE THREADS`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "convert":
        return _convert_main(argv[1:])
    if argv and argv[0] == "quantize":
        return _quantize_main(argv[1:])
    raise SystemExit("usage: python -m pcmoe.bench.gguf convert SRC -- ARGS | quantize IN OUT TYPE THREADS")


if __name__ == "__main__":
    sys.exit(main())
