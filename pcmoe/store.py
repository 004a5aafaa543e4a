"""The disk tier: read one expert's weights from the checkpoint straight into a slot.

An expert is a list of `Piece`s: an on-disk tensor (or one expert's slice of a tensor stacked over
experts) and the rows of the slot buffer it fills. Reads bypass memory-mapping (`os.preadv` into
the slot) and the range is dropped from the page cache afterwards, so resident memory is only what
the slots hold and every load is a real disk read. Optional bandwidth emulation slows reads down to
an edge device's storage speed.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import torch

from pcmoe.checkpoint import Checkpoint, TensorInfo

# Typical sequential read speeds (MB/s) of edge storage, for --io-bandwidth.
STORAGE_PROFILES = {"emmc": 300.0, "ufs": 2000.0, "nvme": 3000.0}


@dataclass(frozen=True)
class Piece:
    info: TensorInfo          # where the bytes are
    dest: str                 # which weight of the expert bank ("gate_up", "down", ...)
    rows: tuple[int, int] | None = None  # row range of the slot it fills; None = the whole slot


@dataclass
class StoreStats:
    reads: int = 0
    bytes_read: int = 0
    read_s: float = 0.0       # wall time inside reads (including emulated slowness)
    errors: int = 0           # failed read attempts (each retried)
    failed_loads: int = 0     # loads that failed after all retries
    per_layer_bytes: list[int] = field(default_factory=list)
    per_layer_read_s: list[float] = field(default_factory=list)


class ExpertStore:
    def __init__(self, checkpoint: Checkpoint, pieces: list[list[list[Piece]]], *,
                 io_bandwidth_mbps: float | None = None, retries: int = 2, evict: bool = True):
        """pieces[layer][expert] lists the pieces of that expert."""
        self.checkpoint = checkpoint
        self.pieces = pieces          # what loads read: the checkpoint's, or a quantised copy's
        self.source_pieces = pieces   # the checkpoint's (norms, building copies)
        self.io_bandwidth = io_bandwidth_mbps * 1e6 if io_bandwidth_mbps else None
        self.retries = retries
        self.evict = evict
        self.stats = self.new_stats()
        self._lock = threading.Lock()

    def new_stats(self) -> StoreStats:
        n = len(self.pieces)
        return StoreStats(per_layer_bytes=[0] * n, per_layer_read_s=[0.0] * n)

    def use_copies(self, copies: dict[int, list[list[Piece]]]) -> None:
        """Read these layers' experts from quantised copies (pcmoe.qcache): [expert] -> pieces
        named as the slots of a quantised bank ("gate_up.q", ...)."""
        self.pieces = [copies.get(layer, p) for layer, p in enumerate(self.source_pieces)]

    def expert_nbytes(self, layer: int, expert: int = 0) -> int:
        return sum(p.info.nbytes for p in self.pieces[layer][expert])

    def _fill(self, pieces: list[Piece], slot: dict[str, torch.Tensor]) -> int:
        nbytes = 0
        for piece in pieces:
            dest = slot[piece.dest]
            if piece.rows is not None:
                dest = dest[piece.rows[0]:piece.rows[1]]
            self._read_piece(piece, dest)
            nbytes += piece.info.nbytes
        return nbytes

    def read_source(self, layer: int, expert: int, buffer: dict[str, torch.Tensor]) -> None:
        """The expert as the checkpoint holds it, into a full-precision buffer (not counted in the
        stats: building a quantised copy is not serving)."""
        self._fill(self.source_pieces[layer][expert], buffer)

    def read_expert(self, layer: int, expert: int, slot: dict[str, torch.Tensor]) -> None:
        """Fill `slot` (dest name -> that slot's tensor) with the expert's weights; raises on error."""
        t0 = time.perf_counter()
        nbytes = self._fill(self.pieces[layer][expert], slot)
        if self.io_bandwidth:
            # Emulated storage: a read takes at least nbytes / bandwidth.
            time.sleep(max(0.0, nbytes / self.io_bandwidth - (time.perf_counter() - t0)))
        seconds = time.perf_counter() - t0
        with self._lock:
            self.stats.reads += 1
            self.stats.bytes_read += nbytes
            self.stats.read_s += seconds
            self.stats.per_layer_bytes[layer] += nbytes
            self.stats.per_layer_read_s[layer] += seconds

    def _read_piece(self, piece: Piece, dest: torch.Tensor) -> None:
        if dest.dtype == piece.info.dtype and dest.is_contiguous():
            self.checkpoint.read_into(piece.info, dest.view(piece.info.shape) if dest.dim() else dest,
                                      evict=self.evict)
        else:  # a checkpoint stored in another dtype than the one we compute in
            dest.copy_(self.checkpoint.read(piece.info, evict=self.evict).view(dest.shape))

    def load(self, layer: int, expert: int, slot: dict[str, torch.Tensor]) -> bool:
        """read_expert with retries; False (and counted) if every attempt failed."""
        for _ in range(self.retries + 1):
            try:
                self.read_expert(layer, expert, slot)
                return True
            except OSError:
                with self._lock:
                    self.stats.errors += 1
        with self._lock:
            self.stats.failed_loads += 1
        return False

    def expert_norm(self, layer: int, expert: int, chunk_elements: int = 1 << 20) -> float:
        """Frobenius norm of all of the expert's weights, read from disk (nothing kept). The sum of
        squares runs over chunks in float32 with a float64 total, so the temporary memory is one
        chunk, not a float64 copy of the tensor."""
        total = 0.0
        for piece in self.source_pieces[layer][expert]:
            flat = self.checkpoint.read(piece.info, evict=self.evict).reshape(-1)
            for start in range(0, flat.numel(), chunk_elements):
                part = flat[start:start + chunk_elements].float()
                total += float(torch.dot(part, part).double())
        return total ** 0.5


class ExpertIO:
    """Moves experts from the store into the layers' slot banks: straight into an empty slot, or
    into one of the shared staging buffers of staged swaps and, at the switch, from the buffer
    into the outgoing member's slot. The scheduler and the on-demand policy see only these three
    calls; the banks never see the store.

    A staging buffer is one block of bytes that each layer sees in the layout its reads arrive in
    (staged_layout): a layer read from a quantised copy stages quantised bytes, so when every layer
    is, the buffers are the size of a quantised expert, not of one at full precision."""

    def __init__(self, store: ExpertStore, banks: list, buffer_count: int):
        self.store = store
        self.banks = banks          # per MoE layer, a moe.SlotExperts
        self.buffer_nbytes = staging_nbytes(banks)
        self.buffers = [new_staging_buffer(self.buffer_nbytes) for _ in range(buffer_count)]  # [nbytes] uint8
        self._views: dict = {}      # (buffer, layer) -> (that buffer, the layer's views of it)

    def resize_buffers(self, count: int) -> None:
        """`count` staging buffers (the live budget's), sized for the banks as they are now."""
        self.buffer_nbytes = staging_nbytes(self.banks)
        kept = [b for b in self.buffers[:count] if b.numel() >= self.buffer_nbytes]
        self.buffers[:] = kept + [new_staging_buffer(self.buffer_nbytes) for _ in range(count - len(kept))]
        self._views.clear()

    def load_slot(self, layer: int, expert: int, slot: int) -> bool:
        bank = self.banks[layer]
        staged = bank.staging(slot)  # the slot itself, or a full-precision buffer a quantised bank fills from
        ok = self.store.load(layer, expert, staged)
        if ok:
            bank.commit(slot, staged)
        return ok

    def buffer_for(self, layer: int, buffer: int) -> dict[str, torch.Tensor]:
        """Staging buffer `buffer` as this layer's store pieces fill it (name -> tensor views)."""
        buf = self.buffers[buffer]
        hit = self._views.get((buffer, layer))
        if hit is None or hit[0] is not buf:        # the runtime may replace buffers (live budget)
            like = {n: torch.empty(shape, dtype=dt, device="meta") for n, (shape, dt)
                    in staged_layout(self.banks[layer]).items()}
            hit = self._views[(buffer, layer)] = (buf, carve({"bytes": buf}, like))
        return hit[1]

    def load_buffer(self, layer: int, expert: int, buffer: int) -> bool:
        return self.store.load(layer, expert, self.buffer_for(layer, buffer))

    def commit_buffer(self, layer: int, buffer: int, slot: int) -> None:
        self.banks[layer].write(slot, self.buffer_for(layer, buffer))


ALIGN = 64   # bytes: where carve() places each tensor in a staging buffer


def staged_layout(bank) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What one expert of this bank looks like as the store reads it (name -> (shape, dtype)): one of
    its slots where it is read from a quantised copy, else the expert at full precision."""
    from pcmoe.moe import bank_tensors

    quant = bank.quant if getattr(bank, "stored_quantised", False) else None
    return bank_tensors(bank.kernel, bank.dtype, quant)


def layout_nbytes(layout: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """Bytes carve() needs for `layout` (each tensor at an ALIGN boundary)."""
    return sum(-(-math.prod(shape) * dt.itemsize // ALIGN) * ALIGN for shape, dt in layout.values())


def staging_nbytes(banks: list) -> int:
    """One shared staging buffer: room for the largest staged expert of any layer."""
    return max((layout_nbytes(staged_layout(b)) for b in banks), default=0)


def new_staging_buffer(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


def carve(storage: dict[str, torch.Tensor], like: dict[str, torch.Tensor],
          align: int = ALIGN) -> dict[str, torch.Tensor]:
    """Tensors shaped as `like` (name -> tensor), placed in the memory of `storage`'s tensors
    (first fit, `align`-byte aligned); raises ValueError if they do not fit."""
    free = [[t.view(-1).view(torch.uint8), 0] for t in storage.values()]
    out = {}
    for name, t in like.items():
        n = t.numel() * t.element_size()
        for room in free:
            start = -(-room[1] // align) * align
            if start + n <= room[0].numel():
                out[name] = room[0][start:start + n].view(t.dtype).view(t.shape)
                room[1] = start + n
                break
        else:
            raise ValueError(f"staging buffer too small for {name} ({n} bytes)")
    return out


def read_full_precision(store, layer: int, expert: int, buffer: dict) -> bool:
    """An expert at full precision as the checkpoint holds it (a store may read quantised copies
    for loads); False where it cannot be read. Shadows are made from these weights."""
    read_source = getattr(store, "read_source", None)
    if read_source is None:
        return store.load(layer, expert, buffer)
    try:
        read_source(layer, expert, buffer)
    except OSError:
        return False
    return True
