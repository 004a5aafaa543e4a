"""The benchmark suite: the real --quick plan end to end on tiny checkpoints, the report and
BENCHMARKS.md generator on hand-made results, and the helpers (limits, keys, trials, logs)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from pcmoe import protocol
from pcmoe.bench import cgroup, common, report, runner, suite, summary
from pcmoe.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
TINY_VIT = dict(hidden_size=32, num_layers=2, num_heads=2, num_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=16, stem_channels=8)


@pytest.fixture(scope="module")
def bench_lm(tmp_path_factory):
    """A tiny bf16 qwen3_moe (16 experts: room for the low budgets) with a tokenizer and its
    held-out text where the suite looks by default (<model>/eval/heldout.txt)."""
    from pcmoe.testing import make_checkpoint, make_tokenizer

    folder = tmp_path_factory.mktemp("bench_lm")
    tok = make_tokenizer(folder)
    make_checkpoint("qwen3_moe", folder, vocab_size=len(tok), max_position_embeddings=512, dtype=torch.bfloat16,
                    num_experts=16)
    (folder / "eval").mkdir()
    docs = ["the quick brown fox jumps over the lazy dog " * 12, "def main():\n    return 0\n" * 12,
            "hello world " * 40]
    (folder / "eval" / "heldout.txt").write_text("\n\n=====\n\n".join(docs * 2))
    return folder


@pytest.fixture(scope="module")
def bench_vit(tmp_path_factory):
    from pcmoe.models.vit_moe import VitMoeConfig, VitMoeForImageClassification, save_pretrained

    torch.manual_seed(0)
    model = VitMoeForImageClassification(VitMoeConfig(**TINY_VIT)).eval()
    with torch.no_grad():
        for layer in model.encoder.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("bench_vit") / "tiny-vit"
    save_pretrained(model, folder)
    return folder


# -- the real quick plan, end to end -------------------------------------------------------------


def test_quick_plan_end_to_end(bench_lm, bench_vit, tmp_path, monkeypatch):
    out, md = tmp_path / "bench", tmp_path / "repo" / "BENCHMARKS.md"
    vision = str(bench_vit) if FASHION.exists() else ""  # the vision runs need Fashion-MNIST
    # Only the sizes of the work shrink (tokens, prompts, trials, frames); the plan is --quick's.
    argv = ["bench", "--model", str(bench_lm), "--vision", vision, "--out", str(out), "--quick", "--eval-tokens", "48",
            "--decode-tokens", "3", "--prompts", "1", "--trials", "2", "--frames", "24", "--threads", "1",
            "--markdown", str(md)]
    assert main(argv) == 0

    args = build_parser("bench").parse_args(argv)
    args.data = str(bench_lm / "eval" / "heldout.txt")
    sizes = suite._model_sizes(str(bench_lm))
    plan = suite.plan_runs(args, [[1, 2, 3]], sizes, suite._model_sizes(vision, quant=False) if vision else None)
    payload = json.loads((out / "bench.json").read_text())
    runs = {r["label"]: r for r in payload["runs"]}
    assert [r["label"] for r in payload["runs"] if not r["label"].startswith("llama.cpp")] == \
        [p["label"] for p in plan]
    for label in ("full", "committee@40%", "committee@50%", "committee@60%", "magnitude-keep@50%", "on-demand@50%",
                  "committee@50%/emmc", "full/int8", "full/int4", "transformers", "accelerate-offload@50%"):
        assert label in runs, label
    for r in payload["runs"]:
        if r["label"] == "llama.cpp":  # llama-cpp-python not installed (or no converter source)
            assert r["returncode"] is None and r["skipped"]
            continue
        if r["curve"] == "planned":  # the tiny bench model has no device profile
            assert r["returncode"] is None and "no device profile" in r["skipped"]
            continue
        assert r["returncode"] == 0, (r["label"], r.get("error"), r.get("skipped"))
        assert 0 <= r["cpu_other_share"] <= 1 and r["peak_rss_bytes"] > 0
        if r["section"] != "vision":
            assert len(r["decode_trials"]) == 2 and r["warmup"] == 1
    assert runs["on-demand@50%"]["ppl"] == runs["full"]["ppl"]  # exact policy, same tokens
    assert abs(runs["transformers"]["ppl"] - runs["full"]["ppl"]) < 1e-3 * runs["full"]["ppl"]
    # Quantised runs sit on the absolute memory axis at their quantised sizes.
    int4 = sizes["quant"]["int4"]["full"]
    assert runs["full/int4"]["resident_bytes"] == runs["full/int4"]["weight_bytes"] == int4
    matched = next(r for r in payload["runs"] if r.get("matched_to") == "full/int4")
    assert matched["budget_bytes"] == int4 and matched["resident_bytes"] <= int4
    assert abs(runs["transformers"]["held_bytes"] - sizes["full"]) < 0.01 * sizes["full"]  # + rotary buffers
    # Memory limits: calibration (full) unlimited, budgeted runs at weights + full's overhead + slack.
    overhead = runs["full"]["peak_rss_bytes"] - runs["full"]["resident_bytes"]
    if cgroup.available():
        assert runs["full"]["cgroup_limit_bytes"] is None and runs["transformers"]["cgroup_limit_bytes"] is None
        for label in ("committee@50%", "full/int4"):
            r = runs[label]
            assert r["cgroup_limit_bytes"] == r["weight_bytes"] + overhead + suite.ALLOCATOR_SLACK
            assert r["oom_killed"] is False
        acc = runs["accelerate-offload@50%"]
        assert acc["cgroup_limit_bytes"] == acc["budget_bytes"] + suite.ACCELERATE_ALLOWANCE
    else:
        print("cgroup v1 memory controller not writable: the memory-limit checks are skipped")
        assert runs["committee@50%"]["limit_basis"].startswith("none")
    if vision:
        v = runs["vision committee@50%"]
        assert v["bytes_per_frame"] == v["bytes_read"] / v["frames"] and v["peak_rss_bytes"] > 0
        assert sum(s["choices"] for s in v["series"]) == v["choices"]
    # Targets: every headline ratio of the issue, the pcmoe ones measured.
    targets = {t["target"]: t for t in payload["targets"]}
    assert len(targets) == 8
    for name in ("committee ppl / full ppl", "committee decode / full decode",
                 "committee peak RSS / (budget + runtime overhead)", "committee ppl increase / magnitude-keep's",
                 "committee decode / on-demand decode (page cache evicted)"):
        assert targets[name]["value"] is not None and targets[name]["met"] in (True, False), name
    assert "`full` run" in targets["committee peak RSS / (budget + runtime overhead)"]["note"]
    llama_ran = any(r["label"].startswith("llama.cpp ") and r.get("returncode") == 0 for r in payload["runs"])
    llama_target = targets["pcmoe full decode / llama.cpp resident bf16 decode (same precision)"]
    assert (llama_target["value"] is not None) == llama_ran
    # Reports: the recorded command is the canonical one, not pytest's argv.
    assert payload["meta"]["command"].startswith("pcmoe bench --model ") and "--quick" in payload["meta"]["command"]
    text = (out / "bench.md").read_text()
    assert "| committee@50% |" in text and "cannot speed them up" in text
    assert (out / "memory_vs_quality.png").stat().st_size > 1000 and (out / "storage_profiles.png").exists()
    doc = md.read_text()
    for needle in ("Command: `pcmoe bench", "numpy", "llama.cpp" if llama_ran else "llama-cpp-python not installed",
                   report.READING_BEGIN,
                   "## Headline targets", "![memory vs quality", "Measured cold read rate"):
        assert needle in doc, needle
    assert (md.parent / "docs" / "benchmarks" / "memory_vs_speed.png").exists()

    # A second invocation resumes from runs.jsonl: nothing is measured again, the reading is kept,
    # and --scaling runs the scaling study into <out>/scaling.
    md.write_text(doc.replace(report.READING_PLACEHOLDER, "Hand-written: the committee wins at 50 %."))
    lines = (out / "runs.jsonl").read_text().splitlines()
    monkeypatch.setattr(suite, "run_one", lambda *a, **k: pytest.fail("a finished run was measured again"))
    from pcmoe.bench import scaling

    calls = []
    monkeypatch.setattr(scaling, "main", lambda argv: calls.append(argv) or 0)
    assert main(argv + ["--scaling"]) == 0
    assert (out / "runs.jsonl").read_text().splitlines() == lines
    assert calls == [["--out", str(out / "scaling"), "--threads", "1", "--trials", "2", "--quick"]]
    doc = md.read_text()
    assert "Hand-written: the committee wins at 50 %." in doc and report.READING_PLACEHOLDER not in doc
    assert "python -m pcmoe.bench.scaling --out" in doc


# -- report and BENCHMARKS.md on hand-made results ----------------------------------------------


def _rec(label, section="lm", **kw):
    base = {"label": label, "section": section, "returncode": 0, "policy": kw.pop("policy", label.split("@")[0]),
            "cpu_other_share": 0.02}
    base.update(kw)
    return base


def _tiny_results():
    mb = 1_000_000
    return [
        _rec("full", ppl=10.0, decode_tokens_per_s=100.0, resident_bytes=100 * mb, peak_rss_bytes=500 * mb,
             budget_bytes=100 * mb, curve="full"),
        _rec("committee@50%", policy="committee", ppl=10.3, decode_tokens_per_s=97.0, resident_bytes=60 * mb,
             budget_bytes=60 * mb, peak_rss_bytes=480 * mb, cgroup_limit_bytes=527 * mb, curve="committee",
             bytes_read=10 * mb, read_s=0.1, reads=10, series=[{"doc": 0, "hits": 5, "choices": 10, "swaps": 2}],
             committee_sizes=[4, 4], per_layer_swaps=[1, 1]),
        _rec("magnitude-keep@50%", policy="magnitude-keep", ppl=11.0, decode_tokens_per_s=99.0,
             resident_bytes=60 * mb, curve="magnitude-keep"),
        _rec("on-demand@50%", policy="on-demand", ppl=10.0, decode_tokens_per_s=10.0, resident_bytes=60 * mb,
             bytes_read=100 * mb, read_s=0.5, reads=50, curve="on-demand", cpu_other_share=0.4),
        _rec("committee@50%/emmc", "storage", policy="committee", storage="emmc", ppl=10.3,
             decode_tokens_per_s=80.0, resident_bytes=60 * mb, bytes_read=10 * mb, read_s=0.05, reads=10),
        _rec("committee@50%/nvme", "storage", policy="committee", storage="nvme", ppl=10.3,
             decode_tokens_per_s=96.0, resident_bytes=60 * mb),
        _rec("full/int4", "quant", policy="full", ppl=10.5, decode_tokens_per_s=150.0, resident_bytes=40 * mb,
             spec={"options": {"quantize": "int4"}}, curve="full/int4"),
        _rec("committee@30% (=full/int4)", "quant", policy="committee", ppl=12.0, decode_tokens_per_s=90.0,
             resident_bytes=40 * mb, curve="committee", matched_to="full/int4"),
        _rec("accelerate-offload@50%", "peers", policy="accelerate-offload", decode_tokens_per_s=10.0,
             held_bytes=55 * mb, ppl=10.0),
        _rec("llama.cpp resident/bf16", "peers", policy="llama.cpp", outtype="bf16", model_bytes=100 * mb,
             decode_tokens_per_s=150.0, ppl=10.0),
        _rec("llama.cpp mmap@50%/bf16", "peers", policy="llama.cpp", outtype="bf16", use_mmap=True,
             budget_bytes=60 * mb, cgroup_limit_bytes=190 * mb, decode_tokens_per_s=50.0),
        _rec("llama.cpp mmap@50%/f32", "peers", policy="llama.cpp", outtype="f32", use_mmap=True,
             budget_bytes=120 * mb, decode_tokens_per_s=500.0),  # not the checkpoint's precision
        {"label": "transformers", "section": "peers", "returncode": None, "skipped": "skipped: test"},
    ]


def _meta():
    return {"command": "pcmoe bench --quick", "commit": "abc1234", "date": "2026-12-01", "cpu": "Test CPU",
            "cores": 2, "ram_bytes": 24 << 30, "kernel": "6.1", "python": "3.11", "threads": 2, "cgroup": True,
            "versions": {"torch": "2.x", "transformers": "5.x", "accelerate": None, "llama-cpp-python": "0.3",
                         "matplotlib": "3.x", "numpy": "2.x"},
            "model_sizes": {"dtype": "bfloat16"}, "allocator_slack": 64 << 20, "accelerate_allowance": 1 << 30,
            "trials": 3, "prompts": 2, "decode_tokens": 32, "eval_tokens": 1024, "model": "models/pcmoe-lm"}


def test_targets_are_computed_with_margins_and_reasons():
    rows = {t["target"]: t for t in summary.targets(_tiny_results(), _meta())}
    t = rows["committee ppl / full ppl"]
    assert t["value"] == pytest.approx(1.03) and t["met"] and t["margin"] == pytest.approx(1 - 1.03 / 1.05)
    assert rows["committee ppl increase / magnitude-keep's"]["value"] == pytest.approx(0.3)
    t = rows["committee decode / full decode"]
    assert t["value"] == pytest.approx(0.97) and t["met"]
    t = rows["committee decode / on-demand decode (page cache evicted)"]
    assert t["value"] == pytest.approx(9.7) and t["met"] and "others' CPU during `on-demand@50%` 40 %" in t["note"]
    # llama.cpp: only the checkpoint's precision (bf16), not the faster f32 run
    t = rows["committee decode / llama.cpp mmap bf16 decode (same memory limit and precision)"]
    assert t["value"] == pytest.approx(97 / 50)
    t = rows["pcmoe full decode / llama.cpp resident bf16 decode (same precision)"]
    assert t["value"] == pytest.approx(100 / 150) and not t["met"] and t["margin"] == pytest.approx(100 / 150 / 0.8 - 1)
    # the peak-RSS target uses the overhead of `full` (500 - 100 MB), not the committee's own
    t = rows["committee peak RSS / (budget + runtime overhead)"]
    assert t["value"] == pytest.approx(480 / (60 + 400)) and not t["met"] and "400.00 MB" in t["note"]
    t = rows["committee decode / accelerate offload decode (same budget and precision)"]
    assert t["value"] == pytest.approx(9.7)
    no_full = [r for r in _tiny_results() if r["label"] != "full"]
    t = {t["target"]: t for t in summary.targets(no_full, _meta())}["committee ppl / full ppl"]
    assert t["value"] is None and t["note"] == "no `full` run"


def test_quantisation_comparison_and_storage_are_computed():
    comp = {c["quantised"]: c for c in summary.quant_comparison(_tiny_results())}
    c = comp["full/int4"]
    assert c["committee"] == "committee@30% (=full/int4)" and c["matched"] and c["quality"] == "quantised"
    assert c["speed"] == "quantised" and c["speed_ratio"] == pytest.approx(0.6)
    verdicts = "\n".join(summary.quant_verdicts(list(comp.values())))
    assert "quality: full/int4 better" in verdicts and "wins on quality in 0 and on speed in 0" in verdicts
    bw = summary.read_bandwidth(_tiny_results())
    assert bw["run"] == "on-demand@50%" and bw["mb_per_s"] == pytest.approx(200)
    effects = {r["run"]: r.get("effect") for r in summary.storage_rows(_tiny_results())}
    assert effects["committee@50%/nvme"].startswith("none expected")  # 3000 MB/s > this disk's 200
    assert effects["committee@50%/emmc"] == "none expected: the profile is faster than this disk"
    assert summary.memory_x(_tiny_results()[10]) == 60_000_000  # mmap: its allowed weights, not the GGUF size


def test_benchmarks_md_generator_keeps_the_reading(tmp_path, monkeypatch):
    out, md = tmp_path / "results", tmp_path / "BENCHMARKS.md"
    report.write_report(out, _tiny_results(), _meta(), markdown_to=md)
    doc = md.read_text()
    for needle in ("Command: `pcmoe bench --quick`", "Commit: `abc1234`", "Test CPU, 2 cores, 24.0 GiB RAM",
                   "accelerate not installed", "numpy 2.x", "llama-cpp-python 0.3", report.READING_PLACEHOLDER,
                   "| committee ppl / full ppl | 1.030 | <= 1.05 | **met** |", "**missed** | by 16.7 %",
                   "`committee@30% (=full/int4)` vs `full/int4`", "cannot speed them up",
                   "![memory vs quality", "docs/benchmarks/memory_vs_quality.png", "⚠", "skipped: test"):
        assert needle in doc, needle
    assert (tmp_path / "docs" / "benchmarks" / "memory_vs_quality.png").stat().st_size > 1000
    md.write_text(doc.replace(report.READING_PLACEHOLDER, "Ours.\n\nTwo paragraphs."))
    # regenerate from bench.json alone (pcmoe bench --report-only), the reading survives
    assert main(["bench", "--report-only", "--out", str(out), "--markdown", str(md),
                 "--plots-dir", str(tmp_path / "plots")]) == 0
    doc = md.read_text()
    assert f"{report.READING_BEGIN}\nOurs.\n\nTwo paragraphs.\n{report.READING_END}" in doc
    assert "(plots/memory_vs_quality.png)" in doc
    assert not list(out.glob(".*.tmp")) and not list(tmp_path.glob("plots/.*"))  # atomic writes left nothing
    # without matplotlib the plots are skipped with the install hint
    monkeypatch.setattr(report, "missing", lambda m: "skipped: matplotlib is not installed; pip install 'pcmoe[bench]'")
    report.write_report(tmp_path / "r2", _tiny_results(), _meta(), markdown_to=tmp_path / "B2.md")
    assert not list((tmp_path / "r2").glob("*.png"))
    assert "pip install 'pcmoe[bench]'" in (tmp_path / "B2.md").read_text()


# -- the plan, limits, keys ----------------------------------------------------------------------


def _sizes(fp="A"):
    q = {"int8": {"nonexpert": 100, "all_experts": 520, "full": 620, "min_budget": {True: 200, False: 150}},
         "int4": {"nonexpert": 100, "all_experts": 320, "full": 420, "min_budget": {True: 160, False: 130}}}
    return {"nonexpert": 100, "all_experts": 1000, "full": 1100, "dtype": "bfloat16", "fingerprint": fp,
            "min_budget": {True: 350, False: 225}, "quant": q, "quant_errors": {}}


def _args(*extra):
    return build_parser("bench").parse_args(["bench", "--data", "d.txt", *extra])


def test_quick_plan_has_50_and_absolute_quantised_budgets(monkeypatch):
    monkeypatch.setattr(common, "missing", lambda m: None)
    plan = {r["label"]: r for r in suite.plan_runs(_args("--quick"), [[1]], _sizes())}
    assert suite.QUICK_BUDGETS == (40, 50, 60)
    for label in ("full", "committee@40%", "committee@50%", "committee@60%", "magnitude-keep@50%", "on-demand@50%",
                  "committee@50%/emmc", "full/int8", "full/int4", "committee@32% (=full/int4)", "transformers",
                  "accelerate-offload@50%"):
        assert label in plan, label
    assert plan["committee@50%"]["budget"] == plan["committee@50%"]["weight_bytes"] == 100 + 500
    assert plan["full/int4"]["weight_bytes"] == 420 and "budget" not in plan["full/int4"]
    assert plan["full/int4"]["options"] == {"quantize": "int4"}
    assert plan["committee@32% (=full/int4)"]["budget"] == 420 and "quantize" not in plan[
        "committee@32% (=full/int4)"]["options"]
    full = {r["label"]: r for r in suite.plan_runs(_args(), [[1]], _sizes())}
    # committee over int4 at 20 % of the checkpoint's expert memory: the bytes of committee@20%
    assert full["committee/int4@20%"]["budget"] == full["committee@20%"]["budget"] == 300
    assert full["committee/int4@15%"].get("skip") is None and full["committee@15%"]["skip"].startswith(
        "skipped: 250 B is below the minimum budget")
    assert "committee@52% (=full/int8)" in full and "on-demand@50%/nvme" in full and "topk-reduce" in full
    # the shadow section (not in --quick): int4 experts + int8 non-expert weights, with and without shadows
    shadow = full["static/int4+ne8+shadow@15%"]
    assert shadow["options"]["shadow"] == "int2" and shadow["options"]["nonexpert_quantize"] == "int8"
    assert shadow["budget"] == full["committee/int4+ne8@15%"]["budget"] == 100 + 150
    assert "shadow" not in full["committee/int4+ne8@15%"]["options"] and "skip" not in shadow
    assert not any(r["section"] == "shadow" for r in plan.values())
    vision = {r["label"]: r for r in suite.plan_runs(_args("--vision", "v"), [[1]], _sizes(), _sizes())}
    v = vision["vision committee+shadow/int3@30%"]
    assert v["options"] == {"shadow": "int3"} and v["budget"] == 100 + 300 and v["section"] == "vision"
    quick = suite.plan_runs(_args("--vision", "v", "--quick"), [[1]], _sizes(), _sizes())
    assert not any("shadow" in r["label"] for r in quick)
    # a record is reused only for the same checkpoint files
    other = {r["label"]: r for r in suite.plan_runs(_args("--quick"), [[1]], _sizes("B"))}
    assert plan["full"]["key"] != other["full"]["key"]
    monkeypatch.setattr(common, "missing", lambda m: f"skipped: {m} is not installed; pip install 'pcmoe[bench]'")
    plan = {r["label"]: r for r in suite.plan_runs(_args("--quick"), [[1]], _sizes())}
    assert plan["accelerate-offload@50%"]["skip"] == "skipped: accelerate is not installed; pip install 'pcmoe[bench]'"


def test_limits_per_kind():
    assert suite.limit_for({"kind": "transformers"}, 7)[0] is None
    assert suite.limit_for({"kind": "accelerate", "budget_bytes": 10}, 7)[0] == 10 + (1 << 30)
    assert suite.limit_for({"kind": "pcmoe", "calibration": True, "weight_bytes": 5}, 7)[0] is None
    assert suite.limit_for({"kind": "pcmoe", "weight_bytes": 5}, 7)[0] == 5 + 7 + suite.ALLOCATOR_SLACK
    assert suite.limit_for({"kind": "pcmoe", "weight_bytes": 5}, None)[0] is None


def test_command_line_is_rebuilt_from_the_options():
    argv = ["bench", "--quick", "--model", "m dir", "--trials", "5", "--skip", "vision"]
    args = build_parser("bench").parse_args(argv)
    assert suite.command_line(args) == "pcmoe bench --model 'm dir' --quick --trials 5 --skip vision"


def test_run_log_survives_torn_lines_and_writes_atomically(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps({"key": "a", "returncode": 0}) + "\n{\"key\": \"b\", \"retur")
    log = common.RunLog(path)
    assert list(log.done()) == ["a"]
    log.append({"key": "c", "returncode": 1})
    log.append({"key": "a", "returncode": 0, "v": 2})
    assert log.done()["a"]["v"] == 2 and "c" not in log.done()
    assert len(path.read_text().splitlines()) == 3 and not list(tmp_path.glob(".*tmp"))
    log.restart()
    assert common.RunLog(path).records == [] and (tmp_path / "runs.jsonl.old").exists()


def test_decode_trials_exclude_the_warmup_and_take_the_median():
    calls = []

    class Logits:
        def argmax(self):
            return 3

    def prefill(ids):
        calls.append(("prefill", len(ids)))
        return None, Logits()

    def step(state, token):
        calls.append("step")
        return Logits()

    marks = []
    d = protocol.decode_trials(prefill, step, [[1, 2], [3]], decode_tokens=4, trials=3, warmup=1,
                             after_warmup=lambda: marks.append(len(calls)))
    assert marks == [4]  # one warm-up generation: prefill + 3 steps, then the trials
    assert len(calls) == 4 + 3 * 2 * 4 and d["trials"] == 3 and len(d["decode_trials"]) == 3
    assert d["decode_tokens_per_s"] == sorted(d["decode_trials"])[1] and d["timed_tokens"] == 24
    meter = common.CpuMeter()
    start = time.process_time()
    while time.process_time() - start < 0.1:   # several jiffies of own CPU time, however busy the machine
        sum(i * i for i in range(20_000))
    shares = meter.stop()
    assert 0 <= shares["cpu_other_share"] <= 1 and 0 < shares["cpu_own_share"] <= 1


def test_missing_extra_message(monkeypatch):
    assert common.missing("json") is None
    assert common.missing("pcmoe_no_such_module") == ("skipped: pcmoe_no_such_module is not installed; "
                                                      "pip install pcmoe_no_such_module")
    monkeypatch.setitem(sys.modules, "accelerate", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert common.missing("accelerate") == "skipped: accelerate is not installed; pip install 'pcmoe[bench]'"
    assert common.missing("llama_cpp").startswith("skipped: llama-cpp-python is not installed; "
                                                  "pip install 'pcmoe[llamacpp]'")


def test_fingerprint_follows_the_contents(tiny_lm, tmp_path):
    import os
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_lm, model)
    a = common.fingerprint(model)
    assert common.fingerprint(tiny_lm) == a  # a copy (a fresh clone): same contents, same results
    os.utime(model / "model.safetensors", (1, 1))
    (model / "pcmoe_expert_norms.json").write_text("{}")  # a cache computed from the weights
    assert common.fingerprint(model) == a
    cfg = (model / "config.json").read_text()
    (model / "config.json").write_text(cfg.replace("{", '{"pcmoe_test": 1, ', 1))
    assert common.fingerprint(model) != a
    (model / "config.json").write_text(cfg)
    data = bytearray((model / "model.safetensors").read_bytes())
    data[-1] ^= 1  # a weight byte: the engine's content samples see it
    (model / "model.safetensors").write_bytes(bytes(data))
    assert common.fingerprint(model) != a and common.weight_files(model) == [model / "model.safetensors"]


def test_shipped_models_keep_their_norms_fingerprint():
    """Checkpoint.fingerprint() (which the bench fingerprint builds on) still matches the expert
    norms shipped beside the LM: loading it finds them instead of streaming every expert."""
    from pcmoe.checkpoint import Checkpoint

    shipped = ROOT / "models" / "pcmoe-lm"
    norms = json.loads((shipped / "pcmoe_expert_norms.json").read_text())
    assert Checkpoint(shipped).fingerprint() == norms["fingerprint"]


def test_minimum_budget_is_the_engines(bench_lm, monkeypatch):
    import pcmoe.engine

    real = pcmoe.engine.inspect
    monkeypatch.setattr(pcmoe.engine, "inspect", lambda *a, **k: dict(real(*a, **k), minimum_budget=12345))
    sizes = suite._model_sizes(str(bench_lm), quant=False)
    assert sizes["min_budget"][True] == 12345  # a default committee load's own minimum
    no_key = {k: v for k, v in real(str(bench_lm)).items() if k != "minimum_budget"}
    monkeypatch.setattr(pcmoe.engine, "inspect", lambda *a, **k: no_key)
    sizes = suite._model_sizes(str(bench_lm), quant=False)
    assert sizes["min_budget"] == {True: no_key["minimum_budget_committee"], False: no_key["minimum_budget_static"]}


def test_worker_timeout_is_recorded_not_raised(monkeypatch, tmp_path):
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    monkeypatch.setattr(runner, "worker_cmd", lambda module, spec: sleeper)
    spec = {"label": "slow", "section": "lm", "threads": 1, "key": "k", "model": str(tmp_path)}
    rec = suite.run_one(spec, None, False, timeout=1)
    assert rec["timed_out"] and rec["returncode"] == 124 and rec["key"] == "k"
    if not cgroup.available():
        pytest.skip("cgroup v1 memory controller not writable: the cgroup timeout is not checked")
    rec = suite.run_one(spec, 1 << 30, True, timeout=1)
    assert rec["timed_out"] and rec["returncode"] == 124 and rec["oom_killed"] is False


def test_runner_evicts_then_parses_the_last_line(tmp_path, monkeypatch):
    evicted = []
    monkeypatch.setattr(runner, "evict_file", lambda path: evicted.append(path))
    code = "import json, os; print('noise'); print(json.dumps({'threads': os.environ['OMP_NUM_THREADS']}))"
    cmd = [sys.executable, "-c", code]
    r = runner.run_worker(cmd, threads=3, evict=["a", "b"])
    assert evicted == ["a", "b"] and r["returncode"] == 0 and r["threads"] == "3" and r["wall_s"] > 0
    r = runner.run_worker([sys.executable, "-c", "print('no json')"])
    assert r["returncode"] == 1 and r["error"] == "the worker printed no JSON result"
    r = runner.run_worker([sys.executable, "-c", "import sys; sys.exit('bad spec')"])
    assert r["returncode"] == 1 and r["error"] == "bad spec"
    spec = {"label": "x", "section": "lm", "prompts": [[1]], "key": "k", "skip": "s", "mem_pct": 5}
    assert runner.spec_key(spec) == runner.spec_key(dict(spec, prompts=[[2]], key="other"))
    assert runner.spec_key(spec) != runner.spec_key(dict(spec, mem_pct=6))
    assert runner.skipped(spec, "why") == {"label": "x", "section": "lm", "curve": None, "mem_pct": 5, "key": "k",
                                           "returncode": None, "skipped": "why"}


# -- benchmarks/ scripts -------------------------------------------------------------------------


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_limit_records_timeouts_and_finds_its_data(tmp_path, monkeypatch):
    ml = _script("memory_limit")
    model = tmp_path / "m"
    (model / "eval").mkdir(parents=True)
    monkeypatch.setattr(ml, "SHIPPED_LM", tmp_path / "shipped")
    assert ml.default_data(model) is None
    (tmp_path / "shipped" / "eval").mkdir(parents=True)
    (tmp_path / "shipped" / "eval" / "heldout.txt").write_text("x")
    assert ml.default_data(model) == tmp_path / "shipped" / "eval" / "heldout.txt"
    (model / "eval" / "heldout.txt").write_text("y")
    assert ml.default_data(model) == model / "eval" / "heldout.txt"

    args = Namespace(model=model, data=model / "eval" / "heldout.txt", max_tokens=8, threads=1, timeout=1)
    monkeypatch.setattr(cgroup, "run_limited", lambda *a, **k: cgroup.LimitedRun(124, "", "timed out", 1.0, None, 5,
                                                                                  0, False, True))
    r = ml.run(args, "committee", "50%", None)
    assert r["timed_out"] and r["returncode"] is None and r["cgroup_max_usage_bytes"] == 5
    monkeypatch.setattr(cgroup, "run_limited", lambda *a, **k: cgroup.LimitedRun(0, '{"ppl": 3.5}\n', "", 1.0, 9, 5,
                                                                                  0, False))
    r = ml.run(args, "committee", "50%", 9)
    assert r["returncode"] == 0 and r["ppl"] == 3.5 and r["timed_out"] is False and r["limit_bytes"] == 9


def test_scaling_smoke(tmp_path):
    from pcmoe.bench import scaling

    argv = ["--out", str(tmp_path / "out"), "--models", str(tmp_path / "models"), "--experts", "8", "--shape", "tiny",
            "--configs", "full,committee", "--quick", "--decode-tokens", "3", "--prompts", "1", "--trials", "1",
            "--threads", "1"]
    assert scaling.main(argv) == 0
    runs = json.loads((tmp_path / "out" / "scaling.json").read_text())
    assert [r["label"] for r in runs] == ["E8 full", "E8 committee@50%"]
    assert all(r["returncode"] == 0 and r["decode_tokens_per_s"] > 0 for r in runs)
    assert "| E8 committee@50% |" in (tmp_path / "out" / "scaling.md").read_text()
    assert (tmp_path / "out" / "scaling.png").stat().st_size > 1000
    wrapper = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--help"], capture_output=True,
                             text=True, timeout=60)
    assert wrapper.returncode == 0 and "--shape" in wrapper.stdout
