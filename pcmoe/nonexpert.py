"""Quantised non-expert weights for the lean decoder: attention projections and the LM head held
as int8 (one scale per row) or int4 (groups of 32 input columns), the layouts of pcmoe.quant.

At 1.3 GB the model reads per token ~150 MB of experts but also ~50 MB of attention and a 65 MB
LM head; quantising only the experts leaves those at bf16. A QuantLinear has three forwards:
- `forward`: torch's int8/int4 CPU kernels, any number of rows (prefill, the eager decode);
- `native`: the VNNI gemv of pcmoe/native for one token (activation rounded to int8 per block of
  32, as for the experts);
- `reference`: dequantise + matmul in float32, the exact twin both are tested against.
A tied embedding reads its rows from the quantised head (`QuantEmbedding`), so the bf16 copy goes.

Dimension legend: n rows (tokens), in / out features, G input groups, V vocabulary, H hidden.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from pcmoe.budget import is_quantised_nonexpert  # the tensors the byte accounting quantises
from pcmoe.native import ops  # ctypes wrappers: importing them loads no library
from pcmoe.quant import QUANT_MODES, dequantize, int4_group, quantize_into, quantized_shapes

NONEXPERT_MODES = QUANT_MODES


class NonexpertError(ValueError):
    """A model whose non-expert weights cannot be quantised as asked (one line)."""


def check_shape(out_f: int, in_f: int, mode: str, what: str) -> None:
    if mode not in NONEXPERT_MODES:
        raise NonexpertError(f"unknown non-expert quantisation {mode!r}; use int8 or int4")
    if mode == "int4" and (in_f % 32 or out_f % 64):
        raise NonexpertError(f"int4 non-expert weights need [out, in] with out a multiple of 64 and in of 32; "
                             f"{what} is [{out_f}, {in_f}] (use int8)")


_QKV = re.compile(r"^(.*\.self_attn\.)[qkv]_proj\.weight$")


def layout_error(shapes: dict[str, tuple[int, ...]], mode: str) -> str | None:
    """What quantize_nonexpert's shape checks would say of a checkpoint, from its non-expert tensor
    names and shapes alone (q, k and v fused per layer as it fuses them); None if `mode` fits."""
    fused: dict[str, list[int]] = {}                                  # layer prefix -> [rows, in]
    try:
        for name, shape in shapes.items():
            if not is_quantised_nonexpert(name, shape):
                continue
            m = _QKV.match(name)
            if m:
                fused.setdefault(m.group(1), [0, shape[1]])[0] += shape[0]
            else:
                check_shape(shape[0], shape[1], mode, name)
        for prefix, (rows, in_f) in fused.items():
            check_shape(rows, in_f, mode, prefix + "q/k/v")
    except NonexpertError as e:
        return str(e)
    return None


class QuantLinear(nn.Module):
    """x W^T + b with W [out, in] held quantised (buffers q, s; bias bf16 as loaded)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mode: str, what: str = "weight"):
        super().__init__()
        out_f, in_f = weight.shape
        check_shape(out_f, in_f, mode, what)
        self.mode, self.out_features, self.in_features = mode, out_f, in_f
        self.dtype = weight.dtype                                   # activations and outputs
        shapes = quantized_shapes((out_f, in_f), mode)
        q = torch.empty(shapes[".q"][0], dtype=shapes[".q"][1])
        s = torch.empty(shapes[".s"][0], dtype=weight.dtype)
        quantize_into(weight.detach(), q, s, mode)
        self.register_buffer("q", q)
        self.register_buffer("s", s)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.group = int4_group(in_f) if mode == "int4" else 0
        self._native_args = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.s, self.bias) if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] with torch's kernels (bf16 in, bf16 out for bf16 models)."""
        rows = x.reshape(-1, self.in_features).to(self.dtype).contiguous()
        if self.mode == "int8":
            y = torch._weight_int8pack_mm(rows, self.q, self.s)
        else:
            y = torch._weight_int4pack_mm_for_cpu(rows, self.q, self.group, self.s)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def weight_float(self) -> torch.Tensor:
        """The float32 [out, in] weight the quantised tensors stand for."""
        return dequantize(self.q, self.s, self.mode)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The slow twin: dequantise, then one float32 matmul -> [..., out] float32."""
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight_float(), bias)

    def native(self, k, x: torch.Tensor) -> torch.Tensor:
        """One row with the native kernels: x [in] (any float dtype) -> [out] float32, bias added
        (VNNI where the CPU has it: the activation rounded to int8 per block of 32)."""
        if self._native_args is None:
            self._native_args = (ops.QUANT_CODES[self.mode], 1, self.q.data_ptr(), self.s.data_ptr(),
                                 int(self.s.dtype == torch.float32), self.group)
            self._scratch_floats = k.act_scratch_floats(self.in_features)
        xf = x.reshape(-1).float().contiguous()
        y = torch.empty(self.out_features, dtype=torch.float32)
        k.gemv_quant(*self._native_args, xf.data_ptr(), y.data_ptr(), self.out_features, self.in_features,
                     ops._scratch(self._scratch_floats).data_ptr())
        if self.bias is not None:
            y += self.bias
        return y

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` [n] of the dequantised weight -> [n, in] float32, without dequantising the rest
        (an embedding lookup in a tied head)."""
        ids = ids.reshape(-1)
        if self.mode == "int8":
            return self.q[ids].float() * self.s[ids].float()[:, None]
        in_f = self.in_features
        packed = self.q.view(self.out_features // 64, in_f, 32)                 # int4pack, see quant.dequantize
        j = ids % 64
        byte = packed[ids // 64, :, j % 32]                                     # [n, in]
        codes = torch.where((j < 32)[:, None], byte & 0x0F, byte >> 4).float()
        scale = self.s[:, ids, 0].float().t().repeat_interleave(self.group, dim=1)   # [n, in]
        zero = self.s[:, ids, 1].float().t().repeat_interleave(self.group, dim=1)
        return (codes - 8.0) * scale + zero


class QuantEmbedding(nn.Module):
    """An embedding whose rows are those of a quantised [V, H] matrix: the LM head of a tied model,
    or the embedding's own quantised table (held in a QuantLinear, attribute `head`, for its rows())."""

    def __init__(self, head: QuantLinear):
        super().__init__()
        self.head = head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> [..., H] in the model's dtype."""
        return self.head.rows(ids).to(self.head.dtype).view(*ids.shape, self.head.in_features)


def _fused_qkv(attn, mode: str, layer: int) -> tuple[QuantLinear, list[int]]:
    """q, k and v as one quantised [Hq*D + 2*Hkv*D, H] projection (per-row scales and per-row
    groups: the same numbers as three separate ones, one native call instead of three)."""
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    split = [p.weight.shape[0] for p in projs]
    weight = torch.cat([p.weight.detach() for p in projs])
    biases = [p.bias for p in projs]
    if any(b is not None for b in biases) and not all(b is not None for b in biases):
        raise NonexpertError("q/k/v projections with and without bias")
    bias = torch.cat([b.detach() for b in biases]) if biases[0] is not None else None
    return QuantLinear(weight, bias, mode, f"layer {layer} q/k/v"), split


def quantize_nonexpert(model, mode: str) -> dict:
    """Replace the attention projections and the LM head of a lean-decoder model (after loading)
    by QuantLinear modules; a tied embedding reads the quantised head, an untied one is quantised
    too (rows dequantised on lookup). Returns what was done:
    {"precision", "bytes_before", "bytes_after", "tied"} over the tensors replaced."""
    if mode not in NONEXPERT_MODES:
        raise NonexpertError(f"unknown non-expert quantisation {mode!r}; use int8 or int4")
    base = model.model
    head, embed = model.lm_head, base.embed_tokens
    tied = head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr()
    # Every shape first: no half-quantised model on a bad one.
    for i, layer in enumerate(base.layers):
        attn = layer.self_attn
        rows = sum(p.weight.shape[0] for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        check_shape(rows, attn.q_proj.weight.shape[1], mode, f"layer {i} q/k/v")
        check_shape(*attn.o_proj.weight.shape, mode, f"layer {i} o_proj")
    check_shape(*head.weight.shape, mode, "the LM head")
    if not tied:
        check_shape(*embed.weight.shape, mode, "the embedding")
    before = after = 0

    def size(*tensors):
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    for i, layer in enumerate(base.layers):
        attn = layer.self_attn
        projs = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
        before += size(*(t for p in projs for t in (p.weight, p.bias)))
        qkv, split = _fused_qkv(attn, mode, i)
        o = QuantLinear(attn.o_proj.weight, attn.o_proj.bias, mode, f"layer {i} o_proj")
        attn.qkv_quant, attn.qkv_split = qkv, split
        attn.q_proj = attn.k_proj = attn.v_proj = None           # the bf16 tensors are freed
        attn.o_proj = o
        after += qkv.nbytes() + o.nbytes()
    before += size(head.weight)
    quant_head = QuantLinear(head.weight, None, mode, "the LM head")
    model.lm_head = quant_head
    after += quant_head.nbytes()
    if tied:
        base.embed_tokens = QuantEmbedding(quant_head)
    else:  # its own rows, quantised as llama.cpp's k-quant GGUFs hold token_embd
        before += size(embed.weight)
        quant_embed = QuantLinear(embed.weight, None, mode, "the embedding")
        base.embed_tokens = QuantEmbedding(quant_embed)
        after += quant_embed.nbytes()
    return {"precision": mode, "bytes_before": before, "bytes_after": after, "tied": bool(tied)}


def is_quantized(model) -> bool:
    return isinstance(getattr(model, "lm_head", None), QuantLinear)
