"""Read a Hugging Face checkpoint folder without memory-mapping it.

We parse the safetensors headers ourselves so that every tensor is known by file and byte range.
Headers are read without torch (torch is imported on the first read), so what a checkpoint holds
can be told in a fraction of a second (pcmoe.sizes, `pcmoe info`).
Reads go through `os.preadv` straight into a caller's buffer (a slot of an expert bank, or a fresh
tensor), and the range is then dropped from the page cache: memory stays what the runtime
allocated, and every expert load costs a real disk read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path


class CheckpointError(Exception):
    """A checkpoint folder that pcmoe cannot use; the message says what is wrong and what to do."""


# safetensors dtype -> (torch dtype name, bytes per element, floating point)
DTYPES = {
    "F32": ("float32", 4, True), "F16": ("float16", 2, True), "BF16": ("bfloat16", 2, True),
    "F64": ("float64", 8, True), "I64": ("int64", 8, False), "I32": ("int32", 4, False),
    "I16": ("int16", 2, False), "I8": ("int8", 1, False), "U8": ("uint8", 1, False), "BOOL": ("bool", 1, False),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype_code: str  # as in the header: "BF16", "F32", ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def dtype(self):
        return _torch_dtype(self.dtype_code)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype_code][1]

    @property
    def is_floating_point(self) -> bool:
        return DTYPES[self.dtype_code][2]

    def slice0(self, index: int) -> TensorInfo:
        """The contiguous sub-tensor `t[index]` of a tensor stacked along dim 0."""
        per = self.nbytes // self.shape[0]
        return TensorInfo(f"{self.name}[{index}]", self.file, self.dtype_code, self.shape[1:],
                          self.offset + index * per, per)


@functools.cache
def _torch_dtype(code: str):
    import torch

    return getattr(torch, DTYPES[code][0])


def _read_header(path: Path) -> dict[str, TensorInfo]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated (no safetensors header); re-download or re-save it")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > min(size, 100 << 20):
            raise CheckpointError(f"{path} is not a safetensors file (bad header length); re-save it")
        try:
            header = json.loads(f.read(hlen))
        except ValueError as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header ({e}); re-save it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not a JSON object); re-save it")
    header.pop("__metadata__", None)
    base = 8 + hlen
    out = {}
    for name, meta in header.items():
        if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= set(meta):
            raise CheckpointError(f"{path}: the header entry of tensor {name} is malformed; re-save the checkpoint")
        if meta["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {meta['dtype']}, which pcmoe does not support")
        start, end = meta["data_offsets"]
        if base + end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name} ends at byte {base + end} but the file has {size} bytes; "
                "re-download or re-save the checkpoint")
        out[name] = TensorInfo(name, path, meta["dtype"], tuple(meta["shape"]), base + start, end - start)
    return out


def read_config_dict(folder: str | os.PathLike) -> dict:
    """config.json of a checkpoint folder, with clear errors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist; pass the folder that "
                              "holds config.json and the *.safetensors files")
    cfg = folder / "config.json"
    if not cfg.exists():
        raise CheckpointError(f"{folder} has no config.json; is it a Hugging Face checkpoint folder?")
    try:
        data = json.loads(cfg.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg} does not hold a JSON object")
    return data


class Checkpoint:
    """The tensors of a checkpoint folder, by name, plus its config.json."""

    def __init__(self, folder: str | os.PathLike, config_dict: dict | None = None):
        self.folder = Path(folder)
        self.config_dict = config_dict if config_dict is not None else read_config_dict(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:
                listed = {self.folder / f for f in json.loads(index.read_text())["weight_map"].values()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index} is corrupt ({type(e).__name__}: {e}); re-download it, or delete it "
                                      "if the folder holds a single model.safetensors") from None
            missing = [p.name for p in listed if not p.exists()]
            if missing:
                raise CheckpointError(f"{self.folder} is missing shard(s) {', '.join(sorted(missing))} "
                                      "named in model.safetensors.index.json; download them")
            files = sorted(listed)
        if not files:
            raise CheckpointError(f"{self.folder} has no *.safetensors files (pcmoe reads safetensors only; "
                                  "convert .bin checkpoints with save_pretrained)")
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            self.tensors.update(_read_header(f))
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    # -- file handles ------------------------------------------------------------------------

    def fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                fd = os.open(path, os.O_RDONLY)
                if hasattr(os, "posix_fadvise"):
                    # Random access: no readahead, so nothing beyond what we ask for enters the cache.
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                self._fds[path] = fd
            return self._fds[path]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def fingerprint(self) -> str:
        """Identifies the checkpoint's contents cheaply: every tensor's name, dtype, shape and place,
        and 4 kB samples at 33 evenly spread offsets of each file (re-saved weights of the same shapes
        change the samples). Not mtimes: a fresh clone must still match the norms shipped beside it."""
        h = hashlib.sha1()
        for name in sorted(self.tensors):
            t = self.tensors[name]
            torch_name = f"torch.{DTYPES[t.dtype_code][0]}"  # the value of earlier versions: keep it
            h.update(f"{name}:{t.file.name}:{torch_name}:{t.shape}:{t.offset}:{t.nbytes};".encode())
        for path in sorted({t.file for t in self.tensors.values()}):
            size = path.stat().st_size
            h.update(f"{path.name}:{size}".encode())
            with open(path, "rb") as f:
                for i in range(33):
                    f.seek(max(0, min(size - 4096, size * i // 32)))
                    h.update(f.read(4096))
        return h.hexdigest()[:16]

    # -- reads -------------------------------------------------------------------------------

    def read_into(self, info: TensorInfo, dest, evict: bool = True) -> None:
        """Read a tensor's bytes into `dest` (contiguous, same dtype and number of elements)."""
        import torch

        if dest.dtype != info.dtype or not dest.is_contiguous() or dest.numel() * dest.element_size() != info.nbytes:
            raise ValueError(f"read_into: destination does not match {info.name} ({info.dtype}, {info.shape})")
        buf = memoryview(dest.reshape(-1).view(torch.uint8).numpy())
        fd = self.fd(info.file)
        done = 0
        while done < info.nbytes:
            n = os.preadv(fd, [buf[done:]], info.offset + done)
            if n <= 0:
                raise OSError(f"short read of {info.name} from {info.file} at byte {info.offset + done}")
            done += n
        if evict and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, info.offset, info.nbytes, os.POSIX_FADV_DONTNEED)

    def read(self, info: TensorInfo, dtype=None, evict: bool = True):
        """A new tensor holding the data, converted to `dtype` if given."""
        import torch

        out = torch.empty(info.shape, dtype=info.dtype)
        self.read_into(info, out, evict=evict)
        return out if dtype is None or dtype == info.dtype else out.to(dtype)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]
