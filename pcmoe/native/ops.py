"""Torch-facing wrappers of the native kernels: tensors in, tensors out, shapes checked by the
callers (pcmoe.fast, pcmoe.moe) that choose them. Dimension legend: T rows, H hidden, I expert
intermediate, D head dim. Inputs must be contiguous bf16 (weights: as held by the model or bank)."""

from __future__ import annotations

import ctypes
import threading

import torch

_local = threading.local()


def _scratch(n: int) -> torch.Tensor:
    """A float32 work buffer of at least n elements, one per thread, reused across calls."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _local.buf = torch.empty(max(n, 1 << 16), dtype=torch.float32)
    return buf


def linear(k, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x [..., in] @ weight[out, in]^T (+ bias) -> [..., out] in bf16 or float32."""
    out_f, in_f = weight.shape
    rows = x.numel() // in_f
    y = torch.empty((*x.shape[:-1], out_f), dtype=out_dtype)
    k.linear_bf16(weight.data_ptr(), bias.data_ptr() if bias is not None else None, x.data_ptr(), y.data_ptr(),
                  rows, out_f, in_f, int(out_dtype == torch.bfloat16), _scratch(out_f).data_ptr())
    return y


def rmsnorm(k, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    n = weight.numel()
    y = torch.empty_like(x)
    k.rmsnorm_bf16(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // n, n, eps, _scratch(n).data_ptr())
    return y


def attention(k, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int, scale: float) -> torch.Tensor:
    """One query position: q [Hq, D], caches [1, Hkv, capacity, D] (first `length` valid) -> [Hq, D]."""
    Hq, D = q.shape
    _, Hkv, cap, _ = keys.shape
    out = torch.empty_like(q)
    k.attention_bf16(q.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(), Hq, Hkv, D, length, cap,
                     scale, _scratch(length + D).data_ptr())
    return out


QUANT_CODES = {None: 0, "int8": 1, "int4": 2}


def expert_args(quant: str | None, w: dict[str, torch.Tensor]) -> tuple:
    """The static arguments of glu_expert for one slot's tensors `w` (their addresses never change:
    a swap overwrites a slot in place)."""
    if quant is None:
        return (0, w["gate_up"].data_ptr(), None, w["down"].data_ptr(), None, 0, 0)
    gu, gu_s, dn, dn_s = w["gate_up.q"], w["gate_up.s"], w["down.q"], w["down.s"]
    group = gu.shape[1] * 2 // gu_s.shape[0] if quant == "int4" else 0
    return (QUANT_CODES[quant], gu.data_ptr(), gu_s.data_ptr(), dn.data_ptr(), dn_s.data_ptr(),
            int(gu_s.dtype == torch.float32), group)


def glu_expert(k, quant: str | None, w: dict[str, torch.Tensor], x: torch.Tensor, out: torch.Tensor,
               hidden: int, inter: int, args: tuple | None = None) -> None:
    """One GLU expert (SiLU) of a slot `w` on one token x [1, H] into out [H] (float32)."""
    k.glu_expert(*(args or expert_args(quant, w)), x.data_ptr(), out.data_ptr(), hidden, inter,
                 _scratch(4 * inter + k.act_scratch_floats(max(hidden, inter))).data_ptr())


def gemv_quant(k, quant: str, w: dict[str, torch.Tensor], name: str, x: torch.Tensor,
               vnni: bool = True) -> torch.Tensor:
    """One quantised product W x of a slot's weight `name`: x [in] float32 -> [out] float32.
    vnni: the integer kernels (activation rounded to int8 per block of 32), else float32 ones."""
    q, s = w[name + ".q"], w[name + ".s"]
    out_f = q.shape[0] if quant == "int8" else s.shape[1]
    in_f = x.numel()
    group = in_f // s.shape[0] if quant == "int4" else 0
    x = x.contiguous().float()
    y = torch.empty(out_f, dtype=torch.float32)
    k.gemv_quant(QUANT_CODES[quant], int(vnni), q.data_ptr(), s.data_ptr(), int(s.dtype == torch.float32), group,
                 x.data_ptr(), y.data_ptr(), out_f, in_f, _scratch(k.act_scratch_floats(in_f)).data_ptr())
    return y


def gemv_bf16(k, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """W [out, in] bf16 . x [in] bf16 -> [out] float32 (no bias, no rounding of the output)."""
    y = torch.empty(weight.shape[0], dtype=torch.float32)
    k.gemv_bf16(weight.data_ptr(), x.contiguous().data_ptr(), y.data_ptr(), weight.shape[0], weight.shape[1])
    return y


def quantize_activation_native(k, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' activation rounding of x [n] float32: (xq [n] int8, d [blocks], xs [blocks])."""
    n = x.numel()
    blocks = (n + ACT_BLOCK - 1) // ACT_BLOCK
    x = x.contiguous().float()
    xq = torch.empty((n + 63) // 64 * 64, dtype=torch.int8)
    d, xs = torch.empty(blocks), torch.empty(blocks)
    k.quantize_activation(x.data_ptr(), n, xq.data_ptr(), d.data_ptr(), xs.data_ptr())
    return xq[:n], d, xs


# -- the slow twins of the VNNI kernels (torch, float32) ---------------------------------------

ACT_BLOCK = 32   # activation values sharing one int8 scale (kernels.c ACT_BLOCK)


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n] float32 -> (xq [n] int8, d [blocks]): symmetric per block of 32, the same float32
    operations as kernels.c (x * (127 / max|x|), rounded half to even), so the same bits."""
    n = x.numel()
    blocks = (n + ACT_BLOCK - 1) // ACT_BLOCK
    xb = torch.nn.functional.pad(x.float().reshape(-1), (0, blocks * ACT_BLOCK - n)).view(blocks, ACT_BLOCK)
    amax = xb.abs().amax(dim=1)                                                   # [blocks]
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.round(xb * inv[:, None]).clamp(-127, 127).to(torch.int8)
    return xq.reshape(-1)[:n], amax / 127.0


def dequantize_activation(x: torch.Tensor) -> torch.Tensor:
    """The activation the VNNI kernels multiply by: x rounded to int8 per block, in float32."""
    xq, d = quantize_activation(x)
    return xq.float() * d.repeat_interleave(ACT_BLOCK)[:xq.numel()]


def combine(k, ys: torch.Tensor, weights: list[float], present: list[bool], hidden: int) -> torch.Tensor:
    """sum_j weights[j] * ys[j] over present choices, in choice order, float32 -> bf16 [1, H]."""
    n = len(weights)
    w = (ctypes.c_float * max(n, 1))(*weights)       # a C array: cheaper than a tensor for k numbers
    p = (ctypes.c_int * max(n, 1))(*present)
    out = torch.empty((1, hidden), dtype=torch.bfloat16)
    k.combine(ys.data_ptr(), w, p, n, out.data_ptr(), hidden, _scratch(hidden).data_ptr())
    return out


class AttentionBlock:
    """One decoder layer's attention for one token in one native call; the weights' addresses and
    shapes are read once here (they never move after load), so a step passes only what changes.
    qkv: (fused bf16 weight [Hq*D + 2*Hkv*D, H], its bias, split), or (a QuantLinear of the fused
    q/k/v, None, split) with o_proj a QuantLinear too (pcmoe.nonexpert): then the block runs the
    quantised products (pcmoe_attention_block_quant)."""

    def __init__(self, k, layer, qkv, qk_norm: int, clip: float | None, head_dim: int):
        attn = layer.self_attn
        weight, bias, split = qkv
        norm_in, norm_post = layer.input_layernorm, layer.post_attention_layernorm
        qn, kn = (attn.q_norm, attn.k_norm) if qk_norm else (None, None)
        quant = None if isinstance(weight, torch.Tensor) else weight.mode   # a QuantLinear: "int8" / "int4"
        H, D = norm_in.weight.numel(), head_dim
        Hq, Hkv = split[0] // D, split[1] // D

        def ptr(t):
            return t.data_ptr() if t is not None else None

        norms = (ptr(qn.weight) if qn is not None else None, ptr(kn.weight) if kn is not None else None,
                 qn.variance_epsilon if qn is not None else 0.0, float(clip or 0.0))
        shapes = (ptr(norm_post.weight), norm_post.variance_epsilon, H, Hq, Hkv, D, attn.scaling)
        if quant is None:
            self.fn = k.attention_block
            self.lead = ()
            self.pre = (ptr(norm_in.weight), norm_in.variance_epsilon, ptr(weight), ptr(bias), qk_norm, *norms)
            self.post = (ptr(attn.o_proj.weight), ptr(attn.o_proj.bias), *shapes)
        else:
            o = attn.o_proj
            if o.mode != quant or o.s.dtype != weight.s.dtype or o.group != weight.group:
                raise ValueError("q/k/v and o_proj are quantised differently")
            self.fn = k.attention_block_quant
            self.lead = (QUANT_CODES[quant], int(weight.s.dtype == torch.float32), weight.group)
            self.pre = (ptr(norm_in.weight), norm_in.variance_epsilon, ptr(weight.q), ptr(weight.s), ptr(weight.bias),
                        qk_norm, *norms)
            self.post = (ptr(o.q), ptr(o.s), ptr(o.bias), *shapes)
        self.scratch_floats = k.attention_scratch_floats(H, Hq, Hkv, D, 0)
        self._keep = (weight, bias)  # the fused q/k/v tensors live as long as this block

    def __call__(self, x: torch.Tensor, cos_ptr: int, sin_ptr: int, keys: torch.Tensor, values: torch.Tensor,
                 position: int) -> torch.Tensor:
        """x [1, 1, H] is updated in place (x += attention); returns the post-attention RMSNorm
        of the new x, the MoE block's input."""
        h = torch.empty_like(x)
        self.fn(*self.lead, x.data_ptr(), h.data_ptr(), *self.pre, cos_ptr, sin_ptr, keys.data_ptr(),
                values.data_ptr(), position, keys.shape[2], *self.post,
                _scratch(self.scratch_floats + position).data_ptr())
        return h
