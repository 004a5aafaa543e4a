"""Quantised copies of a checkpoint's experts: an int8/int4 committee reads int8/int4 bytes.

Without a copy, a quantised bank reads each expert at the checkpoint's precision and quantises it
on the I/O thread, so an int4 swap reads 4x the bytes it keeps. Here every expert of a quantised
layer is quantised once (by the same `quantize_into` as on the fly, so the slots get the same
bits) and written to one safetensors file per (precision, layer):

    <checkpoint>/pcmoe_quant/experts-int4-bfloat16-layer003.safetensors
    $PCMOE_CACHE (or ~/.cache/pcmoe)/<checkpoint fingerprint>/quant/...   if the folder is read-only

The tensors are named `<expert>.<slot tensor>` ("5.gate_up.q", "5.gate_up.s", ...), laid out as
the bank's slots are, so the store reads them straight into a slot. The file's metadata carries
the source's fingerprint (Checkpoint.fingerprint), the precision, dtype and layout: a copy that no
longer matches its checkpoint is rebuilt. Files are written to a temporary name and renamed.
$PCMOE_QUANT_COPY=0 turns copies off (quantise on the fly, nothing written). A first quantised
load writes them (with a progress bar); to write them ahead:

    python -m pcmoe.qcache_build <checkpoint> [--quantize int8,int4]
"""

from __future__ import annotations

import json
import os
import secrets
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pcmoe.checkpoint import DTYPES, Checkpoint, CheckpointError, _read_header
from pcmoe.moe import bank_tensors, expert_buffer
from pcmoe.quant import quantize_into
from pcmoe.store import ExpertStore, Piece
from pcmoe.system import cache_root

FORMAT = "pcmoe-quant/2"   # /2: int4 groups refitted by least squares (quant._refit); /1 copies are rebuilt
FOLDER = "pcmoe_quant"
_CODES = {v[0]: k for k, v in DTYPES.items()}  # torch dtype name -> safetensors code


@dataclass
class Copies:
    """What ensure() found or built."""

    pieces: dict[int, list[list[Piece]]] = field(default_factory=dict)  # layer -> [expert] -> pieces
    files: dict[int, Path] = field(default_factory=dict)
    built: list[int] = field(default_factory=list)     # layers written by this load
    rebuilt: list[int] = field(default_factory=list)   # of those, the ones whose old copy was stale
    missing: list[int] = field(default_factory=list)   # quantised layers left to quantise on the fly

    def describe(self) -> str:
        if not self.files:
            return "none" if not self.missing else "on the fly (no writable place for a copy)"
        where = sorted({str(p.parent) for p in self.files.values()})
        built = f", built {len(self.built)}" if self.built else ""
        return f"{len(self.files)} layer(s) in {', '.join(where)}{built}"


def enabled() -> bool:
    return os.environ.get("PCMOE_QUANT_COPY", "1") not in ("0", "no", "off", "false")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def file_name(mode: str, dtype: torch.dtype, layer: int) -> str:
    return f"experts-{mode}-{_dtype_name(dtype)}-layer{layer:03d}.safetensors"


def expected_metadata(source: str, mode: str, dtype: torch.dtype, layer: int, num_experts: int,
                      layout: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, str]:
    """What a valid copy's metadata says (all strings, as safetensors wants)."""
    return {"format": FORMAT, "source": source, "mode": mode, "dtype": _dtype_name(dtype), "layer": str(layer),
            "experts": str(num_experts),
            "layout": json.dumps({k: [list(s), _dtype_name(d)] for k, (s, d) in layout.items()}, sort_keys=True)}


def read_metadata(path: Path) -> dict | None:
    """The __metadata__ of a safetensors file, or None if it cannot be read."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 << 20:
                return None
            return json.loads(f.read(n)).get("__metadata__")
    except (OSError, ValueError, struct.error, AttributeError):
        return None


def _pieces(path: Path, num_experts: int, layout) -> list[list[Piece]] | None:
    """The copy's tensors as the store's pieces, or None if the file does not hold them all."""
    try:
        infos = _read_header(path)
    except (CheckpointError, OSError):
        return None
    out = []
    for e in range(num_experts):
        expert = []
        for name, (shape, dtype) in layout.items():
            info = infos.get(f"{e}.{name}")
            if info is None or info.shape != tuple(shape) or info.dtype != dtype:
                return None
            expert.append(Piece(info, name))
        out.append(expert)
    return out


def _places(folder: Path, source: str, cache_dir) -> list[Path]:
    """Where copies live, in the order they are looked for and written."""
    return [folder / FOLDER, cache_root(cache_dir) / source / "quant"]


def _create(path: Path) -> int:
    """A new file for writing (the umask applies, unlike mkstemp's private files); OSError where
    the folder is read-only."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)


def write_layer(path: Path, store: ExpertStore, layer: int, kernel, dtype: torch.dtype, mode: str,
                metadata: dict[str, str], progress=None) -> None:
    """Quantise every expert of `layer` as a bank's commit() would and write them to `path`
    (atomically). Streams one expert at a time: memory is one expert at full and quantised size."""
    layout = bank_tensors(kernel, dtype, mode)
    num_experts = len(store.source_pieces[layer])
    header, offset = {"__metadata__": metadata}, 0
    for e in range(num_experts):
        for name, (shape, dt) in layout.items():
            n = torch.Size(shape).numel() * dt.itemsize
            header[f"{e}.{name}"] = {"dtype": _CODES[_dtype_name(dt)], "shape": list(shape),
                                     "data_offsets": [offset, offset + n]}
            offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)                                    # data starts 8-byte aligned
    staged = expert_buffer(kernel, dtype)
    slot = {name: torch.empty(shape, dtype=dt) for name, (shape, dt) in layout.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = _create(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            experts = range(num_experts)
            for e in (progress(experts) if progress else experts):
                store.read_source(layer, e, staged)
                for name, w in staged.items():
                    if name in kernel.linear_weights:
                        quantize_into(w, slot[name + ".q"], slot[name + ".s"], mode)
                    else:
                        slot[name].copy_(w)
                for name in layout:
                    f.write(slot[name].contiguous().view(torch.uint8).numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure(ckpt: Checkpoint, store: ExpertStore, kernel, dtype: torch.dtype, quants: list, *, cache_dir=None,
           progress=None) -> Copies:
    """The copies of every quantised layer (quants[layer] = "int8"/"int4"/None): found valid, else
    built beside the checkpoint, else in the cache. progress(iterable, desc) wraps a build."""
    out = Copies()
    layers = [i for i, q in enumerate(quants) if q]
    if not layers or not enabled():
        return out
    source = ckpt.fingerprint()
    places = _places(ckpt.folder, source, cache_dir)
    for layer in layers:
        mode = quants[layer]
        layout = bank_tensors(kernel, dtype, mode)
        num_experts = len(store.source_pieces[layer])
        meta = expected_metadata(source, mode, dtype, layer, num_experts, layout)
        name = file_name(mode, dtype, layer)
        stale = False
        for place in places:
            path = place / name
            if not path.exists():
                continue
            pieces = _pieces(path, num_experts, layout) if read_metadata(path) == meta else None
            if pieces is not None:
                out.pieces[layer], out.files[layer] = pieces, path
                break
            stale = True
        if layer in out.pieces:
            continue
        for place in places:
            path = place / name
            try:
                write_layer(path, store, layer, kernel, dtype, mode, meta,
                            progress and (lambda it, m=mode, i=layer: progress(it, f"{m} copy of layer {i}")))
            except OSError:
                continue  # read-only (or full): the next place
            pieces = _pieces(path, num_experts, layout)
            if pieces is not None:
                out.pieces[layer], out.files[layer] = pieces, path
                out.built.append(layer)
                if stale:
                    out.rebuilt.append(layer)
                break
        else:
            out.missing.append(layer)
    return out


def attach(ckpt: Checkpoint, store: ExpertStore, banks: list, kernel, dtype: torch.dtype, quants: list, *,
           cache_dir=None, progress=None) -> Copies:
    """ensure() the copies and serve from them: the store reads these layers quantised and their
    banks take the bytes as they come. Says in one warning line what was rebuilt or left out."""
    import warnings

    from pcmoe.options import PcmoeWarning

    copies = ensure(ckpt, store, kernel, dtype, quants, cache_dir=cache_dir, progress=progress)
    store.use_copies(copies.pieces)
    for layer in copies.pieces:
        banks[layer].stored_quantised = True
    if copies.rebuilt:
        warnings.warn(f"the quantised expert copy of layer(s) {', '.join(map(str, copies.rebuilt))} no longer "
                      "matched its checkpoint and was rebuilt", PcmoeWarning, stacklevel=3)
    if copies.missing:
        warnings.warn(f"no writable place for a quantised expert copy ({ckpt.folder / FOLDER} or "
                      f"{cache_root(cache_dir)}): experts are quantised as they are read, at full-precision "
                      "I/O", PcmoeWarning, stacklevel=3)
    return copies

