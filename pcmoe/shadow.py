"""Shadow experts: small stand-ins for the experts outside the committee (issue 13).

Dimension legend:  T tokens, H hidden size, I expert intermediate size, N experts in the layer,
                   G groups of `group` input columns, r rank, b bits, V = in/4 vectors, K = 2^b codes.

Three compact forms of an expert's [out, in] linear weights:

  int1 / int2 / int3   asymmetric group quantisation (groups of `group` input columns, a bf16 scale and
                minimum per group, the clipping range searched per group for the least squared
                error; int1's two levels are the group's two means), codes stored as b bit-planes of
                8 weights per byte: b bits per weight exactly, plus 32 bits per group.
  vq6 / vq7 / vq8   vector quantisation: each run of 4 input weights is one of 2^b vectors of a
                codebook per expert (k-means over all its linear weights, which share it), times a
                bf16 RMS scale per group of `group` input columns: b / 4 bits per weight (1.5 / 1.75 /
                2.0), plus 16 bits per group and the codebook (2^b x 4 x 2 bytes per expert). Per
                weight error it beats int2 at fewer bytes (relative weight error on the shipped LM:
                vq7 0.36, vq8 0.31, int2 0.35, int1 0.60). Codes are packed per row as a little-endian
                bit stream, 8 codes in b bytes (".c"), so the one-token kernel reads a run of 8 codes
                with one load and shifts.
  lowrank       W ~ A B with A [out, r] and B [r, in] from the SVD (2 r (out + in) bytes).

A `ShadowBank` holds the shadows of one layer's experts (a fixed set, chosen at load) stacked over
experts. `forward_one` is the fast path (codes unpacked by shifts of whole planes; low rank as two
thin products); `reference_one` is its slow twin: a dequantisation written weight by weight from
the definition, then the ordinary expert kernel on the dequantised weights.
"""

from __future__ import annotations

import math
import time

import torch

from pcmoe.moe import padded_rows
from pcmoe.options import SHADOWS as SHADOW_MODES

# int2 / int3: per byte the best of 32/64/128 on the shipped LM; vq: one scale per 256 inputs costs vq7 +0.002 error
DEFAULT_GROUP = {"int1": 128, "int2": 128, "int3": 128,
                 "vq6": 256, "vq7": 256, "vq8": 256}
VQ_BITS = {"vq6": 6, "vq7": 7, "vq8": 8}
VQ_DIM = 4          # weights per codebook vector
CODEBOOK = "codebook"   # a vq shadow's one extra tensor, [K, 4], shared by its linear weights
DEFAULT_RANK = 32
_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)  # shrink of the group's range


def layer_forms(shadow, num_layers: int) -> list[str | None]:
    """Each MoE layer's shadow form (None: no shadows there) from a load's validated `shadow`
    option: None, one form for every layer, or a tuple of one per layer."""
    if shadow is None or isinstance(shadow, str):
        return [shadow] * num_layers
    if len(shadow) != num_layers:
        raise ValueError(f"shadow forms name {len(shadow)} layers, the model has {num_layers} MoE layers; give one "
                         "form per MoE layer (or one for all)")
    return list(shadow)


def bits_of(mode: str) -> int:
    """Bits per code: per weight for intN, per 4-weight vector for vqN."""
    return {"int1": 1, "int2": 2, "int3": 3, **VQ_BITS}[mode]


def shadow_shapes(shape: tuple[int, int], mode: str, group: int | None = None,
                  rank: int | None = None) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Tensors of one [out, in] weight's shadow: suffix -> (shape, dtype; None = activation dtype)."""
    out_f, in_f = shape
    if mode == "lowrank":
        r = min(rank or DEFAULT_RANK, out_f, in_f)
        return {".a": ((out_f, r), None), ".b": ((r, in_f), None)}
    if mode not in DEFAULT_GROUP:
        raise ValueError(f"unknown shadow {mode!r}; choose one of {', '.join(SHADOW_MODES)}")
    if mode in VQ_BITS:
        if in_f % (8 * VQ_DIM):
            raise ValueError(f"vq shadows need an input size that is a multiple of 32 (got {in_f})")
        group = fit_group(in_f, group or DEFAULT_GROUP[mode])
        codes = ((out_f, in_f // (8 * VQ_DIM) * bits_of(mode)), torch.uint8)
        return {".c": codes, ".s": ((out_f, in_f // group), None)}
    group = fit_group(in_f, group or DEFAULT_GROUP[mode])
    return {".p": ((bits_of(mode), out_f, in_f // 8), torch.uint8), ".s": ((out_f, in_f // group, 2), None)}


def fit_group(in_features: int, group: int) -> int:
    """The group for weights of `in_features` input columns: `group`, or (small experts) the
    largest multiple of 8 below it that divides the input size."""
    fitted = math.gcd(in_features, group)
    if fitted % 8:
        raise ValueError(f"int2 / int3 shadows need an input size that is a multiple of 8 (got {in_features})")
    return fitted


def shadow_tensors(kernel, dtype: torch.dtype, mode: str, group=None, rank=None) -> dict:
    """One expert's shadow: name -> (shape, dtype). Non-linear tensors (biases) are kept as they are."""
    if not kernel.linear_weights:
        raise ValueError(f"{type(kernel).__name__} experts have no shadow form")
    out = {}
    for name, shape in kernel.tensors.items():
        if name in kernel.linear_weights:
            for suffix, (s, dt) in shadow_shapes(shape, mode, group, rank).items():
                out[name + suffix] = (s, dt or dtype)
        else:
            out[name] = (shape, dtype)
    if mode in VQ_BITS:
        out[CODEBOOK] = ((2 ** bits_of(mode), VQ_DIM), dtype)
    return out


def shadow_nbytes(kernel, dtype: torch.dtype, mode: str, group=None, rank=None) -> int:
    """Bytes of one expert's shadow."""
    return sum(math.prod(s) * dt.itemsize for s, dt in shadow_tensors(kernel, dtype, mode, group, rank).values())


# -- group quantisation -----------------------------------------------------------------------------


def quantize_group(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (codes [out, in] uint8 in 0..2^b-1, scale_min [out, G, 2] float32); the
    clipping range of each group is the shrink of [min, max] with the least squared error."""
    w = w.float()
    out_f, in_f = w.shape
    wg = w.view(out_f, in_f // group, group)                                     # [out, G, group]
    if bits == 1:
        return _two_means(wg)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)                                    # [out, G]
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    levels = 2 ** bits - 1
    best_err = best_scale = best_lo = None
    for shrink in _CLIP_GRID:
        c_lo = mid - half * shrink
        scale = (2 * half * shrink).clamp(min=1e-12) / levels
        q = torch.round((wg - c_lo[..., None]) / scale[..., None]).clamp(0, levels)
        err = ((q * scale[..., None] + c_lo[..., None] - wg) ** 2).sum(dim=-1)  # [out, G]
        if best_err is None:
            best_err, best_scale, best_lo = err, scale, c_lo
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_lo = torch.where(better, c_lo, best_lo)
    codes = torch.round((wg - best_lo[..., None]) / best_scale[..., None]).clamp(0, levels)
    return codes.to(torch.uint8).view(out_f, in_f), torch.stack([best_scale, best_lo], dim=-1)


def _two_means(wg: torch.Tensor, rounds: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """1-bit codes of groups wg [out, G, group]: the two levels of least squared error (Lloyd's
    iterations of 1-D 2-means from a split at the group's mean). A clipped [min, max] range, as for
    2-3 bits, puts the two levels near the extremes: relative weight error 0.94 at groups of 128
    against 0.6 for the two means of a normal distribution."""
    out_f, groups, size = wg.shape
    cut = wg.mean(dim=-1, keepdim=True)                                          # [out, G, 1]
    for _ in range(rounds):
        high = wg > cut                                                          # [out, G, group]
        n_hi = high.sum(dim=-1, keepdim=True).clamp(min=1)
        n_lo = (~high).sum(dim=-1, keepdim=True).clamp(min=1)
        hi = (wg * high).sum(dim=-1, keepdim=True) / n_hi
        lo = (wg * ~high).sum(dim=-1, keepdim=True) / n_lo
        cut = (hi + lo) / 2
    high = wg > cut
    hi = torch.where(high.any(dim=-1, keepdim=True), hi, lo)                     # a constant group: one level
    scale = hi - lo
    return high.to(torch.uint8).view(out_f, groups * size), torch.cat([scale, lo], dim=-1)


_SHIFTS = torch.arange(8, dtype=torch.uint8)                                    # bit j of a byte = weight j


def pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [out, in] (0..2^b-1) -> bit-planes [b, out, in/8] uint8 (weight 8c+j is bit j of byte c)."""
    out_f, in_f = codes.shape
    planes = []
    for b in range(bits):
        bit = ((codes >> b) & 1).view(out_f, in_f // 8, 8)                      # [out, in/8, 8]
        planes.append((bit << _SHIFTS).sum(dim=-1, dtype=torch.int32).to(torch.uint8))
    return torch.stack(planes)


def unpack_planes(planes: torch.Tensor) -> torch.Tensor:
    """bit-planes [b, out, in/8] -> codes [out, in] uint8 (whole-plane shifts: the fast path)."""
    bits, out_f, cols = planes.shape
    bit = (planes[..., None] >> _SHIFTS) & 1                                     # [b, out, in/8, 8]
    codes = bit[0]
    for b in range(1, bits):
        codes = codes | (bit[b] << b)
    return codes.view(out_f, cols * 8)


def dequantize(planes: torch.Tensor, scale_min: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Fast: [out, in] weights in `dtype` from bit-planes and per-group (scale, minimum)."""
    codes = unpack_planes(planes)
    out_f, in_f = codes.shape
    groups = scale_min.shape[1]
    sm = scale_min.float()
    w = codes.view(out_f, groups, in_f // groups).float() * sm[..., :1] + sm[..., 1:]
    return w.view(out_f, in_f).to(dtype)


def dequantize_into(out: torch.Tensor, planes: torch.Tensor, scale_min: torch.Tensor, chunk_rows: int = 128,
                    codebook: torch.Tensor | None = None) -> None:
    """dequantize (dequantize_vq with a `codebook`) into `out` [out, in], `chunk_rows` rows at a
    time: rows are independent, so the result is the same, and the unpacking temporaries (~30
    bytes per weight) stay a chunk's, not a whole expert's (which glibc then keeps: +50..+120 MB of
    RSS over a prefill with shadows)."""
    for r0 in range(0, out.shape[0], chunk_rows):
        r1 = min(out.shape[0], r0 + chunk_rows)
        if codebook is None:
            out[r0:r1].copy_(dequantize(planes[:, r0:r1], scale_min[r0:r1], out.dtype))
        else:
            out[r0:r1].copy_(dequantize_vq(planes[r0:r1], scale_min[r0:r1], codebook, out.dtype))


def dequantize_reference(planes: torch.Tensor, scale_min: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Slow twin of dequantize: each weight's code read bit by bit from its byte, by the definition."""
    bits, out_f, cols = planes.shape
    in_f = cols * 8
    group = in_f // scale_min.shape[1]
    p = planes.tolist()
    sm = scale_min.float().tolist()
    w = torch.empty(out_f, in_f, dtype=torch.float32)
    for o in range(out_f):
        row = []
        for i in range(in_f):
            code = sum(((p[b][o][i // 8] >> (i % 8)) & 1) << b for b in range(bits))
            scale, minimum = sm[o][i // group]
            row.append(code * scale + minimum)
        w[o] = torch.tensor(row)
    return w.to(dtype)


# -- vector quantisation ----------------------------------------------------------------------------


def _vq_vectors(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (its 4-weight vectors divided by their group's RMS scale [out * V, 4],
    scale [out, G])."""
    out_f, in_f = w.shape
    wg = w.float().view(out_f, in_f // group, group)                             # [out, G, group]
    scale = wg.pow(2).mean(dim=-1).sqrt().clamp(min=1e-12)                       # [out, G]
    return (wg / scale[..., None]).reshape(-1, VQ_DIM), scale


def _nearest(x: torch.Tensor, codebook: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Index of each row of x [M, 4]'s nearest codebook vector [K, 4] (chunks: M x K distances)."""
    return torch.cat([torch.cdist(x[i:i + chunk], codebook).argmin(dim=1) for i in range(0, len(x), chunk)])


KMEANS_FIT_ROWS = 65536   # vectors the codebook is fitted on (more: a seeded sample; every vector is then coded)


def kmeans(x: torch.Tensor, k: int, rounds: int = 12, seed: int = 0,
           fit_rows: int = KMEANS_FIT_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of x [M, 4]: (codebook [k, 4], codes [M]). Deterministic: the first centres
    are rows drawn with a fixed seed; an empty cluster takes the row farthest from its centre.
    Above `fit_rows` vectors the rounds run on a seeded sample of that many and the codes are each
    vector's nearest centre (a gigabyte model's expert has ~2M vectors: 6 s each fitted on all of
    them; the shipped LM's have 49K, fitted on all)."""
    gen = torch.Generator().manual_seed(seed)
    everything = x
    if len(x) > fit_rows:
        x = x[torch.randperm(len(x), generator=gen)[:fit_rows]]
    codebook = x[torch.randperm(len(x), generator=gen)[:k]].clone()
    if len(codebook) < k:                                                       # fewer vectors than codes
        codebook = torch.cat([codebook, codebook[:1].expand(k - len(codebook), -1)])
    for _ in range(rounds):
        codes = _nearest(x, codebook)
        sums = torch.zeros_like(codebook).index_add_(0, codes, x)
        counts = torch.bincount(codes, minlength=k).to(x.dtype)
        empty = counts == 0
        codebook = torch.where(empty[:, None], codebook, sums / counts.clamp(min=1)[:, None])
        if empty.any():
            far = (x - codebook[codes]).pow(2).sum(dim=1).topk(int(empty.sum())).indices
            codebook[empty] = x[far]
    return codebook, _nearest(everything, codebook)


def quantize_vq(weights: dict[str, torch.Tensor], bits: int, groups: dict[str, int]) -> tuple:
    """One expert's linear weights {name: [out, in]} -> (codebook [K, 4] float32 shared by them,
    {name: (codes [out, V] uint8, scale [out, G] float32)}): k-means over all their vectors."""
    vectors = {name: _vq_vectors(w, groups[name]) for name, w in weights.items()}
    codebook, codes = kmeans(torch.cat([v for v, _ in vectors.values()]), 2 ** bits)
    out, start = {}, 0
    for name, (v, scale) in vectors.items():
        out_f = weights[name].shape[0]
        out[name] = (codes[start:start + len(v)].to(torch.uint8).view(out_f, -1), scale)
        start += len(v)
    return codebook, out


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [out, V] (0..2^b-1, V a multiple of 8) -> [out, V/8 * b] uint8: each run of 8 codes
    as one b-byte little-endian integer, code j in bits b*j .. b*j+b-1."""
    out_f, vectors = codes.shape
    runs = codes.view(out_f, vectors // 8, 8).long()                            # [out, V/8, 8]
    value = (runs << (bits * torch.arange(8))).sum(dim=-1)                      # [out, V/8] < 2^(8b)
    return ((value[..., None] >> (8 * torch.arange(bits))) & 0xFF).to(torch.uint8).view(out_f, -1)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """pack_codes' inverse: [out, V/8 * b] uint8 -> codes [out, V] uint8."""
    out_f = packed.shape[0]
    run_bytes = packed.view(out_f, -1, bits).long()                             # [out, V/8, b]
    value = (run_bytes << (8 * torch.arange(bits))).sum(dim=-1)                 # [out, V/8]
    codes = (value[..., None] >> (bits * torch.arange(8))) & (2 ** bits - 1)   # [out, V/8, 8]
    return codes.to(torch.uint8).view(out_f, -1)


def dequantize_vq(packed: torch.Tensor, scale: torch.Tensor, codebook: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """Fast: [out, in] weights in `dtype` from packed codes [out, V/8 * b], scale [out, G] and codebook [K, 4]."""
    bits = int(codebook.shape[0]).bit_length() - 1
    codes = unpack_codes(packed, bits)                                           # [out, V]
    out_f, vectors = codes.shape
    w = codebook.float()[codes.long()].view(out_f, scale.shape[1], -1) * scale.float()[..., None]
    return w.view(out_f, vectors * VQ_DIM).to(dtype)


def dequantize_vq_reference(packed: torch.Tensor, scale: torch.Tensor, codebook: torch.Tensor,
                            dtype: torch.dtype) -> torch.Tensor:
    """Slow twin of dequantize_vq: each vector's code read bit by bit from the stream, its weights
    looked up one by one."""
    bits = int(codebook.shape[0]).bit_length() - 1
    out_f, cols = packed.shape
    in_f = cols * 8 // bits * VQ_DIM
    group = in_f // scale.shape[1]
    p, sc, cb = packed.tolist(), scale.float().tolist(), codebook.float().tolist()
    w = torch.empty(out_f, in_f, dtype=torch.float32)
    for o in range(out_f):
        row = []
        for v in range(in_f // VQ_DIM):
            first = bits * v   # the code's first bit in the row's stream
            code = sum(((p[o][(first + i) // 8] >> ((first + i) % 8)) & 1) << i for i in range(bits))
            row.extend(cb[code][j] * sc[o][(VQ_DIM * v + j) // group] for j in range(VQ_DIM))
        w[o] = torch.tensor(row)
    return w.to(dtype)


def lowrank_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] ~ A [out, r] @ B [r, in], the best rank-r approximation (SVD, singular values
    split evenly between the factors)."""
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


# -- the bank -------------------------------------------------------------------------------------


class ShadowBank:
    """The shadows of one layer: `experts` (a fixed set) stacked in rows, `row_of[e]` = its row or -1.

    write(e, weights) makes expert e's shadow from its full-precision weights (a staging buffer)."""

    def __init__(self, kernel, num_experts: int, experts: list[int], dtype: torch.dtype, mode: str,
                 group: int | None = None, rank: int | None = None):
        self.kernel = kernel          # a full-precision kernel (its own object: quantised banks change theirs)
        self.mode, self.dtype = mode, dtype
        self.group = group or DEFAULT_GROUP.get(mode)
        self.rank = rank or DEFAULT_RANK
        self.experts = list(experts)
        self.row_of = [-1] * num_experts
        for row, e in enumerate(self.experts):
            self.row_of[e] = row
        spec = shadow_tensors(kernel, dtype, mode, self.group, self.rank)
        self.bank = {name: torch.zeros((len(self.experts), *shape), dtype=dt) for name, (shape, dt) in spec.items()}
        self.ready = [False] * num_experts
        self._err = [0.0, 0.0]        # sum over written shadows of ||W - W'||^2 and ||W||^2
        self._row_err: dict[int, tuple[float, float]] = {}
        self.native = None            # the native kernel library (use_native), one-token calls only
        self._scratch = self._args = None
        if mode == "lowrank":
            kernel.linear = lowrank_linear

    def weight_error(self) -> float:
        """Relative Frobenius error of the shadows written so far (the chooser's error where no
        output error was measured on profiling tokens)."""
        return math.sqrt(self._err[0] / self._err[1]) if self._err[1] else 1.0

    def time_one(self, repeats: int = 5) -> float:
        """Seconds of one token through one shadow (the fastest of a few runs; for the chooser's
        time cost)."""
        if not self.experts:
            return 0.0
        x = torch.randn(1, next(iter(self.kernel.tensors.values()))[-1]).to(self.dtype)
        best = float("inf")
        with torch.inference_mode():
            for _ in range(repeats):
                t0 = time.perf_counter()
                self.forward_one(x, self.experts[0])
                best = min(best, time.perf_counter() - t0)
        return best

    @property
    def shadow_nbytes(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.bank.values())

    @property
    def nbytes(self) -> int:
        return self.shadow_nbytes * len(self.experts)

    def has(self, expert: int) -> bool:
        return self.ready[expert]

    def write(self, expert: int, weights: dict[str, torch.Tensor]) -> None:
        row = self.row_of[expert]
        if row < 0:
            raise ValueError(f"expert {expert} has no shadow row in this layer")
        if self.mode in VQ_BITS:
            self._write_vq(row, weights)
        for name, w in weights.items():
            if name not in self.kernel.linear_weights:
                self.bank[name][row].copy_(w)
            elif self.mode in VQ_BITS:
                continue
            elif self.mode == "lowrank":
                a, b = lowrank_factors(w, self.rank)
                self.bank[name + ".a"][row].copy_(a)
                self.bank[name + ".b"][row].copy_(b)
            else:
                groups = self.bank[name + ".s"].shape[-2]
                codes, sm = quantize_group(w, bits_of(self.mode), w.shape[-1] // groups)
                self.bank[name + ".p"][row].copy_(pack_planes(codes, bits_of(self.mode)))
                self.bank[name + ".s"][row].copy_(sm)
        self.ready[expert] = True
        approx = self.dense(expert)
        num = den = 0.0
        for name in self.kernel.linear_weights:
            w = weights[name].float()
            num += float(((approx[name].float() - w) ** 2).sum())
            den += float((w ** 2).sum())
        self._row_err[expert] = (num, den)
        self._err[0] += num
        self._err[1] += den

    def _write_vq(self, row: int, weights: dict[str, torch.Tensor]) -> None:
        linear = {name: weights[name] for name in self.kernel.linear_weights}
        groups = {name: w.shape[-1] // self.bank[name + ".s"].shape[-1] for name, w in linear.items()}
        codebook, coded = quantize_vq(linear, bits_of(self.mode), groups)
        self.bank[CODEBOOK][row].copy_(codebook)
        for name, (codes, scale) in coded.items():
            self.bank[name + ".c"][row].copy_(pack_codes(codes, bits_of(self.mode)))
            self.bank[name + ".s"][row].copy_(scale)

    def row_state(self, expert: int) -> dict[str, torch.Tensor]:
        """Expert's shadow as tensors (with its weight-error sums): what ShadowCache stores."""
        row = self.row_of[expert]
        state = {name: t[row].clone() for name, t in self.bank.items()}
        state["err"] = torch.tensor(self._row_err[expert], dtype=torch.float64)
        return state

    def load_row(self, expert: int, state: dict[str, torch.Tensor]) -> None:
        """Install a shadow made earlier (row_state) instead of making it from the weights."""
        row = self.row_of[expert]
        for name, t in self.bank.items():
            t[row].copy_(state[name])
        num, den = state["err"].tolist()
        self._row_err[expert] = (num, den)
        self._err[0] += num
        self._err[1] += den
        self.ready[expert] = True

    def retarget(self, old: int, new: int, state: dict[str, torch.Tensor]) -> None:
        """Give old's row (an expert promoted into the committee) to `new` (one demoted out of it),
        with new's shadow `state` (row_state, e.g. from the cache): the shadow count stays."""
        row = self.row_of[old]
        self.row_of[old], self.ready[old] = -1, False
        num, den = self._row_err.pop(old, (0.0, 0.0))
        self._err[0] -= num
        self._err[1] -= den
        self.experts[row] = new
        self.row_of[new] = row
        self.load_row(new, state)

    def dense(self, expert: int, reference: bool = False) -> dict[str, torch.Tensor]:
        """Expert `expert`'s shadow as ordinary full-precision weights (name -> [out, in])."""
        row = self.row_of[expert]
        out = {}
        for name in self.kernel.tensors:
            if name not in self.kernel.linear_weights:
                out[name] = self.bank[name][row]
            elif self.mode == "lowrank":
                a, b = self.bank[name + ".a"][row], self.bank[name + ".b"][row]
                out[name] = (a.float() @ b.float()).to(self.dtype) if reference else a @ b
            elif self.mode in VQ_BITS:
                deq = dequantize_vq_reference if reference else dequantize_vq
                out[name] = deq(self.bank[name + ".c"][row], self.bank[name + ".s"][row], self.bank[CODEBOOK][row],
                                self.dtype)
            else:
                deq = dequantize_reference if reference else dequantize
                out[name] = deq(self.bank[name + ".p"][row], self.bank[name + ".s"][row], self.dtype)
        return out

    def use_native(self) -> bool:
        """Compute one-token shadows with pcmoe/native/shadow.c where it fits and builds."""
        lib = native_kernels() if native_fits(self) else None
        self.native = lib
        return lib is not None

    def forward_into(self, x: torch.Tensor, expert: int, out: torch.Tensor) -> torch.Tensor:
        """One token's shadow output written into `out` ([H] float32): the native kernel writes it
        in place; the eager path copies."""
        if self.native is not None:
            return _native_one(self, x, expert, out)
        out.copy_(self.forward_one(x, expert).reshape(-1))
        return out

    def forward_one(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """x [T, H] -> the shadow's output [T, H] (fast path; native for a few tokens where set: float32)."""
        if self.native is not None and x.shape[0] <= NATIVE_ROWS:
            if x.shape[0] == 1:
                return _native_one(self, x, expert)
            return torch.cat([_native_one(self, x[t:t + 1], expert) for t in range(x.shape[0])])
        row = self.row_of[expert]
        if self.mode == "lowrank":
            return self.kernel(x, _LowRankView(self.bank, row))
        dense = _dense_scratch(self.kernel, self.dtype)
        codebook = self.bank[CODEBOOK][row] if self.mode in VQ_BITS else None
        codes = ".c" if self.mode in VQ_BITS else ".p"
        for name in self.kernel.tensors:
            if name not in self.kernel.linear_weights:
                dense[name] = self.bank[name][row]
            elif self.native is not None:   # the native twin of dequantize_into (tested to agree)
                _native_dequantize(self, name, row, dense[name])
            else:
                dequantize_into(dense[name], self.bank[name + codes][row], self.bank[name + ".s"][row],
                                codebook=codebook)
        # rows padded to a multiple of 8, as the grouped expert GEMM's (moe.GROUP_ROWS): a prefill meets
        # every count of missed tokens, and oneDNN keeps a primitive per count (~19 MiB more peak RSS
        # with int2 shadows on the shipped LM before)
        return self.kernel(padded_rows(x), dense)[:x.shape[0]]

    def reference_one(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """Slow twin: dequantise by the definition (or multiply the factors out), then the ordinary expert."""
        return self.kernel(x, self.dense(expert, reference=True))


_SCRATCH: dict = {}  # (thread, dtype, shapes) -> one expert's dense weights, shared by every bank


def _dense_scratch(kernel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One expert's dense weights for the eager batch path, shared by the banks of every layer (a
    forward runs its layers one after another): one buffer per thread instead of one per layer."""
    import threading

    # per thread, and per inference mode (a tensor made inside it cannot be written outside it)
    key = (threading.get_ident(), torch.is_inference_mode_enabled(), dtype,
           tuple(sorted((n, tuple(s)) for n, s in kernel.tensors.items())))
    if key not in _SCRATCH:
        _SCRATCH[key] = {name: torch.empty(shape, dtype=dtype) for name, shape in kernel.tensors.items()}
    return _SCRATCH[key]


class ShadowCache:
    """Shadows made once and kept in `<cache>/<fingerprint>/shadows-<form>-layer<i>.safetensors`,
    one file per MoE layer (tensors "<layer>.<expert>.<name>"): a later load reads the shadows it
    needs instead of reading each expert and quantising it. New shadows are merged in by flush()
    (atomic), a layer at a time, so making them holds one layer's new shadows in memory, never the
    whole model's (which, with a serialisation copy on top, does not fit a small box)."""

    def __init__(self, stem):
        from pathlib import Path

        self.stem = Path(stem)                             # <cache>/<fingerprint>/shadows-<form>
        self.new: dict[int, dict[str, torch.Tensor]] = {}  # layer -> new tensors, until flushed
        self._files: dict[int, tuple] = {}                 # layer -> (safe_open or None, its keys)

    @staticmethod
    def for_checkpoint(fingerprint: str, opts, form: str) -> ShadowCache:
        from pcmoe.qcache import cache_root

        key = spec_key(form, opts.shadow_group, opts.shadow_rank).replace("/", "-")
        key += "-packed" if form in VQ_BITS else ""   # not the bit-plane files of the first vq layout
        return ShadowCache(cache_root(opts.cache_dir) / fingerprint / f"shadows-{key}")

    @staticmethod
    def files(fingerprint: str, cache_dir=None) -> list:
        """Every shadow cache file of a checkpoint (all forms and layers), e.g. to evict them."""
        from pcmoe.qcache import cache_root

        return sorted((cache_root(cache_dir) / fingerprint).glob("shadows-*.safetensors"))

    def path(self, layer: int):
        return self.stem.with_name(f"{self.stem.name}-layer{layer:03d}.safetensors")

    def _file(self, layer: int) -> tuple:
        if layer not in self._files:
            try:
                from safetensors import safe_open

                f = safe_open(str(self.path(layer)), framework="pt")
                self._files[layer] = (f, set(f.keys()))
            except Exception:  # absent or unreadable: made again
                self._files[layer] = (None, set())
        return self._files[layer]

    def get(self, layer: int, expert: int, names) -> dict[str, torch.Tensor] | None:
        f, keys = self._file(layer)
        wanted = [f"{layer}.{expert}.{n}" for n in (*names, "err")]
        if f is None or not all(k in keys for k in wanted):
            return None
        return {k.split(".", 2)[2]: f.get_tensor(k) for k in wanted}

    def release(self, layer: int, evict: bool = True) -> None:
        """Close the layer's file (the rows read from it are copies; a mapped file's touched pages
        would otherwise stay in the process's RSS: in a memory cgroup, ~the shadows' bytes a second
        time) and, with `evict`, drop its pages from the page cache too. A later get() reopens it."""
        from pcmoe.system import evict_file

        if self._files.pop(layer, (None,))[0] is not None and evict and self.path(layer).exists():
            evict_file(self.path(layer))

    def put(self, layer: int, expert: int, state: dict[str, torch.Tensor]) -> None:
        new = self.new.setdefault(layer, {})
        for name, t in state.items():
            new[f"{layer}.{expert}.{name}"] = t.contiguous()

    def flush(self, layer: int | None = None) -> None:
        """Write the new shadows of `layer` (None: of every layer) into its file, merged with the
        ones already there (a temporary file, then a rename)."""
        import os
        import tempfile

        from safetensors.torch import save_file

        from pcmoe.system import evict_file

        for i in ([layer] if layer is not None else sorted(self.new)):
            new = self.new.get(i)
            if not new:
                continue
            f, keys = self._file(i)
            merged = {k: f.get_tensor(k) for k in keys} if f is not None else {}
            merged.update(new)
            out = self.path(i)
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
            os.close(fd)
            try:
                save_file(merged, tmp)
                # Written back and dropped from the page cache now: dirty pages of a file this size
                # cannot be reclaimed until written, and in a memory cgroup they count against the limit.
                evict_file(tmp)
                os.replace(tmp, out)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            del self.new[i], merged
            self._files.pop(i, None)  # reopened (the merged file) by the next get()


# -- native one-token kernel (pcmoe/native/shadow.c) ----------------------------------------------

NATIVE_SOURCE = __import__("pathlib").Path(__file__).with_name("native") / "shadow.c"
_native_state: list = []     # [library or None, why]
# Up to this many tokens for one shadow, one native call per token (int2 23 us, vq7 35 us per token on the
# shipped LM) beats dequantising it natively once and multiplying (int2 132 us, vq7 213 us: the break-even is
# 5.7 / 6.1 tokens; the torch dequantisation took 640 / 870 us)
NATIVE_ROWS = 6


def native_kernels():
    """The compiled shadow kernel (ctypes library), built on first use beside pcmoe's native
    kernels with their flags; None where pcmoe's native kernels do not run here or gcc fails."""
    if not _native_state:
        _native_state.extend(_load_native())
    return _native_state[0]


def _load_native():
    import ctypes
    import hashlib
    import os
    import shutil
    import subprocess
    import tempfile

    from pcmoe import native

    if native.kernels() is None:
        return None, native.why()
    digest = hashlib.sha1(NATIVE_SOURCE.read_bytes() + " ".join(native.FLAGS).encode()).hexdigest()[:12]
    path = native.native_dir() / f"libpcmoe_shadow-{digest}.so"
    if not path.exists():
        cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            return None, "no C compiler for the shadow kernel"
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            tmp_lib = os.path.join(tmp, path.name)
            done = subprocess.run([cc, *native.FLAGS, str(NATIVE_SOURCE), "-o", tmp_lib, "-lm"], capture_output=True,
                                  text=True)
            if done.returncode != 0:
                return None, f"the shadow kernel does not build: {done.stderr.strip()[:200]}"
            os.replace(tmp_lib, path)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"the shadow kernel does not load ({e})"
    if lib.pcmoe_shadow_abi() != 4:
        return None, "the shadow kernel is from another pcmoe version"
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.pcmoe_shadow_glu.argtypes = [i, p, p, i, p, p, i, p, p, i, i, p]
    lib.pcmoe_shadow_glu.restype = None
    lib.pcmoe_shadow_vq_glu.argtypes = [i, p, p, p, i, p, p, i, p, p, i, i, p]
    lib.pcmoe_shadow_vq_glu.restype = None
    lib.pcmoe_shadow_dequant_planes.argtypes = [i, p, p, i, i, i, i, i, p]
    lib.pcmoe_shadow_dequant_planes.restype = None
    lib.pcmoe_shadow_dequant_vq.argtypes = [i, p, p, p, i, i, i, i, p]
    lib.pcmoe_shadow_dequant_vq.restype = None
    return lib, "native"


def native_fits(bank: ShadowBank) -> bool:
    """Whether the native kernel computes this bank: int1..int3 or vq SiLU GLU experts in bf16,
    groups of whole 16-weight masks (int) or of whole bytes of vector codes (vq)."""
    from pcmoe.moe import GluKernel

    k = bank.kernel
    silu = getattr(k, "act", None) is torch.nn.functional.silu or \
        type(getattr(k, "act", None)).__name__ in ("SiLUActivation", "SiLU")
    if bank.mode not in DEFAULT_GROUP or not isinstance(k, GluKernel) or bank.dtype != torch.bfloat16 or not silu:
        return False
    for name in k.linear_weights:
        if bank.mode in VQ_BITS:      # groups of whole runs of 8 vector codes; rows in pairs
            in_features = bank.bank[name + ".c"].shape[-1] * 8 // bits_of(bank.mode) * VQ_DIM
            groups = bank.bank[name + ".s"].shape[-1]
            if (in_features // groups) % (8 * VQ_DIM) or bank.bank[name + ".c"].shape[-2] % 2:
                return False
        else:                         # groups of whole 16-weight masks
            in_features, groups = bank.bank[name + ".p"].shape[-1] * 8, bank.bank[name + ".s"].shape[-2]
            if (in_features // groups) % 16:
                return False
    return True


def _native_one(bank: ShadowBank, x: torch.Tensor, expert: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """One token [1, H] through expert's shadow with the native kernel -> [1, H] float32 (into
    `out`, [H] float32, when given)."""
    if bank._args is None:  # the bank is never reallocated: each row's addresses are fixed
        bits = bits_of(bank.mode)
        if bank.mode in VQ_BITS:
            gu_p, gu_s, dn_p, dn_s = (bank.bank[n] for n in ("gate_up.c", "gate_up.s", "down.c", "down.s"))
            hidden, inter = gu_p.shape[-1] * 8 // bits * VQ_DIM, dn_p.shape[-1] * 8 // bits * VQ_DIM
            codes = 2 ** bits
            table = max(hidden, inter) // VQ_DIM * codes
            bank._scratch = torch.empty(3 * inter + 4 * codes + table, dtype=torch.float32)
            cb = bank.bank[CODEBOOK]
            bank._args = [(bits, cb[r].data_ptr(), gu_p[r].data_ptr(), gu_s[r].data_ptr(), hidden // gu_s.shape[-1],
                           dn_p[r].data_ptr(), dn_s[r].data_ptr(), inter // dn_s.shape[-1])
                          for r in range(gu_p.shape[0])]
            bank._call = bank.native.pcmoe_shadow_vq_glu
        else:
            gu_p, gu_s, dn_p, dn_s = (bank.bank[n] for n in ("gate_up.p", "gate_up.s", "down.p", "down.s"))
            hidden, inter = gu_p.shape[-1] * 8, dn_p.shape[-1] * 8
            bank._scratch = torch.empty(3 * inter + hidden + inter + 16, dtype=torch.float32)
            bank._args = [(bits, gu_p[r].data_ptr(), gu_s[r].data_ptr(), hidden // gu_s.shape[-2],
                           dn_p[r].data_ptr(), dn_s[r].data_ptr(), inter // dn_s.shape[-2])
                          for r in range(gu_p.shape[0])]
            bank._call = bank.native.pcmoe_shadow_glu
        bank._dims = (hidden, inter)
    hidden, inter = bank._dims
    xf = x.reshape(-1).float().contiguous()
    y = torch.empty((1, hidden), dtype=torch.float32) if out is None else out.view(1, hidden)
    bank._call(*bank._args[bank.row_of[expert]], xf.data_ptr(), y.data_ptr(), hidden, inter, bank._scratch.data_ptr())
    return y


def _native_dequantize(bank: ShadowBank, name: str, row: int, out: torch.Tensor) -> None:
    """Row `row`'s linear weight `name` dequantised by the native kernel into `out` [out, in] bf16:
    dequantize_into's twin (the same float32 arithmetic, rounded once to bf16), without its
    per-chunk temporaries."""
    out_f, in_f = out.shape
    scale = bank.bank[name + ".s"][row]
    if bank.mode in VQ_BITS:
        codebook = bank.bank[CODEBOOK][row].float().contiguous()                    # [K, 4]
        bank.native.pcmoe_shadow_dequant_vq(bits_of(bank.mode), bank.bank[name + ".c"][row].data_ptr(),
                                            scale.data_ptr(), codebook.data_ptr(), in_f, in_f // scale.shape[-1],
                                            0, out_f, out.data_ptr())
    else:
        bank.native.pcmoe_shadow_dequant_planes(bits_of(bank.mode), bank.bank[name + ".p"][row].data_ptr(),
                                                scale.data_ptr(), out_f, in_f, in_f // scale.shape[-2], 0, out_f,
                                                out.data_ptr())


class _LowRankView(dict):
    """A kernel's weight dict whose linear weights are (A, B) factors: the kernel's `linear` sees
    the name and multiplies x by B^T then A^T (never forming A B)."""

    def __init__(self, bank, row):
        super().__init__()
        self.bank, self.row = bank, row

    def __getitem__(self, name):
        return self.bank[name][self.row]


def lowrank_linear(x: torch.Tensor, w, name: str) -> torch.Tensor:
    if isinstance(w, _LowRankView):
        a, b = w.bank[name + ".a"][w.row], w.bank[name + ".b"][w.row]
        return (x @ b.T) @ a.T
    return torch.nn.functional.linear(x, w[name])


# -- measured errors --------------------------------------------------------------------------------

ERRORS_FORMAT = "pcmoe-shadow-errors/1"
ERRORS_FILE = "pcmoe_shadow_errors.json"


def spec_key(mode: str, group: int | None = None, rank: int | None = None) -> str:
    if mode == "lowrank":
        return f"lowrank/r{rank or DEFAULT_RANK}"
    return f"{mode}/g{group or DEFAULT_GROUP[mode]}"


def _errors_paths(folder, fingerprint: str, cache_dir=None):
    from pathlib import Path

    from pcmoe.system import cache_root

    return [Path(folder) / ERRORS_FILE, cache_root(cache_dir) / fingerprint / "shadow_errors.json"]


def read_errors(folder, fingerprint: str, opts, form: str) -> list[dict] | None:
    """Per-layer measured errors ({"shadow": e, "exchange": e}) of shadow form `form` (with the
    load's group / rank), from the file beside the checkpoint or the cache; None where none were
    measured for this checkpoint."""
    import json

    key = spec_key(form, opts.shadow_group, opts.shadow_rank)
    for path in _errors_paths(folder, fingerprint, opts.cache_dir):
        try:
            data = json.loads(path.read_text())
            if data.get("format") == ERRORS_FORMAT and data.get("fingerprint") == fingerprint \
                    and key in data.get("shadows", {}):
                return data["shadows"][key]
        except (OSError, ValueError, AttributeError):
            continue
    return None


def write_errors(path, fingerprint: str, measured: dict[str, list[dict]], tokens: int, source: str) -> None:
    """Merge measured errors (spec key -> per-layer errors) into the file at `path` (atomic)."""
    import json
    from pathlib import Path

    from pcmoe.system import atomic_write_text

    path = Path(path)
    data = {"format": ERRORS_FORMAT, "fingerprint": fingerprint, "shadows": {}}
    try:
        old = json.loads(path.read_text())
        if old.get("format") == ERRORS_FORMAT and old.get("fingerprint") == fingerprint:
            data = old
    except (OSError, ValueError, AttributeError):
        pass
    data["shadows"].update(measured)
    data["tokens"], data["source"] = tokens, source
    atomic_write_text(path, json.dumps(data, indent=1))


def lm_feed(engine, ids: list[int], chunk: int = 256):
    """feed() for measure: the token ids in chunks of `chunk`, each from an empty cache."""
    def feed():
        for start in range(0, len(ids), chunk):
            engine.forward(torch.tensor([ids[start:start + chunk]]), engine.new_state())
    return feed


@torch.inference_mode()
def measure(engine, feed, specs: list[tuple[str, int | None, int | None]]) -> dict:
    """Each layer's relative output error of each shadow form and of an exchange, on the profiling
    inputs that `feed()` runs through an all-resident engine (policy full; `lm_feed` for text).
    A choice's error is weighted by its router weight:
    sqrt(sum_choices ||w (E'(x) - E(x))||^2 / sum ||w E(x)||^2). The exchange's
    stand-in for a choice is the token's next-best expert outside its top-k, at the same weight
    (an optimistic proxy: a committee holds fewer experts to choose from). Returns
    {spec key: [per layer {"shadow": e, "exchange": e}]}."""
    if not all(layer.committee.complete for layer in engine.layers):
        raise ValueError("measure needs every expert resident (policy full)")
    seen: dict[int, list] = {}
    wrapped = []
    for layer in engine.layers:
        ctrl = layer.controller
        original = ctrl.forward

        def capture(x, logits, experts, batch, _orig=original, _i=layer.block.layer):
            seen.setdefault(_i, []).append((x.clone(), logits.clone()))
            return _orig(x, logits, experts, batch)

        ctrl.forward = capture
        wrapped.append((ctrl, original))
    try:
        feed()
    finally:
        for ctrl, original in wrapped:
            ctrl.forward = original
    out: dict[str, list[dict]] = {}
    for i, layer in enumerate(engine.layers):
        x = torch.cat([c[0] for c in seen[i]])                                   # [T, H]
        logits = torch.cat([c[1] for c in seen[i]])                              # [T, N]
        route = layer.controller.router.route(logits, None, (1, x.shape[0]))
        bank, slot_of = layer.block.experts, layer.committee.slot_list
        N = layer.committee.num_experts
        exact = [bank.kernel(x, bank.slot(slot_of[e])).float() for e in range(N)]   # [T, H] each
        weight = torch.zeros(x.shape[0], N)                                       # [T, N] combine weights
        weight.scatter_add_(1, route.idx.clamp(min=0), route.weights.float() * (route.idx >= 0))
        chosen = weight > 0
        # exchange stand-in: the best expert (by unmasked gate) the token did not choose
        sub = route.gates.float().masked_fill(chosen, float("-inf")).argmax(dim=1)    # [T]
        ex_num = ex_den = 0.0
        for e in range(N):
            rows = chosen[:, e]
            if rows.any():
                w = weight[rows, e][:, None]
                y = exact[e][rows]
                ys = torch.stack([exact[s][t] for s, t in zip(sub[rows].tolist(), rows.nonzero().squeeze(1).tolist())])
                ex_num += float(((w * (ys - y)) ** 2).sum())
                ex_den += float(((w * y) ** 2).sum())
        exchange = math.sqrt(ex_num / ex_den) if ex_den else 1.0
        for mode, group, rank in specs:
            shadows = ShadowBank(engine.family.kernel(), N, list(range(N)), bank.dtype, mode, group, rank)
            num = den = 0.0
            for e in range(N):
                shadows.write(e, bank.slot(slot_of[e]))
                rows = chosen[:, e]
                if rows.any():
                    w = weight[rows, e][:, None]
                    y = exact[e][rows]
                    num += float(((w * (shadows.forward_one(x[rows], e).float() - y)) ** 2).sum())
                    den += float(((w * y) ** 2).sum())
            out.setdefault(spec_key(mode, group, rank), []).append(
                {"shadow": math.sqrt(num / den) if den else 1.0, "exchange": exchange,
                 "weight_error": shadows.weight_error()})
    return out
