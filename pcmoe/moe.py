"""The expert bank (slots) and the MoE block that replaces a transformers MoE block.

Dimension legend:  T tokens, H hidden size, I expert intermediate size, S slots, k experts per token.

The bank holds S expert slots as stacked tensors ([S, 2I, H] etc.); `forward` takes slot ids, so
the kernel never knows which expert sits in a slot nor that slots are ever swapped.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from pcmoe.native import ops  # ctypes wrappers: importing them loads no library
from pcmoe.quant import LINEAR, quantize_into, quantized_shapes

# torch's grouped GEMM (one call for all experts of a step); absent from older torch versions.
HAS_GROUPED_MM = hasattr(F, "grouped_mm")
GROUP_ROWS = 8  # the grouped GEMM's rows per slot are padded to a multiple of this (SlotExperts._grouped_outputs)


def _grouped(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows x[offs[s-1]:offs[s]] @ w[s] for every slot s.  x [P, in], w [S, in, out] -> [P, out]."""
    return F.grouped_mm(x, w, offs=offs)


def padded_rows(x: torch.Tensor, multiple: int | None = None) -> torch.Tensor:
    """x [T, H] with zero rows appended up to a multiple of `multiple` (default GROUP_ROWS) rows: a
    product over it meets few row counts, so oneDNN builds few primitives (see GROUP_ROWS)."""
    multiple = multiple or GROUP_ROWS
    extra = -x.shape[0] % multiple
    return torch.cat([x, x.new_zeros((extra, *x.shape[1:]))]) if extra else x


def dense_linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.linear(x, w[name])

# ---------------------------------------------------------------------------------------------
# Expert kernels: the weights of one expert and its computation.


class GluKernel:
    """act(x Wg^T) * (x Wu^T), then W_down (Mixtral, Qwen, OLMoE, DeepSeek, PhiMoE)."""

    linear_weights = ("gate_up", "down")  # [out, in] matrices a quantised bank may replace

    def __init__(self, hidden: int, intermediate: int, act):
        self.tensors = {"gate_up": (2 * intermediate, hidden), "down": (hidden, intermediate)}
        self.act = act
        self.linear = dense_linear

    def __call__(self, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        gate, up = self.linear(x, w, "gate_up").chunk(2, dim=-1)   # [T, I] each
        return self.linear(self.act(gate) * up, w, "down")         # [T, H]

    def grouped(self, x, bank, offs, slots):
        """x [P, H] sorted by slot (offs = end of each slot's rows) -> [P, H]."""
        gate, up = _grouped(x, bank["gate_up"].transpose(1, 2), offs).chunk(2, dim=-1)   # [P, I]
        return _grouped((self.act(gate) * up).contiguous(), bank["down"].transpose(1, 2), offs)


class GptOssKernel:
    """gpt-oss: transposed weights with biases, interleaved gate/up, clamped SwiGLU."""

    linear_weights = ()  # [in, out] layout: not quantisable by the [out, in] kernels

    def __init__(self, hidden: int, intermediate: int, alpha: float, limit: float):
        self.tensors = {"gate_up": (hidden, 2 * intermediate), "gate_up_bias": (2 * intermediate,),
                        "down": (intermediate, hidden), "down_bias": (hidden,)}
        self.alpha, self.limit = alpha, limit

    def __call__(self, x, w):
        gate_up = x @ w["gate_up"] + w["gate_up_bias"]             # [T, 2I]
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        return ((up + 1) * glu) @ w["down"] + w["down_bias"]       # [T, H]

    def grouped(self, x, bank, offs, slots):
        gate_up = _grouped(x, bank["gate_up"], offs) + bank["gate_up_bias"][slots]       # [P, 2I]
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        return _grouped(((up + 1) * glu).contiguous(), bank["down"], offs) + bank["down_bias"][slots]


class MlpKernel:
    """Switch Transformers: W_o act(W_i x)."""

    linear_weights = ("wi", "wo")

    def __init__(self, hidden: int, intermediate: int, act):
        self.tensors = {"wi": (intermediate, hidden), "wo": (hidden, intermediate)}
        self.act = act
        self.linear = dense_linear

    def __call__(self, x, w):
        return self.linear(self.act(self.linear(x, w, "wi")), w, "wo")

    def grouped(self, x, bank, offs, slots):
        h = self.act(_grouped(x, bank["wi"].transpose(1, 2), offs))
        return _grouped(h.contiguous(), bank["wo"].transpose(1, 2), offs)


def expert_buffer(kernel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Room for one expert's weights as stored on disk (full precision): name -> empty tensor."""
    return {name: torch.empty(shape, dtype=dtype) for name, shape in kernel.tensors.items()}


def bank_tensors(kernel, dtype: torch.dtype, quant: str | None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors of one slot: name -> (shape, dtype)."""
    if quant is None:
        return {name: (shape, dtype) for name, shape in kernel.tensors.items()}
    if not kernel.linear_weights:
        raise ValueError(f"{type(kernel).__name__} experts cannot be quantised")
    out = {}
    for name, shape in kernel.tensors.items():
        if name in kernel.linear_weights:
            for suffix, (qshape, qdtype) in quantized_shapes(shape, quant).items():
                out[name + suffix] = (qshape, qdtype or dtype)
        else:
            out[name] = (shape, dtype)
    return out


def slot_nbytes(kernel, dtype: torch.dtype, quant: str | None = None) -> int:
    return sum(math.prod(shape) * dt.itemsize for shape, dt in bank_tensors(kernel, dtype, quant).values())


class SlotExperts(nn.Module):
    """S expert slots of one layer. Weights live in plain tensors (not parameters), one per
    weight kind, stacked over slots, so a slot is a contiguous view a swap can overwrite.
    With `quant` the linear weights are held as int8/int4 and quantised when a slot is filled."""

    def __init__(self, kernel, num_slots: int, dtype: torch.dtype, quant: str | None = None):
        super().__init__()
        self.kernel = kernel
        self.num_slots = num_slots
        self.dtype = dtype
        self.quant = quant
        self.use_grouped = HAS_GROUPED_MM and quant is None
        if quant is not None:
            kernel.linear = LINEAR[quant]
        self.bank = {name: torch.zeros((num_slots, *shape), dtype=dt)
                     for name, (shape, dt) in bank_tensors(kernel, dtype, quant).items()}
        self._staging = threading.local()
        self.stored_quantised = False  # slots are read already quantised (pcmoe.qcache; set by the loader)
        self.native = None          # pcmoe.native kernels for one-token outputs (set by the loader)
        self._ys = None             # [k, H] float32 outputs of the native path
        self._slots = [{name: t[s] for name, t in self.bank.items()} for s in range(num_slots)]  # fixed views

    def native_ok(self) -> bool:
        """Whether pcmoe.native computes this bank's experts: SiLU GLU experts in bfloat16, int4
        with outputs in whole blocks of 64 rows (torch's packing)."""
        k = self.kernel
        silu = k.act is F.silu or type(getattr(k, "act", None)).__name__ in ("SiLUActivation", "SiLU")
        if not isinstance(k, GluKernel) or self.dtype != torch.bfloat16 or not silu:
            return False
        return self.quant != "int4" or all(shape[0] % 64 == 0 for shape in k.tensors.values())

    @property
    def slot_nbytes(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.bank.values())

    def slot(self, s: int) -> dict[str, torch.Tensor]:
        """Views of slot s (valid until the next resize(), the only time the bank is reallocated)."""
        return self._slots[s]

    def resize(self, sources: list[int]) -> None:
        """Reallocate the bank with len(sources) slots, new slot j holding what old slot sources[j]
        held (-1: empty). Between forwards, with no load in flight. The old tensors are dropped, so
        a smaller bank really returns its memory (a tensor at a time: the peak is the old bank plus
        one new tensor)."""
        if not sources or any(not -1 <= s < self.num_slots for s in sources):
            raise ValueError("resize needs at least one slot and sources among the old slots")
        self._slots = self._args = None  # views of the old tensors: they would keep them alive
        for name in list(self.bank):
            old = self.bank[name]                                     # [S, ...]
            new = old.new_zeros((len(sources), *old.shape[1:]))       # [S', ...]
            for j, s in enumerate(sources):
                if s >= 0:
                    new[j].copy_(old[s])  # slot by slot: no gathered temporary of the whole bank
            self.bank[name] = new
            del old
        self.num_slots = len(sources)
        self._slots = [{name: t[s] for name, t in self.bank.items()} for s in range(self.num_slots)]
        self._ys = None  # the native path re-reads the slots' weight addresses

    def staging(self, s: int) -> dict[str, torch.Tensor]:
        """Where a load writes an expert's weights as stored: the slot itself, or (quantised banks)
        a per-thread full-precision buffer that commit() quantises into the slot."""
        if self.quant is None or self.stored_quantised:
            return self.slot(s)
        if not hasattr(self._staging, "buffers"):
            self._staging.buffers = expert_buffer(self.kernel, self.dtype)
        return self._staging.buffers

    def write(self, s: int, weights: dict[str, torch.Tensor]) -> None:
        """Overwrite slot s with one expert's weights as staged: full precision (quantised here
        for a quantised bank), or already quantised where the bank is read from a copy."""
        if self.quant is not None and not self.stored_quantised:
            self.commit(s, weights)
            return
        slot = self.slot(s)
        for name, w in weights.items():
            slot[name].copy_(w)

    def commit(self, s: int, staged: dict[str, torch.Tensor]) -> None:
        if self.quant is None or self.stored_quantised:
            return
        slot = self.slot(s)
        for name, w in staged.items():
            if name in self.kernel.linear_weights:
                quantize_into(w, slot[name + ".q"], slot[name + ".s"], self.quant)
            else:
                slot[name].copy_(w)

    # Outputs are combined over a token's k choices in choice order, whatever the slots: the same
    # experts give the same bits whichever slots hold them (on-demand == full at every dtype).

    def outputs_one(self, x: torch.Tensor, slots: list[int], into: list | None = None) -> list:
        """One token: each choice's expert output [1, H] (None where the slot is -1 and `into`
        has nothing yet). `into` keeps outputs computed in an earlier round. The native path
        writes float32 rows of one buffer that combine_one() sums."""
        ys = list(into) if into is not None else [None] * len(slots)
        if self.native is not None:
            return self._native_outputs_one(x, slots, ys)
        for j, s in enumerate(slots):
            if s >= 0:
                ys[j] = self.kernel(x, self._slots[s])
        return ys

    def _native_outputs_one(self, x, slots, ys):
        hidden, inter = x.shape[-1], self.kernel.tensors["down"][1]
        if self._ys is None or self._ys.shape[0] < len(slots):
            self._ys = torch.empty((len(slots), hidden), dtype=torch.float32)
            self._args = [ops.expert_args(self.quant, w) for w in self._slots]
        x = x.contiguous()
        for j, s in enumerate(slots):
            if s >= 0:
                ops.glu_expert(self.native, self.quant, self._slots[s], x, self._ys[j], hidden, inter, self._args[s])
                ys[j] = self._ys[j]
        return ys

    def output_row(self, j: int) -> torch.Tensor | None:
        """Where the native one-token path keeps choice j's output ([H] float32; None when eager or
        before outputs_one): a choice computed elsewhere (a shadow expert) is written there, so
        combine_one sums it with the others."""
        if self.native is None or self._ys is None or j >= self._ys.shape[0]:
            return None
        return self._ys[j]

    def combine_one(self, x: torch.Tensor, ys: list, weights: list[float]) -> torch.Tensor:
        if self.native is not None:
            present = [y is not None for y in ys]
            return ops.combine(self.native, self._ys if self._ys is not None else x.new_zeros(0, dtype=torch.float32),
                               weights, present, x.shape[-1])
        out = None
        for y, w in zip(ys, weights):
            if y is not None:
                out = y.mul_(w) if out is None else out.add_(y, alpha=w)
        return torch.zeros_like(x) if out is None else out

    def forward_one(self, x: torch.Tensor, slots: list[int], weights: list[float]) -> torch.Tensor:
        """One token: x [1, H], its k slots (-1 = none) and weights as Python numbers -> [1, H]."""
        return self.combine_one(x, self.outputs_one(x, slots), weights)

    def outputs(self, x: torch.Tensor, slot_idx: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """Each (token, choice)'s expert output: x [T, H], slot_idx [T, k] (-1 = none) -> [T, k, H]
        (zeros where -1, or what `into` held there from an earlier round)."""
        T, k = slot_idx.shape
        out = into if into is not None else x.new_zeros((T, k, x.shape[-1]))
        # Sort the (token, choice) pairs by slot once; each slot's rows are then contiguous.
        flat = slot_idx.reshape(-1)                                 # [T*k]
        pairs = (flat >= 0).nonzero().squeeze(1)                    # [P]
        if pairs.numel() == 0:
            return out
        slots, order = torch.sort(flat[pairs], stable=True)         # [P]
        pairs = pairs[order]
        counts = torch.bincount(slots, minlength=self.num_slots)    # [S]
        if self.use_grouped:
            ys = self._grouped_outputs(x[pairs // k], slots, counts)
        else:  # the slow twin: one kernel call per slot
            xs = x[pairs // k]                                      # [P, H]
            ys = torch.empty_like(xs)
            start = 0
            for s, c in enumerate(counts.tolist()):
                if c:
                    ys[start:start + c] = self.kernel(xs[start:start + c], self.slot(s))
                    start += c
        out.view(T * k, -1).index_copy_(0, pairs, ys)
        return out

    def _grouped_outputs(self, xs: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [P, H] sorted by slot -> [P, H] in one grouped GEMM per weight. Each slot's rows are
        padded with zero rows to a multiple of GROUP_ROWS: oneDNN builds a primitive (JIT code and
        buffers, ~0.35 MiB) for every row count it meets, and a prefill chunk meets every count from 1
        to its length (measured on the shipped LM: 22 MiB less peak RSS over 4096 tokens, results
        bit-identical, as fast within noise)."""
        padded = (counts + GROUP_ROWS - 1) // GROUP_ROWS * GROUP_ROWS       # [S]
        if torch.equal(padded, counts):
            return self.kernel.grouped(xs, self.bank, torch.cumsum(counts, 0).to(torch.int32), slots)
        # Row r of slot s moves from (start of s) + r to (padded start of s) + r.
        shift = torch.repeat_interleave(torch.cumsum(padded, 0) - padded - (torch.cumsum(counts, 0) - counts), counts)
        rows = shift + torch.arange(xs.shape[0])                              # [P]
        xp = xs.new_zeros((int(padded.sum()), xs.shape[1]))                   # [P', H]
        xp[rows] = xs
        slots_p = torch.repeat_interleave(torch.arange(self.num_slots), padded)  # [P']
        return self.kernel.grouped(xp, self.bank, torch.cumsum(padded, 0).to(torch.int32), slots_p)[rows]

    @staticmethod
    def combine(ys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """ys [T, k, H], weights [T, k] -> [T, H], summed in choice order."""
        w = weights.to(ys.dtype)
        out = ys[:, 0] * w[:, :1]
        for j in range(1, ys.shape[1]):
            out += ys[:, j] * w[:, j:j + 1]
        return out

    def forward(self, x: torch.Tensor, slot_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], slot_idx [T, k] (-1 = no expert), weights [T, k] -> [T, H]."""
        if x.shape[0] == 1:  # decode: a handful of experts, no gather/scatter
            return self.forward_one(x, slot_idx[0].tolist(), weights[0].tolist())
        return self.combine(self.outputs(x, slot_idx), weights)


class CommitteeMoE(nn.Module):
    """Drop-in replacement for a transformers MoE block.

    Keeps the original block's router and shared-expert submodules under their own names (so the
    checkpoint's non-expert keys still load), swaps the fused experts for a SlotExperts bank, and
    routes through a controller (the serving policy: committee, on-demand, ...). `bound` holds the
    family's router logits, shared experts and output packing, bound to this block at load;
    `on_enter(layer, tokens)` is called first in every forward (the runtime's step boundary)."""

    def __init__(self, original: nn.Module, experts: SlotExperts, layer: int, name: str):
        super().__init__()
        for child_name, child in original.named_children():
            if child_name != "experts":
                self.add_module(child_name, child)
        self.experts = experts
        self.layer = layer          # index among the model's MoE blocks
        self.block_name = name      # module path in the model
        self.bound = None           # set by the loader (models.BoundBlock)
        self.controller = None      # set by the loader
        self.on_enter = None        # set by the runtime

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        shape = hidden_states.shape                                 # [B, S, H]
        x = hidden_states.reshape(-1, shape[-1])                    # [T, H]
        if self.on_enter is not None:
            self.on_enter(self.layer, x.shape[0])
        logits = self.bound.logits(x)                               # [T, N]
        y = self.controller.forward(x, logits, self.experts, tuple(shape[:-1]))  # [T, H]
        y = self.bound.shared(x, y)
        return self.bound.pack(y.reshape(shape))
