"""The expert bank: grouped GEMM path == per-slot loop == a per-token reference, for every kernel."""

import pytest
import torch
import torch.nn.functional as F

from pcmoe import moe
from pcmoe.moe import HAS_GROUPED_MM, GluKernel, GptOssKernel, MlpKernel, SlotExperts

KERNELS = {
    "glu": lambda: GluKernel(16, 8, F.silu),
    "gpt_oss": lambda: GptOssKernel(16, 8, alpha=1.702, limit=7.0),
    "mlp": lambda: MlpKernel(16, 12, F.relu),
}


def reference(bank: SlotExperts, x, slot_idx, weights):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(slot_idx.shape[1]):
            s = int(slot_idx[t, j])
            if s >= 0:
                out[t] += weights[t, j] * bank.kernel(x[t:t + 1], bank.slot(s))[0]
    return out


@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("tokens", [1, 7])
def test_bank_paths_agree(kind, tokens):
    torch.manual_seed(0)
    bank = SlotExperts(KERNELS[kind](), num_slots=5, dtype=torch.float32)
    for t in bank.bank.values():
        t.normal_(0, 0.3)
    x = torch.randn(tokens, 16)
    slot_idx = torch.randint(-1, 5, (tokens, 3))
    weights = torch.rand(tokens, 3)
    expected = reference(bank, x, slot_idx, weights)
    bank.use_grouped = False
    loop = bank(x, slot_idx, weights)
    torch.testing.assert_close(loop, expected, atol=1e-5, rtol=1e-5)
    if HAS_GROUPED_MM:
        bank.use_grouped = True
        torch.testing.assert_close(bank(x, slot_idx, weights), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch without grouped_mm")
@pytest.mark.parametrize("kernel", [GluKernel(16, 8, F.silu), GptOssKernel(16, 8, alpha=1.702, limit=7.0),
                                    MlpKernel(16, 16, F.relu)], ids=["glu", "gpt_oss", "mlp"])
def test_grouped_rows_are_padded_without_changing_outputs(kernel, monkeypatch):
    """Each slot's rows reach the grouped GEMM padded to a multiple of GROUP_ROWS (bounding the
    row counts oneDNN builds primitives for); the outputs are the unpadded ones, bit for bit."""
    torch.manual_seed(1)
    bank = SlotExperts(kernel, num_slots=5, dtype=torch.bfloat16)
    for t in bank.bank.values():
        t.normal_(0, 0.3)
    x = torch.randn(11, 16, dtype=torch.bfloat16)
    slot_idx, weights = torch.randint(-1, 5, (11, 3)), torch.rand(11, 3)
    monkeypatch.setattr(moe, "GROUP_ROWS", 1)
    unpadded = bank(x, slot_idx, weights)
    monkeypatch.setattr(moe, "GROUP_ROWS", 8)
    seen = []
    grouped = bank.kernel.grouped

    def spy(xs, b, offs, slots):
        seen.append(offs)
        return grouped(xs, b, offs, slots)

    monkeypatch.setattr(bank.kernel, "grouped", spy)
    assert torch.equal(bank(x, slot_idx, weights), unpadded)
    assert seen and all(int(v) % 8 == 0 for offs in seen for v in offs)


def test_no_valid_choice_gives_zero():
    bank = SlotExperts(KERNELS["glu"](), num_slots=2, dtype=torch.float32)
    assert torch.equal(bank(torch.randn(3, 16), torch.full((3, 2), -1), torch.ones(3, 2)), torch.zeros(3, 16))


@pytest.mark.parametrize("quant, tolerance", [("int8", 0.02), ("int4", 0.25)])
@pytest.mark.parametrize("kind", ["glu", "mlp"])
def test_quantized_bank_is_close_to_full_precision(kind, quant, tolerance):
    torch.manual_seed(0)
    kernel = {"glu": lambda: GluKernel(64, 32, F.silu), "mlp": lambda: MlpKernel(64, 64, F.relu)}[kind]
    full = SlotExperts(kernel(), num_slots=3, dtype=torch.float32)
    quantized = SlotExperts(kernel(), num_slots=3, dtype=torch.float32, quant=quant)
    for s in range(3):
        weights = {n: torch.randn(t.shape[1:]) * 0.1 for n, t in full.bank.items()}
        for n, w in weights.items():
            full.bank[n][s].copy_(w)
        staged = quantized.staging(s)
        for n, w in weights.items():
            staged[n].copy_(w)
        quantized.commit(s, staged)
    assert quantized.slot_nbytes <= full.slot_nbytes / (3.5 if quant == "int8" else 5)
    x = torch.randn(5, 64)
    idx = torch.randint(0, 3, (5, 2))
    w = torch.rand(5, 2)
    ref, got = full(x, idx, w), quantized(x, idx, w)
    rel = (got - ref).norm() / ref.norm()
    assert rel < tolerance, f"relative error {rel:.4f}"


def test_int4_round_trip_beats_min_max_rounding():
    """The least-squares refit of each group's grid lowers the squared error of min/max rounding
    (whose error is at most half a step) and clamps no weight by more than one step."""
    from pcmoe import quant
    from pcmoe.quant import int4_linear, quantize_into, quantized_shapes

    torch.manual_seed(0)
    w = torch.randn(64, 64) * 0.1
    shapes = quantized_shapes((64, 64), "int4")
    step = (w.view(64, 2, 32).amax(-1) - w.view(64, 2, 32).amin(-1)) / 15           # [out, groups]

    def round_trip(refits):
        q, s = (torch.empty(shape, dtype=dt or torch.float32) for shape, dt in shapes.values())
        old, quant.LS_REFITS = quant.LS_REFITS, refits
        try:
            quantize_into(w, q, s, "int4")
        finally:
            quant.LS_REFITS = old
        return int4_linear(torch.eye(64), {"w.q": q, "w.s": s}, "w").t() - w          # [out, in] error

    plain, refitted = round_trip(0), round_trip(quant.LS_REFITS)
    assert ((plain.abs().view(64, 2, 32)) <= step[..., None] / 2 + 1e-4).all()
    assert (refitted ** 2).mean() < 0.97 * (plain ** 2).mean()
    assert ((refitted.abs().view(64, 2, 32)) <= step[..., None] + 1e-4).all()


class _ScaleKernel:
    """Expert e multiplies its input by c_e: the layer's output has a closed form."""

    linear_weights = ()
    tensors = {"c": (1,)}

    def __call__(self, x, w):
        return x * w["c"]


@pytest.mark.parametrize("tokens", [1, 3])
def test_exchange_matches_a_closed_form(tokens):
    """Members {0, 2} of 4 experts; the router prefers 1 and 3. Exchange gives each token the two
    members, weighted by the softmax over the members' logits only (option A, renormalised)."""
    import math

    from pcmoe.committee import LayerCommittee
    from pcmoe.importance import ImportanceTracker
    from pcmoe.models import BoundRouter
    from pcmoe.moe import SlotExperts
    from pcmoe.policies import MaskedGatingController
    from pcmoe.routing import softmax_topk, softmax_topk_one

    bank = SlotExperts(_ScaleKernel(), 2, torch.float64)
    bank.use_grouped = False
    committee = LayerCommittee(4, 2)
    for slot, (expert, c) in enumerate([(0, 1.0), (2, 100.0)]):
        bank.slot(slot)["c"].fill_(c)
        committee.install(expert, slot)
    router = BoundRouter(lambda lg, m, batch=None: softmax_topk(lg, 2, True, m, True),
                         lambda v, m=None: softmax_topk_one(v, 2, True, m, True), 2, True)
    ctrl = MaskedGatingController(committee, ImportanceTracker(torch.ones(4, dtype=torch.float64)), router)
    logits = torch.tensor([[1.0, 3.0, 0.5, 2.0]] * tokens, dtype=torch.float64)
    x = torch.arange(1.0, 1.0 + tokens * 2, dtype=torch.float64).view(tokens, 2)
    y = ctrl.forward(x, logits, bank, (1, tokens))
    w0 = math.exp(1.0) / (math.exp(1.0) + math.exp(0.5))
    expected = x * (w0 * 1.0 + (1 - w0) * 100.0)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)  # routing runs in float32
    assert ctrl.stats.choices == 2 * tokens and ctrl.stats.hits == 0 and ctrl.stats.exchanged == 2 * tokens
