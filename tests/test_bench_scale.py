"""The bench's second LM section (`pcmoe bench --scale`, pcmoe.bench.scale): its plan, the fast-decode
target table on hand-made results, and the whole command end to end on tiny checkpoints (with the
llama.cpp peer where llama-cpp-python and its converter source are installed)."""

from __future__ import annotations

import importlib.util
import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from pcmoe.bench import gguf, scale, suite
from pcmoe.cli import main

REPO = Path(__file__).resolve().parents[1]
DOCS = ["the quick brown fox jumps over the lazy dog " * 12, "def main():\n    return 0\n" * 12, "hello world " * 40]


def _lm(folder: Path, **overrides) -> Path:
    from pcmoe.testing import make_checkpoint, make_tokenizer

    tok = make_tokenizer(folder)
    make_checkpoint("qwen3_moe", folder, vocab_size=len(tok), max_position_embeddings=512, dtype=torch.bfloat16,
                    **overrides)
    (folder / "eval").mkdir()
    (folder / "eval" / "heldout.txt").write_text("\n\n=====\n\n".join(DOCS * 2))
    return folder


@pytest.fixture(scope="module")
def two_lms(tmp_path_factory):
    """The "shipped" LM and a larger "scale" one (more experts, wider experts), both tiny."""
    small = _lm(tmp_path_factory.mktemp("small"), num_experts=16)
    large = _lm(tmp_path_factory.mktemp("large"), num_experts=32, moe_intermediate_size=64)
    return small, large


def _rec(label, decode, prefill=100.0, **extra):
    return {"label": label, "returncode": 0, "decode_tokens_per_s": decode, "prefill_tokens_per_s": prefill,
            "cpu_other_share": 0.0, **extra}


def test_decode_targets_from_hand_made_results():
    s = scale.PREFIX
    results = [
        _rec("full", 1000.0, peak_rss_bytes=350e6, resident_bytes=44e6, kernel="native"),
        _rec("llama.cpp resident/bf16", 1600.0),
        _rec("committee@50%", 960.0, kernel="native"),
        _rec(s + "full", 30.0, prefill=50.0, peak_rss_bytes=1.6e9, resident_bytes=1.3e9, kernel="native",
             cpu_other_share=0.4),
        _rec(s + "full/int8", 45.0, kernel="native"), _rec(s + "full/int4", 80.0, kernel="eager: asked for"),
        _rec(s + "full/int8+ne", 55.0, kernel="native"), _rec(s + "full/int4+ne", 90.0, kernel="native"),
        _rec(s + "committee@50%", 29.0, decode_stats={"stall_s": 0.0}),
        _rec(s + "llama.cpp resident/bf16", 40.0, prefill=100.0), _rec(s + "llama.cpp resident/q8_0", 50.0),
        {"label": s + "llama.cpp resident/q4_K_M", "returncode": None, "skipped": "skipped: no converter"},
    ]
    meta = {"model_sizes": {"dtype": "bfloat16"}}
    rows = {t["target"]: t for t in scale.decode_targets(results, meta)}
    assert len(rows) == 14
    assert rows["pcmoe int8 + int8 non-expert / llama.cpp q8_0, decode, 1.3 GB"]["value"] == pytest.approx(1.1)
    assert rows["pcmoe int4 + int4 non-expert / pcmoe bf16, decode, 1.3 GB"]["value"] == pytest.approx(3.0)
    t = rows["pcmoe full / llama.cpp resident bf16, decode, shipped LM"]
    assert t["value"] == pytest.approx(0.625) and t["met"] is False and t["margin"] == pytest.approx(0.625 / 0.8 - 1)
    assert "`full` native" in t["note"]
    t = rows["pcmoe full / llama.cpp resident bf16, decode, 1.3 GB"]
    assert t["value"] == pytest.approx(0.75) and not t["met"] and "others' CPU during `scale full` 40 %" in t["note"]
    assert rows["pcmoe int8 / llama.cpp q8_0, decode, 1.3 GB"]["value"] == pytest.approx(0.9)
    assert rows["pcmoe int8 / llama.cpp q8_0, decode, 1.3 GB"]["met"] is True
    t = rows["pcmoe int4 / llama.cpp q4_K_M, decode, 1.3 GB"]
    assert t["value"] is None and t["met"] is None and "no converter" in t["note"]
    t = rows["pcmoe int4 / pcmoe bf16, decode, 1.3 GB"]
    assert t["value"] == pytest.approx(80 / 30) and t["met"] and "eager: asked for" in t["note"]
    assert rows["committee@50% / full, decode, shipped LM"]["met"] is True
    assert rows["committee@50% decode stall, 1.3 GB (s)"]["met"] is True
    assert rows["prefill pcmoe / llama.cpp bf16, 1.3 GB"]["value"] == pytest.approx(0.5)
    t = rows["runtime overhead (peak RSS - resident weights), shipped LM `full` (MB)"]
    assert t["value"] == pytest.approx(306.0) and t["met"] is False
    assert rows["runtime overhead, 1.3 GB `full` (MB)"]["value"] == pytest.approx(300.0)
    assert rows["runtime overhead, 1.3 GB `full` (MB)"]["met"] is True
    table = scale.targets_table(scale.decode_targets(results, meta))
    assert len(table) == 2 + 14 and "not measured" in table[2 + 3] and "**missed**" in table[2]


def test_plan_orders_calibration_first_and_skips_what_cannot_run(two_lms):
    _, large = two_lms
    sizes = suite._model_sizes(str(large))
    args = Namespace(data="d.txt", eval_tokens=8192, decode_tokens=64, trials=3, threads=2)
    runs = scale.plan(args, str(large), sizes, [[1, 2, 3]])
    assert [r["label"] for r in runs] == ["scale full", "scale full/int8", "scale full/int4", "scale full/int8+ne",
                                            "scale full/int4+ne", "scale committee@50%"]
    assert runs[0]["calibration"] and all(r["section"] == "scale" for r in runs)
    assert all(r["eval_tokens"] == scale.EVAL_TOKENS for r in runs)
    assert runs[2]["options"] == {"quantize": "int4"} and runs[2]["weight_bytes"] == sizes["quant"]["int4"]["full"]
    assert runs[4]["options"] == {"quantize": "int4", "nonexpert_quantize": "int4"}
    assert runs[5]["budget"] == int(sizes["nonexpert"] + 0.5 * sizes["all_experts"])
    assert len({r["key"] for r in runs}) == 6
    sizes["quant"].pop("int4")
    sizes["quant_errors"]["int4"] = "sizes not divisible by 32"
    assert "divisible" in scale.plan(args, str(large), sizes, [[1]])[2]["skip"]


def _converter():
    """The converter the bench would use without fetching (data/llamacpp, $PCMOE_LLAMACPP_SRC or the
    pcmoe cache), or None."""
    if gguf.converter_root(REPO / "data" / "llamacpp"):
        return gguf.converter_root(REPO / "data" / "llamacpp")
    try:
        return gguf.find_converter(None, fetch=False)
    except Exception:  # noqa: BLE001 - none here
        return None


def test_bench_scale_end_to_end(two_lms, tmp_path):
    small, large = two_lms
    out, md = tmp_path / "bench", tmp_path / "BENCHMARKS.md"
    llama = importlib.util.find_spec("llama_cpp") is not None and _converter() is not None
    argv = ["bench", "--model", str(small), "--vision", "", "--out", str(out), "--quick", "--budgets", "50",
            "--policies", "committee", "--skip", "storage,quant,planned,peers,topk", "--eval-tokens", "48",
            "--decode-tokens", "3", "--prompts", "1", "--trials", "2", "--threads", "1", "--no-cgroup",
            "--scale", "--scale-model", str(large), "--markdown", str(md)]
    if llama:
        argv += ["--llamacpp-src", str(_converter())]
    else:  # no converter at hand: a folder without one, so the bench cannot fetch one either
        (tmp_path / "no-converter").mkdir()
        argv += ["--llamacpp-src", str(tmp_path / "no-converter")]
    assert main(argv) == 0
    payload = json.loads((out / "bench.json").read_text())
    runs = {r["label"]: r for r in payload["runs"]}
    for label in ("full", "committee@50%", "scale full", "scale full/int8", "scale full/int4", "scale committee@50%"):
        r = runs[label]
        assert r["returncode"] == 0, (label, r.get("error"))
        assert r["kernel"] and r["model_class"] == "LeanCausalLM" and 0 <= r["cpu_other_share"] <= 1
    assert runs["scale full"]["model"] == str(large) and runs["scale full"]["tokens"] == 48
    assert runs["scale full/int4"]["resident_bytes"] < runs["scale full"]["resident_bytes"]
    assert payload["meta"]["scale"]["model"] == str(large) and payload["meta"]["scale"]["overhead"] > 0
    assert "--scale" in payload["meta"]["command"]
    targets = {t["target"]: t for t in payload["decode_targets"]}
    measured = {"pcmoe int4 / pcmoe bf16, decode, 1.3 GB", "committee@50% / full, decode, 1.3 GB",
                "committee@50% / full, decode, shipped LM", "runtime overhead, 1.3 GB `full` (MB)",
                "runtime overhead (peak RSS - resident weights), shipped LM `full` (MB)"}
    for name in measured:
        assert targets[name]["value"] is not None and targets[name]["met"] in (True, False), name
    peers = {"pcmoe full / llama.cpp resident bf16, decode, 1.3 GB", "pcmoe int8 / llama.cpp q8_0, decode, 1.3 GB",
             "pcmoe int4 / llama.cpp q4_K_M, decode, 1.3 GB", "prefill pcmoe / llama.cpp bf16, 1.3 GB"}
    for name in peers:
        assert (targets[name]["value"] is not None) == llama, (name, targets[name]["note"])
    if llama:
        for t in ("bf16", "q8_0", "q4_K_M"):
            r = runs[f"scale llama.cpp resident/{t}"]
            assert r["returncode"] == 0 and r["section"] == "scale" and r["model"] == str(large)
    else:
        assert any(r["label"].startswith("scale llama.cpp") and r.get("skipped") for r in payload["runs"])
    text = md.read_text()
    assert "## Fast decode targets" in text and "### Second language model" in text
    assert "decode_targets.png" in text or "matplotlib" in text
