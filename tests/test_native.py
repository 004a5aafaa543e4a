"""The native decode kernels against their slow twins: each kernel against torch on the same
tensors, and whole decode steps of the native path against the eager path of the same engine."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import pcmoe
from pcmoe import native
from pcmoe.options import PcmoeError


def _kernels():
    if native.kernels() is None and "not built" in native.why():
        try:
            native.build(verbose=False)
        except (RuntimeError, OSError):
            pass
        native._loaded = None
    return native.kernels()


K = _kernels()
needs_native = pytest.mark.skipif(K is None, reason=f"native kernels unavailable: {native.why()}")


def _close(a, b, rel=1e-2):
    scale = b.abs().max().item() or 1.0
    err = (a.float() - b.float()).abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} vs scale {scale:.3g}"


@needs_native
@pytest.mark.parametrize("out_f, in_f", [(512, 256), (37, 100), (64, 32), (1000, 96)])
def test_linear_bf16_matches_torch(out_f, in_f):
    from pcmoe.native import ops

    g = torch.Generator().manual_seed(out_f)
    W, x, b = (torch.randn(s, generator=g).bfloat16() for s in ((out_f, in_f), (3, in_f), (out_f,)))
    ref = F.linear(x.float(), W.float(), b.float())
    _close(ops.linear(K, x, W, b, torch.float32), ref, 1e-5)      # float32 accumulation: only rounding of sums
    _close(ops.linear(K, x, W, None), F.linear(x.float(), W.float()), 1e-2)


@needs_native
def test_rmsnorm_and_attention_match_torch():
    from pcmoe.native import ops

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 64, generator=g).bfloat16(), torch.randn(64, generator=g).bfloat16()
    _close(ops.rmsnorm(K, x, w, 1e-6), F.rms_norm(x.float(), (64,), w.float(), 1e-6))
    for Hq, Hkv, D, P in ((4, 2, 64, 11), (8, 8, 32, 1), (6, 2, 48, 30)):
        q = torch.randn(Hq, D, generator=g).bfloat16()
        keys, values = (torch.randn(1, Hkv, 40, D, generator=g).bfloat16() for _ in range(2))
        ref = F.scaled_dot_product_attention(q.float().view(1, Hq, 1, D), keys[:, :, :P].float(),
                                             values[:, :, :P].float(), scale=D ** -0.5, enable_gqa=True)
        _close(ops.attention(K, q, keys, values, P, D ** -0.5), ref.view(Hq, D))


@needs_native
@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_glu_expert_matches_the_eager_kernel(quant):
    """The fused expert against GluKernel on the same slot (bf16, or the quantised bank's tensors)."""
    from pcmoe.moe import GluKernel, SlotExperts
    from pcmoe.native import ops

    H, I = 128, 64
    bank = SlotExperts(GluKernel(H, I, F.silu), 2, torch.bfloat16, quant)
    assert bank.native_ok()
    g = torch.Generator().manual_seed(1)
    bank.write(1, {"gate_up": torch.randn(2 * I, H, generator=g).bfloat16() * 0.1,
                   "down": torch.randn(H, I, generator=g).bfloat16() * 0.1})
    x = torch.randn(1, H, generator=g).bfloat16()
    out = torch.empty(H)
    ops.glu_expert(K, quant, bank.slot(1), x, out, H, I)
    _close(out, bank.kernel(x, bank.slot(1))[0], 2e-2)


def _steps(folder, kernel, policy="full", budget=None, **kw):
    with pcmoe.load(folder, budget=budget, policy=policy, dtype="bfloat16", kernel=kernel, progress=False,
                    **kw) as engine:
        logits, state = engine.prefill([3, 9, 27, 81, 7, 21])
        out = [logits]
        for t in (5, 17, 2, 99, 40, 11, 8):
            out.append(engine.decode_step(state, t))
        return torch.stack(out), engine.load_info["kernel"], engine.stats()


@needs_native
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"])
def test_native_decode_matches_the_eager_decode(tiny_checkpoint, family):
    folder, _ = tiny_checkpoint(family)
    eager, path_e, _ = _steps(folder, "eager")
    fast, path_n, _ = _steps(folder, "native")
    assert path_e.startswith("eager") and path_n == "native"
    _close(fast, eager, 3e-2)                                    # bf16 rounding of intermediate values
    assert (fast.argmax(-1) == eager.argmax(-1)).float().mean() >= 0.85


@needs_native
def test_native_on_demand_is_bit_identical_to_native_full(tiny_checkpoint):
    folder, _ = tiny_checkpoint("qwen3_moe")
    full, _, _ = _steps(folder, "native")
    od, _, stats = _steps(folder, "native", "on-demand", "30%experts")
    assert stats["misses"] > 0 and torch.equal(od, full)


@needs_native
def test_native_committee_async_equals_sync(tiny_checkpoint):
    folder, _ = tiny_checkpoint("qwen3_moe")
    runs = [_steps(folder, "native", "committee", "45%experts", update_every=1, margin=0.0, synchronous=s)
            for s in (True, False)]
    assert runs[0][2]["swaps"] > 0 and torch.equal(runs[0][0], runs[1][0])


def test_without_the_library_auto_warns_once_and_native_is_an_error(tiny_checkpoint, monkeypatch, tmp_path):
    folder, _ = tiny_checkpoint("qwen3_moe")
    monkeypatch.setenv("PCMOE_NATIVE_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(native, "_loaded", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, path, _ = _steps(folder, "auto")
    assert path.startswith("eager: native kernels are not built")
    assert len([w for w in caught if "native kernels" in str(w.message)]) == 1
    with pytest.raises(PcmoeError, match="--kernel native: native kernels are not built"):
        _steps(folder, "native")
    monkeypatch.setattr(native, "_loaded", None)


@needs_native
def test_float32_models_stay_eager(tiny_checkpoint):
    folder, _ = tiny_checkpoint("qwen3_moe")
    with pcmoe.load(folder, policy="full", progress=False) as engine:     # stored in float32
        assert engine.load_info["kernel"].startswith("eager: the native kernels are for bfloat16")
    with pytest.raises(PcmoeError, match="bfloat16"):
        pcmoe.load(folder, policy="full", kernel="native", progress=False)


@needs_native
@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_kernels_on_two_threads_equal_one_thread(quant):
    """Rows are split over the worker pool; each row's arithmetic is the same, so the bits are."""
    from pcmoe.moe import GluKernel, SlotExperts
    from pcmoe.native import ops

    H, I = 512, 256           # large enough that the pool takes the products
    bank = SlotExperts(GluKernel(H, I, F.silu), 1, torch.bfloat16, quant)
    g = torch.Generator().manual_seed(2)
    bank.write(0, {"gate_up": torch.randn(2 * I, H, generator=g).bfloat16() * 0.05,
                   "down": torch.randn(H, I, generator=g).bfloat16() * 0.05})
    x = torch.randn(1, H, generator=g).bfloat16()
    W = torch.randn(3000, H, generator=g).bfloat16()
    outs = []
    try:
        for threads in (1, 2):
            assert K.set_threads(threads) == threads
            y = torch.empty(H)
            ops.glu_expert(K, quant, bank.slot(0), x, y, H, I)
            outs.append((y, ops.linear(K, x, W, None, torch.float32)))
    finally:
        K.set_threads(1)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_the_cli_says_in_one_line_that_it_runs_eager(tiny_lm, monkeypatch, tmp_path, capsys):
    from pcmoe.cli import main

    monkeypatch.setenv("PCMOE_NATIVE_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(native, "_loaded", None)
    assert main(["generate", "--model", str(tiny_lm), "--prompt", "hello", "--max-tokens", "2", "--quiet"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "native kernels" in line] == \
        [next(line for line in err if line.startswith("warning: native kernels are not built"))]
    monkeypatch.setattr(native, "_loaded", None)


# -- the VNNI int8/int4 products: activation rounded to int8 per block of 32 ---------------------

def _quantised_weight(mode, out_f, in_f, scale_dtype, seed):
    from pcmoe.quant import quantize_into, quantized_shapes

    g = torch.Generator().manual_seed(seed)
    shapes = quantized_shapes((out_f, in_f), mode)
    q = torch.empty(shapes[".q"][0], dtype=shapes[".q"][1])
    s = torch.empty(shapes[".s"][0], dtype=scale_dtype)
    quantize_into(torch.randn(out_f, in_f, generator=g) * 0.05, q, s, mode)
    return {"w.q": q, "w.s": s}, torch.randn(in_f, generator=g) * torch.linspace(0.1, 3.0, in_f)


@needs_native
def test_the_activation_rounding_is_the_same_bits_as_its_twin():
    from pcmoe.native import ops

    g = torch.Generator().manual_seed(3)
    for n in (1, 31, 32, 100, 768):
        x = torch.randn(n, generator=g) * 4
        x[::7] = 0.0
        xq, d, xs = ops.quantize_activation_native(K, x)
        tq, td = ops.quantize_activation(x)
        assert torch.equal(xq, tq) and torch.equal(d, td)
        sums = F.pad(tq.int(), (0, -n % 32)).view(-1, 32).sum(1)                   # integer, exact
        assert torch.equal(xs, td * sums.float())                                 # d * sum(xq), per block
    zeros = torch.zeros(40)
    assert torch.equal(ops.quantize_activation_native(K, zeros)[0], torch.zeros(40, dtype=torch.int8))


@needs_native
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("out_f, in_f", [(512, 256), (1024, 768), (128, 96), (130, 100)])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_vnni_products_match_their_twins_and_stay_within_the_rounding_bound(mode, out_f, in_f, scale_dtype):
    """Against the quantised-activation twin (dequantised W @ rounded x, float32): only summation
    order differs. Against the exact product dequantised W @ x: within the bound the activation
    rounding allows, |W| @ |x - x_rounded| (half a step of each block)."""
    from pcmoe.native import ops
    from pcmoe.quant import dequantize

    if not K.vnni:
        pytest.skip("this CPU lacks AVX-512 VNNI")
    if mode == "int4" and (out_f % 64 or in_f % 32):
        pytest.skip("int4 packs whole blocks of 64 rows and groups of 32 columns")
    w, x = _quantised_weight(mode, out_f, in_f, scale_dtype, out_f + in_f)
    W = dequantize(w["w.q"], w["w.s"], mode)                                     # [out, in] float32
    got = ops.gemv_quant(K, mode, w, "w", x)
    x_rounded = ops.dequantize_activation(x)
    twin, exact = W @ x_rounded, W @ x
    scale = exact.abs().max().item()
    assert (got - twin).abs().max().item() <= 2e-6 * scale * in_f ** 0.5
    bound = W.abs() @ (x - x_rounded).abs()                                      # [out]
    assert ((got - exact).abs() <= bound * 1.001 + 1e-5 * scale).all()
    assert (got - exact).abs().max().item() > 0            # the rounding is real: this test can fail
    assert (x - x_rounded).abs().max().item() <= x.abs().max().item() / 254 * 1.0001
    # the float32 kernels (the fallback without VNNI) are exact up to summation order
    assert (ops.gemv_quant(K, mode, w, "w", x, vnni=False) - exact).abs().max().item() <= 2e-6 * scale * in_f ** 0.5


@needs_native
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_without_vnni_the_expert_runs_the_float32_kernels(quant):
    """pcmoe_use_vnni(0) (a CPU without VNNI) gives the float32 kernels' outputs, which are closer
    to the eager kernel than the VNNI ones."""
    from pcmoe.moe import GluKernel, SlotExperts
    from pcmoe.native import ops

    H, I = 256, 128
    bank = SlotExperts(GluKernel(H, I, F.silu), 1, torch.bfloat16, quant)
    g = torch.Generator().manual_seed(4)
    bank.write(0, {"gate_up": torch.randn(2 * I, H, generator=g).bfloat16() * 0.1,
                   "down": torch.randn(H, I, generator=g).bfloat16() * 0.1})
    x = torch.randn(1, H, generator=g).bfloat16()
    ref = bank.kernel(x, bank.slot(0))[0].float()
    outs = {}
    try:
        for on in (1, 0):
            K.use_vnni(on)
            outs[on] = torch.empty(H)
            ops.glu_expert(K, quant, bank.slot(0), x, outs[on], H, I)
    finally:
        K.use_vnni(1)
    if K.vnni:
        assert not torch.equal(outs[0], outs[1])
    _close(outs[0], ref, 1e-2)
    _close(outs[1], ref, 3e-2)


def test_a_cpu_without_vnni_is_named_in_one_warning(tiny_checkpoint, monkeypatch):
    folder, _ = tiny_checkpoint("qwen3_moe")
    if K is None:
        pytest.skip("native kernels unavailable")
    monkeypatch.setattr(K, "vnni", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _steps(folder, "native", quantize="int8")
    assert [str(w.message) for w in caught if "VNNI" in str(w.message)] == [native.NO_VNNI]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _steps(folder, "native")                                   # bf16: nothing to say
    assert not [w for w in caught if "VNNI" in str(w.message)]


SHIPPED_LM = __import__("pathlib").Path(__file__).resolve().parents[1] / "models" / "pcmoe-lm"


def _decode_nll(quant: str, kernel: str, tokens: int = 160) -> float:
    """Mean next-token NLL of a held-out slice fed one token at a time (the decode path)."""
    text = (SHIPPED_LM / "eval" / "heldout.txt").read_text()[20000:26000]
    with pcmoe.load(SHIPPED_LM, policy="full", quantize=quant, kernel=kernel, progress=False) as engine:
        ids = engine.tokenizer.encode(text)[:tokens + 1]
        logits, state = engine.prefill(ids[:1])
        nll = []
        for prev, nxt in zip(ids[:-1], ids[1:]):
            if len(nll):
                logits = engine.decode_step(state, prev)
            nll.append(-torch.log_softmax(logits.float(), -1)[nxt].item())
        return sum(nll) / len(nll)


@needs_native
@pytest.mark.skipif(not (SHIPPED_LM / "config.json").exists(), reason="the shipped LM is not in this checkout")
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_vnni_decoding_keeps_the_shipped_lms_perplexity(quant):
    """Rounding the activations to int8 costs the shipped LM under 1 % of perplexity against the
    eager int8/int4 path (torch's kernels, activations unrounded)."""
    if not K.vnni:
        pytest.skip("this CPU lacks AVX-512 VNNI")
    import math

    eager, fast = _decode_nll(quant, "eager"), _decode_nll(quant, "native")
    assert abs(math.exp(fast - eager) - 1) < 0.01, (math.exp(eager), math.exp(fast))


@needs_native
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantised_native_decode_stays_close_to_the_eager_quantised_decode(tmp_path, quant):
    """Whole decode steps: the VNNI experts (activations rounded to int8) against torch's int8/int4
    kernels on the same quantised slots."""
    from pcmoe.testing import make_checkpoint

    make_checkpoint("qwen3_moe", tmp_path, dtype=torch.bfloat16, hidden_size=64, moe_intermediate_size=64)
    eager, _, _ = _steps(tmp_path, "eager", quantize=quant)
    fast, path, _ = _steps(tmp_path, "native", quantize=quant)
    assert path == "native"
    _close(fast, eager, 3e-2)
    assert (fast.argmax(-1) == eager.argmax(-1)).float().mean() >= 0.85
