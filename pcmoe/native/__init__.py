"""pcmoe's native decode kernels (kernels.c): build, load, and torch-facing wrappers.

    python -m pcmoe.native build      # scripts/setup.sh runs this; needs gcc (or $CC)
    python -m pcmoe.native status     # which path a load would take, and why

The library is plain C called through ctypes (no torch headers, so it builds in seconds with any
gcc >= 10). It is looked for in $PCMOE_NATIVE_DIR, else pcmoe/native/_build, under a name that
carries a hash of the source and flags: a changed kernels.c is never loaded stale. Where it is
missing, cannot load, or the CPU lacks AVX-512 BF16, `kernels()` returns None with the reason and
pcmoe runs its eager torch path (the slow twin the tests compare against). Quantised (int8/int4)
experts use AVX-512 VNNI where the CPU has it (`Kernels.vnni`), else float32 kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels.c")
# Further C files compiled into the same library, each its own translation unit (static names do
# not clash); listed here by name, so a file being written beside kernels.c changes nothing until
# it is added. (pcmoe/native/shadow.c builds its own library today: pcmoe.shadow.)
EXTRA_SOURCES: tuple[str, ...] = ()


def sources() -> list[Path]:
    return [SOURCE] + [SOURCE.with_name(name) for name in EXTRA_SOURCES]
FLAGS = ["-O3", "-std=c11", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma",
         "-fPIC", "-shared", "-fvisibility=hidden"]
ABI_VERSION = 3
KERNELS = ("auto", "eager", "native")
NO_VNNI = ("this CPU lacks AVX-512 VNNI/VBMI: int8/int4 experts run the native float32 kernels, slower than "
           "their bytes allow")


def native_dir() -> Path:
    return Path(os.environ.get("PCMOE_NATIVE_DIR") or Path(__file__).with_name("_build"))


def library_path() -> Path:
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in sources()) + " ".join(FLAGS).encode()).hexdigest()[:12]
    return native_dir() / f"libpcmoe_kernels-{digest}.so"


def build(verbose: bool = True) -> Path:
    """Compile kernels.c (and EXTRA_SOURCES) into library_path() (atomically: a temporary file,
    then a rename)."""
    out = library_path()
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler found (install gcc, or set CC)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_lib = Path(tmp) / out.name
        cmd = [cc, *FLAGS, *map(str, sources()), "-o", str(tmp_lib), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()}")
        os.replace(tmp_lib, out)
    if verbose:
        print(f"built {out}")
    return out


class Kernels:
    """The loaded library with typed entry points."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        sig = {
            "pcmoe_linear_bf16": [p, p, p, p, i, i, i, i, p],
            "pcmoe_glu_expert": [i, p, p, p, p, i, i, p, p, i, i, p],
            "pcmoe_combine": [p, p, p, i, p, i, p],
            "pcmoe_rmsnorm_bf16": [p, p, p, i, i, f, p],
            "pcmoe_attention_bf16": [p, p, p, p, i, i, i, i, i, f, p],
            "pcmoe_to_bf16": [p, p, i],
            "pcmoe_set_threads": [i],
            "pcmoe_gemv_quant": [i, i, p, p, i, i, p, p, i, i, p],
            "pcmoe_gemv_bf16": [p, p, p, i, i],
            "pcmoe_quantize_activation": [p, i, p, p, p],
            "pcmoe_use_vnni": [i],
            "pcmoe_vnni_supported": [],
            "pcmoe_act_scratch_floats": [i],
            "pcmoe_attention_block": [p, p, p, f, p, p, i, p, p, f, f, p, p, p, p, i, i, p, p, p, f, i, i, i, i,
                                      f, p],
            "pcmoe_attention_block_quant": [i, i, i, p, p, p, f, p, p, p, i, p, p, f, f, p, p, p, p, i, i, p, p, p, p,
                                            f, i, i, i, i, f, p],
            "pcmoe_attention_scratch_floats": [i, i, i, i, i],
        }
        for name, args in sig.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, None
            setattr(self, name.removeprefix("pcmoe_"), fn)
        for name in ("pcmoe_set_threads", "pcmoe_use_vnni", "pcmoe_vnni_supported", "pcmoe_act_scratch_floats",
                     "pcmoe_attention_scratch_floats"):
            getattr(lib, name).restype = ctypes.c_int
        # int8/int4 experts: VNNI integer dot products where the CPU has them (AVX-512 VNNI and
        # VBMI), else the float32 kernels, correct but slower (the loader says so in one line).
        lib.pcmoe_stream_read.argtypes, lib.pcmoe_stream_read.restype = [p, ctypes.c_longlong], ctypes.c_ulonglong
        self.stream_read = lib.pcmoe_stream_read
        self.vnni = bool(lib.pcmoe_use_vnni(1))


_loaded: tuple[Kernels | None, str] | None = None


def kernels() -> Kernels | None:
    """The native kernels, or None (see why())."""
    return _load()[0]


def why() -> str:
    """'native' when the kernels load, else the reason they do not."""
    return _load()[1]


def _load() -> tuple[Kernels | None, str]:
    global _loaded
    if _loaded is None:
        _loaded = _try_load()
    return _loaded


def _try_load() -> tuple[Kernels | None, str]:
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return None, f"native kernels are for x86-64 Linux, not {sys.platform}/{os.uname().machine}"
    path = library_path()
    if not path.exists():
        return None, f"native kernels are not built ({path.name} missing; run `python -m pcmoe.native build`)"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"native kernels do not load ({e})"
    if lib.pcmoe_abi_version() != ABI_VERSION:
        return None, "native kernels are from another pcmoe version; rebuild them"
    if not lib.pcmoe_cpu_supported():
        return None, "this CPU lacks AVX-512 BF16, which the native kernels need"
    return Kernels(lib), "native"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["build"]:
        try:
            build()
        except (RuntimeError, OSError) as e:
            print(f"warning: native kernels not built, pcmoe will use its eager path: {e}", file=sys.stderr)
            return 1
        return 0
    if argv[:1] == ["status"]:
        print(why())
        return 0
    print("usage: python -m pcmoe.native build|status", file=sys.stderr)
    return 2
