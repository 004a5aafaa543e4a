"""Shadow experts and the per-miss chooser (issue 13): packing, the slow twins, the budget, exactness
with every expert resident, every family, the chooser's actions and statistics."""

from __future__ import annotations

import pytest
import torch

import pcmoe
from pcmoe import shadow as S
from pcmoe.budget import ModelBytes, shadow_split
from pcmoe.models import REGISTRY
from pcmoe.moe import GluKernel
from pcmoe.options import PcmoeError
from pcmoe.testing import ALL_FAMILIES, make_checkpoint

QUANTISABLE = [f for f in ALL_FAMILIES if REGISTRY[f].tiny_config is not None and f != "gpt_oss"]


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_planes_round_trip_and_dequantize_twin(bits):
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    codes, sm = S.quantize_group(w, bits, 32)
    assert int(codes.max()) <= 2 ** bits - 1
    planes = S.pack_planes(codes, bits)
    assert planes.shape == (bits, 16, 8) and planes.dtype == torch.uint8
    assert torch.equal(S.unpack_planes(planes), codes)
    fast = S.dequantize(planes, sm, torch.float32)
    assert torch.allclose(fast, S.dequantize_reference(planes, sm, torch.float32), atol=1e-6)
    for chunk in (1, 5, 16, 100):  # a row chunk at a time (bounded temporaries): the same numbers
        into = torch.empty(16, 64, dtype=torch.bfloat16)
        S.dequantize_into(into, planes, sm, chunk_rows=chunk)
        assert torch.equal(into, S.dequantize(planes, sm, torch.bfloat16)), chunk
    # the clipping search never does worse than the plain min/max range
    err = (fast - w).pow(2).sum()
    lo, hi = w.view(16, 2, 32).amin(-1), w.view(16, 2, 32).amax(-1)
    scale = (hi - lo) / (2 ** bits - 1)
    plain = torch.round((w.view(16, 2, 32) - lo[..., None]) / scale[..., None]) * scale[..., None] + lo[..., None]
    assert err <= (plain.view(16, 64) - w).pow(2).sum() + 1e-6


@pytest.mark.parametrize("mode", ["int1", "int2", "int3", "vq6", "vq8", "lowrank"])
def test_shadow_fast_path_agrees_with_its_reference(mode):
    torch.manual_seed(1)
    kernel = GluKernel(64, 32, torch.nn.functional.silu)
    bank = S.ShadowBank(kernel, 4, [1, 3], torch.float32, mode, group=32, rank=8)
    for e in (1, 3):
        bank.write(e, {name: torch.randn(shape) for name, shape in kernel.tensors.items()})
    assert bank.has(1) and not bank.has(0)
    x = torch.randn(5, 64)
    for e in (1, 3):
        assert torch.allclose(bank.forward_one(x, e), bank.reference_one(x, e), atol=1e-4)
    assert bank.shadow_nbytes == S.shadow_nbytes(kernel, torch.float32, mode, 32, 8)
    assert 0 < bank.weight_error() < 1


def test_many_token_shadows_pad_their_rows_without_changing_outputs(monkeypatch):
    """More tokens than the native path takes: the dequantised shadow sees its rows padded to a
    multiple of moe.GROUP_ROWS (few oneDNN primitives); each token's output is the unpadded one."""
    from pcmoe import moe

    torch.manual_seed(2)
    kernel = GluKernel(64, 32, torch.nn.functional.silu)
    bank = S.ShadowBank(kernel, 2, [0, 1], torch.bfloat16, "int2", group=32)
    bank.write(1, {name: torch.randn(shape) for name, shape in kernel.tensors.items()})
    x = torch.randn(11, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(moe, "GROUP_ROWS", 1)
    unpadded = bank.forward_one(x, 1)
    monkeypatch.setattr(moe, "GROUP_ROWS", 8)
    rows = []
    call = bank.kernel.__call__
    monkeypatch.setattr(type(bank.kernel), "__call__", lambda self, xs, w: rows.append(xs.shape[0]) or call(xs, w))
    assert torch.equal(bank.forward_one(x, 1), unpadded) and rows == [16]


def test_one_bit_codes_are_the_two_means_of_each_group():
    """int1: each group's two levels are the means of the weights on either side of their midpoint
    (least squared error), not the ends of a clipped range: ~0.6 relative error on normal weights."""
    torch.manual_seed(3)
    w = torch.randn(32, 256)
    codes, sm = S.quantize_group(w, 1, 128)
    deq = S.dequantize(S.pack_planes(codes, 1), sm, torch.float32)
    rel = float((deq - w).norm() / w.norm())
    assert 0.55 < rel < 0.65                                   # sqrt(1 - 2/pi) = 0.603 for a normal distribution
    wg, cg = w.view(32, 2, 128), codes.view(32, 2, 128).bool()
    lo = (wg * ~cg).sum(-1) / (~cg).sum(-1)
    hi = (wg * cg).sum(-1) / cg.sum(-1)
    assert torch.allclose(sm[..., 1], lo, atol=1e-5) and torch.allclose(sm[..., 0] + sm[..., 1], hi, atol=1e-5)
    assert torch.equal(cg, wg > ((lo + hi) / 2)[..., None])    # a fixed point: every weight at its nearer level
    flat = torch.full((2, 128), 0.25)                          # a constant group: one level, exact
    c, m = S.quantize_group(flat, 1, 128)
    assert torch.equal(S.dequantize(S.pack_planes(c, 1), m, torch.float32), flat)


def test_vector_codes_round_trip_and_dequantize_twin():
    """vq: the codes are each vector's nearest codebook entry (k-means' last assignment), the fast
    and the weight-by-weight dequantisation agree, and the error falls with the code bits."""
    torch.manual_seed(4)
    weights = {"a": torch.randn(16, 64), "b": torch.randn(8, 32) * 3}
    errors = []
    for bits in (4, 6, 7, 8):
        codebook, coded = S.quantize_vq(weights, bits, {"a": 32, "b": 32})
        assert codebook.shape == (2 ** bits, S.VQ_DIM)
        num = den = 0.0
        for name, w in weights.items():
            codes, scale = coded[name]
            assert codes.shape == (w.shape[0], w.shape[1] // S.VQ_DIM) and scale.shape == (w.shape[0], w.shape[1] // 32)
            vectors, _ = S._vq_vectors(w, 32)
            assert torch.equal(codes.reshape(-1).long(), S._nearest(vectors, codebook))
            packed = S.pack_codes(codes, bits)
            assert packed.shape == (w.shape[0], w.shape[1] // S.VQ_DIM * bits // 8)
            assert torch.equal(S.unpack_codes(packed, bits), codes)
            fast = S.dequantize_vq(packed, scale, codebook, torch.float32)
            assert torch.allclose(fast, S.dequantize_vq_reference(packed, scale, codebook, torch.float32), atol=1e-5)
            num, den = num + float((fast - w).pow(2).sum()), den + float(w.pow(2).sum())
        errors.append((num / den) ** 0.5)
    assert errors[0] > errors[1] > errors[2] > errors[3] > 0
    top = torch.full((2, 16), 255, dtype=torch.uint8)          # 8-bit codes fill all 64 bits of a run
    assert torch.equal(S.unpack_codes(S.pack_codes(top, 8), 8), top)
    again, _ = S.quantize_vq(weights, 6, {"a": 32, "b": 32})
    assert torch.equal(again, S.quantize_vq(weights, 6, {"a": 32, "b": 32})[0])   # deterministic


def test_kmeans_on_a_sample_codes_every_vector():
    """Above fit_rows vectors the codebook is fitted on a seeded sample; every vector still gets its
    nearest centre, and the error stays close to fitting on all of them."""
    torch.manual_seed(6)
    x = torch.randn(6000, S.VQ_DIM)
    full_cb, full_codes = S.kmeans(x, 32)
    cb, codes = S.kmeans(x, 32, fit_rows=1500)
    assert codes.shape == (6000,) and torch.equal(codes, S._nearest(x, cb))
    assert torch.equal(cb, S.kmeans(x, 32, fit_rows=1500)[0])                 # deterministic
    err = float((cb[codes] - x).pow(2).mean())
    assert err <= 1.05 * float((full_cb[full_codes] - x).pow(2).mean())


def test_shadow_bytes_are_the_bits_they_claim():
    kernel = GluKernel(256, 256, torch.nn.functional.silu)   # the shipped LM's expert: 196608 weights
    weights = 3 * 256 * 256
    assert S.shadow_nbytes(kernel, torch.bfloat16, "int1") == weights // 8 + weights // 128 * 4
    # vq7: 7 bits per 4 weights, a bf16 scale per 256 inputs, a 128 x 4 bf16 codebook
    assert S.shadow_nbytes(kernel, torch.bfloat16, "vq7") == weights * 7 // 32 + weights // 256 * 2 + 128 * 4 * 2
    assert S.shadow_nbytes(kernel, torch.bfloat16, "int2") == weights * 2 // 8 + weights // 128 * 4
    assert S.shadow_nbytes(kernel, torch.bfloat16, "int3") == weights * 3 // 8 + weights // 128 * 4
    assert S.shadow_nbytes(kernel, torch.bfloat16, "lowrank", rank=8) == 8 * 2 * (512 + 256 + 256 + 256)


def test_shadow_split_fits_the_budget_and_trades_members_for_shadows():
    sizes = ModelBytes(1000, [100, 100], [8, 8])
    committee, shadows = shadow_split(sizes, 1000 + 2 * (3 * 100 + 5 * 20), [20, 20])
    assert committee == [3, 3] and shadows == [5, 5]
    committee, shadows = shadow_split(sizes, 1000 + 2 * (3 * 100 + 5 * 20) + 80, [20, 20])
    assert committee == [4, 3] and shadows == [4, 5]          # one more member costs 100 and frees 20
    committee, shadows = shadow_split(sizes, 1000 + 2 * (4 * 100 + 2 * 20), [20, 20], shadows=2)
    assert committee == [4, 4] and shadows == [2, 2]
    with pytest.raises(ValueError, match="below the minimum"):
        shadow_split(sizes, 1100, [20, 20])


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shadow") / "qwen3"
    make_checkpoint("qwen3_moe", folder)
    return folder


def _logits(engine, ids):
    state = engine.new_state()
    with torch.inference_mode():
        prompt = engine.forward(torch.tensor([ids[:-2]]), state)
        steps = [engine.forward(torch.tensor([[t]]), state) for t in ids[-2:]]  # the one-token path too
    return torch.cat([prompt, *steps])


IDS = [3, 17, 5, 90, 41, 7, 64, 2, 11, 30, 8, 51]


def test_all_experts_resident_is_bit_identical_with_shadows_on(qwen):
    plain = pcmoe.load(qwen, policy="committee", progress=False)
    shadowed = pcmoe.load(qwen, policy="committee", progress=False, shadow="int2")
    assert torch.equal(_logits(plain, IDS), _logits(shadowed, IDS))
    assert shadowed.stats()["shadow_bytes"] == 0 and shadowed.controllers[0].chooser is None


def _budget(folder, members, shadows, mode="int2"):
    """Non-expert bytes + `members` experts and `shadows` shadows per layer (fixed subset)."""
    engine = pcmoe.load(folder, policy="full", progress=False)
    one = S.shadow_nbytes(engine.family.kernel(), engine.blocks[0].experts.dtype, mode)
    sizes = engine.model_bytes
    return sizes.nonexpert + len(sizes.expert) * (members * sizes.expert[0] + shadows * one)


@pytest.mark.parametrize("family", QUANTISABLE)
def test_every_family_serves_misses_from_shadows(family, tmp_path):
    folder = tmp_path / family
    make_checkpoint(family, folder)
    budget = _budget(folder, 2, 6)
    engine = pcmoe.load(folder, budget=budget, policy="magnitude-keep",
                        progress=False, shadow="int2", miss_action="shadow", kernel="eager")
    assert engine.stats()["resident_bytes"] <= budget
    layers = len(engine.layers)
    assert engine.committee_sizes == [2] * layers and engine.sizing.shadow_counts == (6,) * layers
    _run(engine, family)
    st = engine.stats()
    assert st["shadowed"] > 0 and st["exchanged"] == 0 and st["skipped"] == 0
    assert sum(row["shadowed"] for row in st["per_layer"]) == st["shadowed"]
    assert all(row["shadow_experts"] == 6 and row["shadow_bytes"] > 0 for row in st["per_layer"])
    # the fast shadow path against its slow twin (dequantise by the definition + the ordinary expert)
    out = _run(engine, family)
    for layer in engine.layers:
        bank = layer.controller.chooser.shadows
        bank.forward_one = bank.reference_one
    assert torch.allclose(out, _run(engine, family), atol=1e-4)


def _run(engine, family):
    with torch.inference_mode():
        if family == "pcmoe_vit_moe":
            return engine.model(torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))).logits
        if engine.family.seq2seq:
            return engine.prefill(IDS)[0]
        return _logits(engine, IDS)


def test_chooser_actions_and_exact_wait(qwen):
    budget = _budget(qwen, 2, 6)
    full = pcmoe.load(qwen, policy="full", progress=False, kernel="eager")
    # waiting for an exact load of every miss gives the full model's output
    waited = pcmoe.load(qwen, budget=budget + full.model_bytes.expert[0], policy="magnitude-keep", progress=False,
                        shadow="int2", shadow_experts=6, wait_above=0.0, miss_action="wait", kernel="eager")
    assert torch.allclose(_logits(full, IDS), _logits(waited, IDS), atol=1e-4)
    st = waited.stats()
    assert waited.committee_sizes == [2] * len(waited.layers)
    assert st["waited"] > 0 and st["shadowed"] == 0 and st["stall_s"] > 0
    # a high price of time makes skipping the cheapest answer
    cheap = pcmoe.load(qwen, budget=budget, policy="magnitude-keep", progress=False, shadow="int2",
                       miss_time_cost=1e6, strategy="skip", kernel="eager")
    _logits(cheap, IDS)
    st = cheap.stats()
    assert st["shadowed"] == 0 and st["skipped"] > 0
    # auto with no price of time: the measured errors decide (shadow error < 1 = a skip's)
    auto = pcmoe.load(qwen, budget=budget, policy="magnitude-keep", progress=False, shadow="int2", kernel="eager")
    _logits(auto, IDS)
    st = auto.stats()
    assert st["shadowed"] == st["misses"] > 0
    counters = auto.counters()
    _logits(auto, IDS)
    assert auto.stats(since=counters)["shadowed"] == st["shadowed"]


def test_shadow_forms_per_layer(qwen):
    """One form per MoE layer ("none" = no shadows there): each layer's bank has its own form and
    the budget counts each layer's own shadow bytes; one form for all = that form in every layer."""
    probe = pcmoe.load(qwen, policy="full", progress=False)
    L, kernel, dtype = len(probe.layers), probe.family.kernel(), probe.blocks[0].experts.dtype
    for forms in (["int1", "none", "int2"][:L], ["int2"] * L):
        budget = _budget(qwen, 1, 0) + sum(3 * S.shadow_nbytes(kernel, dtype, f) for f in forms if f != "none")
        engine = pcmoe.load(qwen, budget=budget, policy="magnitude-keep", progress=False, shadow=",".join(forms),
                            shadow_experts=3)
        banks = [c.chooser.shadows for c in engine.controllers]
        assert [b.mode if b is not None else "none" for b in banks] == forms
        assert [row["shadow_form"] or "none" for row in engine.stats()["per_layer"]] == forms
        assert engine.committee_sizes == [1] * L
        assert engine.stats()["shadow_bytes"] == sum(b.nbytes for b in banks if b is not None) <= budget
        _logits(engine, IDS)
        assert engine.stats()["shadowed"] > 0


def test_a_form_the_expert_shapes_do_not_allow_is_one_line(tmp_path):
    folder = tmp_path / "switch"
    make_checkpoint("switch_transformers", folder)       # experts of 48 inputs: no whole runs of 8 x 4 weights
    with pytest.raises(PcmoeError, match="multiple of 32 .got 48.: switch_transformers experts cannot have"):
        pcmoe.load(folder, budget="60%experts", policy="magnitude-keep", shadow="vq7", progress=False)
    engine = pcmoe.load(folder, budget="60%experts", policy="magnitude-keep", shadow="int2", progress=False)
    assert engine.stats()["shadow_bytes"] > 0


def test_shadow_options_are_checked(qwen):
    with pytest.raises(PcmoeError, match="shadow 'int9' is not one of"):
        pcmoe.load(qwen, budget="50%experts", shadow="int9", progress=False)
    with pytest.raises(PcmoeError, match="shadow 'int9' is not one of"):
        pcmoe.load(qwen, budget="50%experts", shadow="int2,int9", progress=False)
    with pytest.raises(PcmoeError, match="shadow forms name 3 layers"):
        pcmoe.load(qwen, budget="50%experts", shadow="int2,int1,int2", progress=False)
    with pytest.raises(PcmoeError, match="unknown miss action"):
        pcmoe.load(qwen, budget="50%experts", shadow="int2", miss_action="pray", progress=False)
    with pytest.raises(PcmoeError, match="policy on-demand"):
        pcmoe.load(qwen, budget="50%experts", policy="on-demand", shadow="int2", progress=False)


def _native_test_bank(mode: str, seed: int):
    """A bf16 SiLU GLU bank (H 256, I 128) with the shadows of experts 0 and 2 of 3 written (eager
    still: use_native() is the caller's); skips where the native kernels do not run."""
    if S.native_kernels() is None:
        pytest.skip(f"native kernels not available: {S._native_state[1]}")
    torch.manual_seed(seed)
    kernel = GluKernel(256, 128, torch.nn.functional.silu)
    bank = S.ShadowBank(kernel, 3, [0, 2], torch.bfloat16, mode)
    for e in (0, 2):
        bank.write(e, {n: (torch.randn(s) * 0.05).to(torch.bfloat16) for n, s in kernel.tensors.items()})
    return kernel, bank


@pytest.mark.parametrize("mode", ["int1", "int2", "int3", "vq6", "vq7", "vq8"])
def test_native_shadow_kernel_agrees_with_the_eager_path(mode):
    kernel, bank = _native_test_bank(mode, seed=2)
    x = torch.randn(3, 256).to(torch.bfloat16)
    eager = [bank.forward_one(x, e).float() for e in (0, 2)]
    assert bank.use_native()
    for e, ref in zip((0, 2), eager):
        for rows in (x[:1], x):                       # one token, and a few (one native call each)
            native = bank.forward_one(rows, e)
            assert native.dtype == torch.float32 and native.shape == rows.shape
            # the eager path rounds its intermediates to bf16; the kernel keeps float32
            assert (native - ref[:len(rows)]).abs().max() <= 0.02 * ref.abs().max()


@pytest.mark.parametrize("mode", ["int1", "int2", "int3", "vq6", "vq7", "vq8"])
def test_native_dequantisation_is_the_eager_one(mode):
    """Many tokens through a native-backed shadow: the weights dequantised by the native kernel are
    bit-identical to dequantize_into's (the same float32 arithmetic, one rounding to bf16)."""
    kernel, bank = _native_test_bank(mode, seed=5)
    assert bank.use_native()
    codes = ".c" if mode in S.VQ_BITS else ".p"
    for e in (0, 2):
        row = bank.row_of[e]
        for name, shape in kernel.tensors.items():
            native, eager = torch.empty(shape, dtype=torch.bfloat16), torch.empty(shape, dtype=torch.bfloat16)
            S._native_dequantize(bank, name, row, native)
            S.dequantize_into(eager, bank.bank[name + codes][row], bank.bank[name + ".s"][row],
                              codebook=bank.bank[S.CODEBOOK][row] if mode in S.VQ_BITS else None)
            assert torch.equal(native, eager), (mode, name)
    x = torch.randn(S.NATIVE_ROWS + 5, 256).to(torch.bfloat16)       # the many-token path
    native_out = bank.forward_one(x, 2)
    bank.native = None
    assert torch.equal(native_out, bank.forward_one(x, 2))


def test_native_decode_with_shadows_agrees_with_eager(tmp_path):
    if S.native_kernels() is None:
        pytest.skip(f"native kernels not available: {S._native_state[1]}")
    folder = tmp_path / "qwen3-bf16"
    make_checkpoint("qwen3_moe", folder, dtype=torch.bfloat16)
    budget = _budget(folder, 2, 6)
    runs = {}
    for kernel in ("eager", "auto"):
        engine = pcmoe.load(folder, budget=budget, policy="magnitude-keep", progress=False, shadow="int2",
                            kernel=kernel)
        runs[kernel] = _logits(engine, IDS)[-2:].float()     # the two one-token steps
        assert engine.stats()["shadowed"] > 0
    assert engine.controllers[0].chooser.shadows.native is not None
    assert (runs["auto"] - runs["eager"]).abs().max() <= 0.05 * runs["eager"].abs().max()


def test_metrics_count_every_miss_answer_per_layer(qwen):
    from pcmoe.server.metrics import EngineCollector

    engine = pcmoe.load(qwen, budget=_budget(qwen, 2, 3), policy="magnitude-keep", progress=False, shadow="int2",
                        shadow_experts=3, kernel="eager")
    _logits(engine, IDS)
    stats = engine.stats()
    families = {f.name: f for f in EngineCollector(lambda: stats).collect()}
    answers = {(s.labels["layer"], s.labels["action"]): s.value for s in families["pcmoe_miss_answers"].samples}
    for row in stats["per_layer"]:
        layer = str(row["layer"])
        for action, key in (("exchange", "exchanged"), ("skip", "skipped"), ("shadow", "shadowed"),
                            ("wait", "waited")):
            assert answers[(layer, action)] == row[key]
    assert stats["shadowed"] > 0 and stats["exchanged"] > 0      # 3 shadows of 6 non-members: both answers
    assert families["pcmoe_shadow_bytes"].samples[0].value == stats["shadow_bytes"] > 0


def test_shadows_are_made_once_and_read_from_the_cache(qwen, tmp_path, monkeypatch):
    from pcmoe import loader

    budget = _budget(qwen, 2, 6)
    first = pcmoe.load(qwen, budget=budget, policy="magnitude-keep", progress=False, shadow="int3",
                       cache_dir=str(tmp_path), kernel="eager")
    assert len(list(tmp_path.rglob("shadows-int3-g128-layer*.safetensors"))) == 2  # one file per MoE layer

    def no_reads(*args):
        raise AssertionError("a cached shadow was made again")

    monkeypatch.setattr(loader, "read_full_precision", no_reads)
    again = pcmoe.load(qwen, budget=budget, policy="magnitude-keep", progress=False, shadow="int3",
                       cache_dir=str(tmp_path), kernel="eager")
    assert torch.equal(_logits(first, IDS), _logits(again, IDS))
    a, b = first.controllers[0].chooser, again.controllers[0].chooser
    assert a.errors == b.errors and a.shadows.experts == b.shadows.experts


@pytest.mark.parametrize("shadows", [6, 3])   # every miss shadowed; some shadowed, the rest dropped
def test_many_tokens_and_one_token_paths_choose_alike(qwen, shadows):
    engine = pcmoe.load(qwen, budget=_budget(qwen, 2, shadows), policy="magnitude-keep", progress=False,
                        shadow="int2", shadow_experts=shadows, kernel="eager")
    with torch.inference_mode():
        whole = engine.forward(torch.tensor([IDS]), engine.new_state())        # one pass of 12 tokens
        before = engine.counters()
        state = engine.new_state()
        steps = torch.cat([engine.forward(torch.tensor([[t]]), state) for t in IDS])   # one token at a time
    assert torch.allclose(whole, steps, atol=1e-4)
    one, many = engine.stats(since=before), engine.stats()
    for key in ("shadowed", "exchanged", "skipped", "hits"):
        assert one[key] * 2 == many[key], key                 # the same answers counted both times


@pytest.mark.parametrize("model", ["pcmoe-lm", "pcmoe-vit"])
def test_shipped_models_carry_their_measured_shadow_errors(model):
    import contextlib
    from pathlib import Path

    from pcmoe.checkpoint import Checkpoint, read_config_dict
    from pcmoe.options import LoadOptions

    folder = Path(__file__).resolve().parents[1] / "models" / model
    with contextlib.closing(Checkpoint(folder, read_config_dict(folder))) as ckpt:
        fingerprint = ckpt.fingerprint()
    for mode in ("int2", "int3"):
        errors = S.read_errors(folder, fingerprint, LoadOptions(cache_dir="/nonexistent"), mode)
        assert errors is not None and all(0 < e["shadow"] < 1 < e["exchange"] for e in errors)


def test_committee_swaps_hand_shadow_rows_to_demoted_members(qwen):
    budget = _budget(qwen, 3, 5)
    engine = pcmoe.load(qwen, budget=budget + engine_staging(qwen), policy="committee", progress=False,
                        shadow="int2", shadow_experts=5, update_every=1, synchronous=True, kernel="eager")
    assert engine.committee_sizes == [3] * len(engine.layers)
    with torch.inference_mode():
        state = engine.new_state()
        for t in IDS * 3:
            engine.forward(torch.tensor([[t]]), state)
    assert engine.stats()["swaps"] > 0
    bytes_before = engine.stats()["shadow_bytes"]
    moved = 0
    for layer in engine.layers:
        chooser, committee = layer.controller.chooser, layer.committee
        chooser.follow(committee, layer.tracker.score)
        bank = chooser.shadows
        moved += chooser.retargets
        assert len(bank.experts) == 5 and sorted(set(bank.experts)) == sorted(bank.experts)
        assert all(bank.has(e) and bank.row_of[e] == r for r, e in enumerate(bank.experts))
        # rows follow the committee: no member holds one while a non-member lacks one
        lacking = [e for e in range(committee.num_experts) if not committee.is_member(e) and not bank.has(e)]
        assert not (lacking and any(committee.is_member(e) for e in bank.experts))
        # a handed-over row is that expert's own shadow (as made from its weights)
        for e in bank.experts:
            fresh = S.ShadowBank(engine.family.kernel(), committee.num_experts, [e], bank.dtype, "int2")
            buffer = {n: torch.empty(s, dtype=bank.dtype) for n, s in engine.family.kernel().tensors.items()}
            engine.store.read_source(layer.block.layer, e, buffer) if hasattr(engine.store, "read_source") else \
                engine.store.load(layer.block.layer, e, buffer)
            fresh.write(e, buffer)
            assert all(torch.equal(fresh.bank[n][0], bank.bank[n][bank.row_of[e]]) for n in bank.bank)
    assert moved > 0 and engine.stats()["shadow_bytes"] == bytes_before


def engine_staging(folder):
    """The bytes of the default committee's swap staging buffers (two experts)."""
    return 2 * pcmoe.load(folder, policy="full", progress=False).model_bytes.expert[0]
