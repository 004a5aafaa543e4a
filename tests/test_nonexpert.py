"""Quantised non-expert weights (pcmoe/nonexpert.py): the module's three forwards agree, the lean
decoder's native step agrees with its eager twin, the default stays bit-identical, bytes are
accounted as held, plans and the CLI reach the option, and other families get one line."""

from __future__ import annotations

import json
import math

import pytest
import torch

import pcmoe
from pcmoe import native
from pcmoe.nonexpert import NonexpertError, QuantEmbedding, QuantLinear
from pcmoe.options import PcmoeError

K = native.kernels()
needs_native = pytest.mark.skipif(K is None, reason=f"native kernels unavailable: {native.why()}")
MODES = ["int8", "int4"]


def _weight(out_f, in_f, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out_f, in_f, generator=g) * 0.05).to(dtype), torch.randn(out_f, generator=g).to(dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_torch_kernels_and_row_lookup_match_the_dequantised_reference(mode, dtype):
    w, b = _weight(192, 96, dtype=dtype)
    lin = QuantLinear(w, b, mode)
    x = torch.randn(5, 96).to(dtype)
    ref = lin.reference(x)                                                     # [5, 192] float32
    tol = 1e-5 if dtype == torch.float32 else 1e-2                             # bf16 output rounding
    assert (lin(x).float() - ref).abs().max().item() <= tol * ref.abs().max().item()
    ids = torch.tensor([0, 31, 32, 63, 64, 100, 191])                          # both nibbles, several blocks
    assert torch.equal(lin.rows(ids), lin.weight_float()[ids])
    # quantisation is real (this can fail) and within half a step of each row (int8) or one step of each
    # group (int4: the least-squares grid can clamp a group's extremes; pcmoe.quant._refit)
    err = (lin.weight_float() - w.float()).abs()
    assert err.max().item() > 0
    wg = w.float().view(192, 1 if mode == "int8" else 3, -1)                   # [out, groups, columns]
    amax = wg.abs().amax(-1).repeat_interleave(wg.shape[-1], 1)                  # [out, in]
    step = amax / 127 if mode == "int8" else (wg.amax(-1) - wg.amin(-1)).repeat_interleave(32, 1) / 15
    scales_rounding = amax * 2 ** -7 if dtype == torch.bfloat16 else amax * 1e-6   # bf16 scale (and zero)
    assert (err <= step * (0.5 if mode == "int8" else 1.0) * 1.001 + scales_rounding).all()


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(NonexpertError, match="multiple of 64"):
        QuantLinear(torch.zeros(100, 64), None, "int4", "the LM head")
    with pytest.raises(NonexpertError, match="int8 or int4"):
        QuantLinear(torch.zeros(64, 64), None, "int2")


@needs_native
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("out_f, in_f", [(192, 64), (1024, 256), (128, 96)])
def test_native_gemv_matches_its_twin_within_the_activation_rounding_bound(mode, out_f, in_f):
    """Against the rounded-activation twin only summation order differs; against the exact
    product the error stays within |W| @ |x - x_rounded| (as test_native does for experts)."""
    from pcmoe.native import ops

    w, b = _weight(out_f, in_f, seed=out_f)
    lin = QuantLinear(w, b, mode)
    x = torch.randn(in_f, generator=torch.Generator().manual_seed(in_f))
    got = lin.native(K, x.bfloat16())
    xb = x.bfloat16().float()                                                  # the row as the decoder passes it
    exact = lin.reference(xb)
    scale = exact.abs().max().item()
    if K.vnni:
        x_rounded = ops.dequantize_activation(xb)
        twin = lin.reference(x_rounded)
        assert (got - twin).abs().max().item() <= 2e-6 * scale * in_f ** 0.5
        bound = lin.weight_float().abs() @ (xb - x_rounded).abs()
        assert ((got - exact).abs() <= bound * 1.001 + 1e-5 * scale).all()
        assert (got - exact).abs().max().item() > 0                            # the rounding is real
    else:
        assert (got - exact).abs().max().item() <= 2e-6 * scale * in_f ** 0.5


def _steps(folder, kernel, **kw):
    with pcmoe.load(folder, policy="full", dtype="bfloat16", kernel=kernel, progress=False, **kw) as engine:
        logits, state = engine.prefill([3, 9, 27, 81, 7, 21])
        out = [logits.float()]
        for t in (5, 17, 2, 99, 40, 11, 8):
            out.append(engine.decode_step(state, t).float())
        return torch.stack(out), engine


def _close(a, b, rel):
    scale = b.abs().max().item() or 1.0
    err = (a - b).abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} vs scale {scale:.3g}"


@needs_native
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family, overrides", [("qwen3_moe", {"tie_word_embeddings": True}), ("qwen2_moe", {}),
                                               ("mixtral", {}), ("olmoe", {})])
def test_native_quantised_decode_matches_the_eager_quantised_decode(tiny_checkpoint, family, overrides, mode):
    folder, _ = tiny_checkpoint(family, **overrides)
    eager, e1 = _steps(folder, "eager", nonexpert_quantize=mode)
    fast, e2 = _steps(folder, "native", nonexpert_quantize=mode)
    assert e1.load_info["kernel"].startswith("eager") and e2.load_info["kernel"] == "native"
    assert isinstance(e2.model.lm_head, QuantLinear)
    assert isinstance(e2.model.model.embed_tokens, QuantEmbedding)  # tied: the head's rows; untied: its own
    _close(fast, eager, 3e-2)                        # activations rounded to int8, bf16 intermediates
    assert (fast.argmax(-1) == eager.argmax(-1)).float().mean() >= 0.85
    full, _ = _steps(folder, "native")
    assert not torch.equal(fast, full)               # the option does something: this test can fail


@pytest.mark.parametrize("kernel", ["eager", "native"])
def test_the_default_is_full_precision_and_bit_identical_to_full(tiny_checkpoint, kernel):
    if kernel == "native" and K is None:
        pytest.skip("native kernels unavailable")
    folder, _ = tiny_checkpoint("qwen3_moe", tie_word_embeddings=True)
    default, e1 = _steps(folder, kernel)
    explicit, e2 = _steps(folder, kernel, nonexpert_quantize="full")
    assert torch.equal(default, explicit)
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in e1.model.modules())
    assert e1.stats()["nonexpert_precision"] == "full"
    # the lean path still equals the transformers forward it is the twin of
    with pcmoe.load(folder, policy="full", dtype="bfloat16", kernel="eager", fast=False, progress=False) as slow:
        logits, _ = slow.prefill([3, 9, 27, 81, 7, 21])
    _close(default[0], logits.float(), 2e-2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tied", [True, False])
def test_bytes_are_counted_as_held_by_the_loader_info_and_stats(tiny_checkpoint, mode, tied):
    from pcmoe.loader import inspect
    from pcmoe.sizes import describe

    folder, _ = tiny_checkpoint("qwen3_moe", tie_word_embeddings=tied, dtype=torch.bfloat16)
    with pcmoe.load(folder, policy="full", nonexpert_quantize=mode, progress=False) as engine:
        stats = engine.stats()
        tensors = {t.data_ptr(): t for n, t in engine.model.state_dict().items() if ".experts." not in n}
        held = sum(t.numel() * t.element_size() for t in tensors.values())    # the tied head counted once
        with pcmoe.load(folder, policy="full", progress=False) as full:
            full_bytes = full.stats()["nonexpert_bytes"]
    assert stats["nonexpert_precision"] == mode
    assert stats["nonexpert_bytes"] == held < full_bytes
    assert describe(folder)["nonexpert_bytes_quantized"][mode] == stats["nonexpert_bytes"]
    assert inspect(folder)["nonexpert_bytes_quantized"][mode] == stats["nonexpert_bytes"]


def test_a_family_without_the_lean_decoder_gets_one_line(tiny_checkpoint):
    folder, _ = tiny_checkpoint("granitemoe")
    with pytest.raises(PcmoeError, match="no lean decoder") as e:
        pcmoe.load(folder, policy="full", nonexpert_quantize="int8", progress=False)
    assert "\n" not in str(e.value)
    folder, _ = tiny_checkpoint("qwen3_moe")
    with pytest.raises(PcmoeError, match="lean decoder"):
        pcmoe.load(folder, policy="full", nonexpert_quantize="int8", fast=False, progress=False)
    with pytest.raises(PcmoeError, match="int8, int4 or full"):
        pcmoe.load(folder, policy="full", nonexpert_quantize="int3", progress=False)


def _plan(folder, tmp_path, precision):
    from pcmoe.formats import write_plan

    with pcmoe.load(folder, policy="full", progress=False) as engine:
        n = list(engine.model_bytes.num_experts)
    path = tmp_path / f"plan-{precision}.json"
    write_plan(path, "qwen3_moe", n, n, extra={"nonexpert_precision": precision})
    return path


def test_the_plans_nonexpert_precision_is_served(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("qwen3_moe")
    for precision, expect in (("int4", "int4"), ("int8", "int8"), ("full", "full")):
        with pcmoe.load(folder, plan=_plan(folder, tmp_path, precision), progress=False) as engine:
            assert engine.stats()["nonexpert_precision"] == expect
    plan = _plan(folder, tmp_path, "int4")
    with pcmoe.load(folder, plan=plan, nonexpert_quantize="full", progress=False) as engine:
        assert engine.stats()["nonexpert_precision"] == "full"     # the explicit option wins
    data = json.loads(plan.read_text())
    data["nonexpert_precision"] = "int5"
    plan.write_text(json.dumps(data))
    with pytest.raises(PcmoeError, match="nonexpert_precision 'int5'"):
        pcmoe.load(folder, plan=plan, progress=False)


def test_the_cli_option_reaches_the_load(tiny_lm, capsys):
    from pcmoe.cli import main

    text = tiny_lm / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 8)

    def summary(*extra):
        assert main(["eval", "--model", str(tiny_lm), "--data", str(text), "--quiet", *extra]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    full, int8 = summary(), summary("--quantize-nonexpert", "int8")
    assert int8["nonexpert_bytes"] < full["nonexpert_bytes"] and int8["ppl"] != full["ppl"]


SHIPPED_LM = __import__("pathlib").Path(__file__).resolve().parents[1] / "models" / "pcmoe-lm"


@pytest.mark.skipif(not (SHIPPED_LM / "config.json").exists(), reason="the shipped LM is not in this checkout")
def test_int8_nonexpert_weights_keep_the_shipped_lms_perplexity():
    """Perplexity of a held-out slice in one forward: int8 attention + tied head within 1 % of full."""
    text = (SHIPPED_LM / "eval" / "heldout.txt").read_text()[20000:24000]

    def ppl(**kw):
        with pcmoe.load(SHIPPED_LM, policy="full", progress=False, **kw) as engine, torch.inference_mode():
            ids = engine.tokenizer.encode(text)[:257]
            logits = engine.forward(torch.tensor([ids[:-1]]), engine.new_state())       # [256, V]
            return math.exp(torch.nn.functional.cross_entropy(logits.float(), torch.tensor(ids[1:])).item())

    full, int8 = ppl(), ppl(nonexpert_quantize="int8")
    assert full != int8 and abs(int8 / full - 1) < 0.01, (full, int8)


def test_the_torch_free_list_of_lean_families_is_the_registrys():
    from pcmoe.models import REGISTRY
    from pcmoe.sizes import LEAN_MODEL_TYPES

    assert set(LEAN_MODEL_TYPES) == {name for name, family in REGISTRY.items() if family.lean_decoder}


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("rows", [320, 1024 + 192])
def test_quantising_in_row_chunks_gives_the_same_bits(mode, rows):
    """An LM head is quantised a chunk of rows at a time (float32 temporaries bounded); every bit
    equals quantising it at once, also when the last chunk is short."""
    from pcmoe.quant import quantize_into, quantized_shapes

    torch.manual_seed(0)
    w = torch.randn(rows, 128).to(torch.bfloat16)
    shapes = quantized_shapes(tuple(w.shape), mode)

    def quantised(chunk_rows):
        q = torch.empty(shapes[".q"][0], dtype=shapes[".q"][1])
        s = torch.empty(shapes[".s"][0], dtype=torch.bfloat16)
        quantize_into(w, q, s, mode, chunk_rows=chunk_rows)
        return q, s

    whole_q, whole_s = quantised(1 << 20)
    for chunk in (64, 128, 200):
        q, s = quantised(chunk)
        assert torch.equal(q, whole_q) and torch.equal(s, whole_s), chunk


def test_inspect_offers_only_the_modes_the_loader_can_build(tiny_checkpoint):
    """nonexpert.layout_error (names and shapes, no model: what inspect and the planner see) says what
    quantize_nonexpert says on the loaded model: a [300, H] head has no whole int4 blocks."""
    from pcmoe.loader import inspect
    from pcmoe.options import PcmoeError

    folder, _ = tiny_checkpoint("qwen3_moe", vocab_size=300, dtype=torch.bfloat16)
    assert list(inspect(folder)["nonexpert_bytes_quantized"]) == ["int8"]
    with pytest.raises(PcmoeError, match="int4 non-expert weights need"):
        pcmoe.load(folder, policy="full", nonexpert_quantize="int4", progress=False)
    folder, _ = tiny_checkpoint("qwen3_moe", dtype=torch.bfloat16)
    assert list(inspect(folder)["nonexpert_bytes_quantized"]) == ["int8", "int4"]


@needs_native
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family, overrides", [("qwen3_moe", {"tie_word_embeddings": True}), ("olmoe", {})])
def test_the_fused_quantised_attention_block_matches_its_op_by_op_twin(tiny_checkpoint, family, overrides, mode):
    """pcmoe_attention_block_quant does in one call what _forward_one_quantized does op by op (the
    same quantised products, the same bf16 roundings): the same logits within float32 reordering."""
    folder, _ = tiny_checkpoint(family, **overrides)
    fused, engine = _steps(folder, "native", nonexpert_quantize=mode)
    assert engine.fast.fused_quantized and engine.fast.attention_blocks[0].lead   # the quantised block ran

    def twin(fast):
        fast.fused_quantized = False

    with pcmoe.load(folder, policy="full", dtype="bfloat16", kernel="native", progress=False,
                    nonexpert_quantize=mode) as slow:
        twin(slow.fast)
        logits, state = slow.prefill([3, 9, 27, 81, 7, 21])
        out = [logits.float()] + [slow.decode_step(state, t).float() for t in (5, 17, 2, 99, 40, 11, 8)]
    _close(fused, torch.stack(out), 1e-2)
    assert (fused.argmax(-1) == torch.stack(out).argmax(-1)).all()
