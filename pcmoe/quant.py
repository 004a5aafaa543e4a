"""Weight-only int8 / int4 quantisation of expert weights, with torch's own CPU kernels.

int8: one scale per output row (symmetric), `torch._weight_int8pack_mm`.
int4: asymmetric groups of `group` input columns, `torch._weight_int4pack_mm_for_cpu`
      (q in 0..15, w ~ (q - 8) * scale + zero, packed two per byte).
Experts are quantised once into a copy beside the checkpoint (pcmoe.qcache) that the store reads
straight into the slots, so a swap reads the bytes the slot keeps; without a copy (none writable,
or $PCMOE_QUANT_COPY=0) they are quantised as they are loaded, by the same quantize_into.
The native kernels (pcmoe/native) compute with these layouts; `dequantize` is their exact twin.
"""

from __future__ import annotations

import torch

QUANT_MODES = ("int8", "int4")


def int4_group(in_features: int) -> int:
    """Groups of 32 input columns (about 5 bits per weight with a bf16 scale and zero), the
    granularity of llama.cpp's 4-bit blocks."""
    if in_features % 32:
        raise ValueError(f"int4 needs weights whose input size is a multiple of 32 (got {in_features})")
    return 32


def quantized_shapes(shape: tuple[int, int], mode: str) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Tensors holding one [out, in] weight: name suffix -> (shape, dtype; None = activation dtype)."""
    out_f, in_f = shape
    if mode == "int8":
        return {".q": ((out_f, in_f), torch.int8), ".s": ((out_f,), None)}
    if mode == "int4":
        group = int4_group(in_f)
        return {".q": ((out_f, in_f // 2), torch.uint8), ".s": ((in_f // group, out_f, 2), None)}
    raise ValueError(f"unknown quantisation {mode!r}; choose one of {', '.join(QUANT_MODES)}")


CHUNK_ROWS = 1024  # rows quantised at once: bounds the float32 temporaries (an LM head's are ~4x its bf16 bytes)


def quantize_into(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, mode: str, chunk_rows: int = CHUNK_ROWS) -> None:
    """Quantise w [out, in] into the preallocated q and s (see quantized_shapes), `chunk_rows` rows
    at a time: rows quantise independently (int4: in blocks of 64 rows, which its packing keeps
    together), so the result is the same as at once."""
    out_f, in_f = w.shape
    step = max(64, chunk_rows // 64 * 64)
    if out_f <= step or (mode != "int8" and out_f % 64):
        _quantize_rows(w, q, s, mode)
        return
    if mode == "int8":
        for r0 in range(0, out_f, step):
            _quantize_rows(w[r0:r0 + step], q[r0:r0 + step], s[r0:r0 + step], mode)
        return
    flat = q.view(-1)
    per_row = q.numel() // out_f                                                  # packed bytes per row
    for r0 in range(0, out_f, step):
        r1 = min(out_f, r0 + step)
        part_q = torch.empty_like(flat[r0 * per_row:r1 * per_row])
        part_s = torch.empty(s.shape[0], r1 - r0, 2, dtype=s.dtype)
        _quantize_rows(w[r0:r1], part_q, part_s, mode)
        flat[r0 * per_row:r1 * per_row].copy_(part_q)
        s[:, r0:r1].copy_(part_s)


def _quantize_rows(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, mode: str) -> None:
    w = w.float()
    if mode == "int8":
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0                     # [out]
        q.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        s.copy_(scale.to(s.dtype))
        return
    out_f, in_f = w.shape
    group = int4_group(in_f)
    wg = w.view(out_f, in_f // group, group)                                     # [out, G, group]
    lo = wg.amin(dim=-1)                                                          # [out, G]
    scale = (wg.amax(dim=-1) - lo).clamp(min=1e-12) / 15.0
    for _ in range(LS_REFITS):
        lo, scale = _refit(wg, lo, scale)
    # codes against the (scale, zero) as stored, so rounding them to s.dtype costs no extra error
    scale = scale.to(s.dtype).float().clamp(min=1e-12)
    zero = (lo + 8.0 * scale).to(s.dtype).float()                                 # kernel: (q - 8) * s + z
    codes = torch.round((wg - (zero - 8.0 * scale)[..., None]) / scale[..., None]).clamp(0, 15)
    q.copy_(torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).view(out_f, in_f), 2).view(q.shape))
    s.copy_(torch.stack([scale, zero], dim=-1).transpose(0, 1).to(s.dtype))     # [G, out, 2]


LS_REFITS = 2   # least-squares refits of each int4 group's (scale, offset); 0 = plain min/max


def _refit(wg: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One refit of a group's affine grid: round to the current grid, then the (scale, offset) with
    the least squared error for those codes (a line through the points (code, weight)). Min/max
    rounding protects the extremes at the cost of every other weight; the refit moves the grid to
    where the weights are. Measured on the shipped LM (8192 held-out tokens, int4 experts and
    non-expert weights): ppl 1.023x full with min/max, 1.017x with two refits (one: 1.018x; more
    gain nothing); clipping the range by least squared error instead made it worse (1.024x)."""
    codes = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15)     # [out, G, group]
    n = wg.shape[-1]
    sum_q, sum_w = codes.sum(-1), wg.sum(-1)
    sum_qq, sum_qw = (codes * codes).sum(-1), (codes * wg).sum(-1)
    det = n * sum_qq - sum_q * sum_q                                              # 0: every code equal
    fit_scale = (n * sum_qw - sum_q * sum_w) / det.clamp(min=1e-12)
    ok = (det > 1e-12) & (fit_scale > 1e-12)
    fit_lo = (sum_w - fit_scale * sum_q) / n
    return torch.where(ok, fit_lo, lo), torch.where(ok, fit_scale, scale)


def dequantize(q: torch.Tensor, s: torch.Tensor, mode: str) -> torch.Tensor:
    """The float32 [out, in] weight that q and s stand for (the exact reference of every kernel).
    int4 is torch's CPU int4pack: q [out/64][in][32] bytes, byte j of (block, column k) holds row
    64 block + j (low nibble) and row 64 block + 32 + j (high nibble); s [G, out, 2] (scale, zero)."""
    if mode == "int8":
        return q.float() * s.float()[:, None]
    groups, out_f, _ = s.shape
    in_f = q.numel() * 2 // out_f
    if out_f % 64:
        raise ValueError(f"int4 weights need whole blocks of 64 output rows (got {out_f})")
    packed = q.reshape(out_f // 64, in_f, 32)                                     # [blocks, in, 32]
    codes = torch.cat([packed & 0x0F, packed >> 4], dim=-1)                       # [blocks, in, 64]
    codes = codes.permute(0, 2, 1).reshape(out_f, in_f).float()                   # [out, in]
    scale = s[..., 0].float().t().repeat_interleave(in_f // groups, dim=1)        # [out, in]
    zero = s[..., 1].float().t().repeat_interleave(in_f // groups, dim=1)
    return (codes - 8.0) * scale + zero


def int8_linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return torch._weight_int8pack_mm(x.contiguous(), w[name + ".q"], w[name + ".s"])


def int4_linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    q, s = w[name + ".q"], w[name + ".s"]
    group = q.shape[1] * 2 // s.shape[0]
    return torch._weight_int4pack_mm_for_cpu(x.contiguous(), q, group, s)


LINEAR = {"int8": int8_linear, "int4": int4_linear}
