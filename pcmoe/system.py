"""What pcmoe asks of the operating system: atomic file writes, page-cache eviction, RSS.

Torch-free, so that command-line checks and the bench's parent process import it cheaply.
"""

from __future__ import annotations

import os
import resource
import threading
from pathlib import Path


class WriteError(OSError):
    """A file could not be written; the message names the file and the reason."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where pcmoe keeps what it derives from a checkpoint (quantised copies, norms, shadows, server
    state): `cache_dir`, else $PCMOE_CACHE, else ~/.cache/pcmoe."""
    return Path(cache_dir or os.environ.get("PCMOE_CACHE") or Path.home() / ".cache" / "pcmoe")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never a part, even after a
    crash: a unique temporary file beside it, flushed to disk, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:  # the cleanup must not hide the first error (a folder we cannot write to at all)
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise WriteError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def check_writable(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be written as a file (None if it can): checked before long work, so a
    bad --out fails in a second and not after the work is done."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a directory; give a file name"
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write into {parent} (permission denied)"
    if path.exists() and not os.access(path, os.W_OK):
        return f"cannot overwrite {path} (permission denied)"
    return None


def evict_file(path: str | os.PathLike) -> None:
    """Drop a file's pages from the page cache, so that the next read comes from the disk. Dirty
    pages (a file just written) are flushed first: fadvise leaves them cached otherwise."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far. VmHWM belongs to this process image: unlike
    getrusage's ru_maxrss it does not carry over, through fork and exec, the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_free_memory() -> None:
    """Hand memory that Python and torch freed back to the OS now (glibc's malloc_trim): a shrunken
    slot bank then really lowers the RSS. A no-op where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
