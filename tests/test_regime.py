"""The regime study (pcmoe.bench.regime): its budget rules, plan, report, and the measurement
helpers it added (forced continuations in decode_trials, ReadMeter)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from pcmoe import protocol
from pcmoe.bench import common, regime
from pcmoe.system import evict_file

ROOT = Path(__file__).resolve().parents[1]

MB = 10**6


def _sizes():
    """A 1 GB checkpoint: 100 MB of non-expert weights, 900 MB of experts (int4: 250 MB)."""
    q = {"nonexpert": 100 * MB, "all_experts": 250 * MB, "full": 350 * MB, "min_budget": {True: 140 * MB}}
    return {"nonexpert": 100 * MB, "all_experts": 900 * MB, "full": 1000 * MB, "dtype": "bfloat16",
            "min_budget": {True: 220 * MB}, "quant": {"int4": q}, "quant_errors": {"int8": "not divisible"},
            "nonexpert_quantized": {"int8": 52 * MB, "int4": 30 * MB}, "fingerprint": "f" * 16, "experts": 32}


def test_pcmoe_config_all_resident_committee_or_does_not_fit():
    s = _sizes()
    assert regime.pcmoe_config(s, None, "committee", 1200 * MB) == {"policy": "full", "budget": None,
                                                                     "weight_bytes": 1000 * MB}
    assert regime.pcmoe_config(s, None, "committee", 500 * MB)["policy"] == "committee"
    assert "does not fit" in regime.pcmoe_config(s, None, "committee", 200 * MB)["skip"]
    # int4 everything: experts 250 MB + non-expert at int4 30 MB = 280 MB fits all at 300 MB
    assert regime.pcmoe_config(s, "int4", "committee", 300 * MB)["policy"] == "full"
    # its minimum counts the quantised non-expert weights: 140 - 100 + 30 = 70 MB
    assert regime.pcmoe_config(s, "int4", "committee", 71 * MB)["budget"] == 71 * MB
    assert "does not fit" in regime.pcmoe_config(s, "int4", "committee", 69 * MB)["skip"]
    # on-demand never becomes `full` (it stays exact); its budget is capped at everything
    assert regime.pcmoe_config(s, None, "on-demand", 5000 * MB) == {"policy": "on-demand", "budget": 1000 * MB,
                                                                     "weight_bytes": 1000 * MB}
    assert "not available" in regime.pcmoe_config(s, "int8", "committee", 500 * MB)["skip"]
    assert "no runtime overhead" in regime.pcmoe_config(s, None, "committee", None)["skip"]
    assert regime.pcmoe_budget(1000 * MB, 300 * MB) == 700 * MB - regime.ALLOCATOR_SLACK


def _args(**kw):
    base = dict(limit_fractions=[1.2, 0.5], systems=list(regime.SYSTEMS), decode_tokens=8, trials=1, threads=1)
    return argparse.Namespace(**{**base, **kw})


def test_plan_gives_every_system_each_limit_with_stable_keys(tmp_path):
    s = _sizes()
    gguf = tmp_path / "m-q4_K_M.gguf"
    gguf.write_bytes(b"x")
    ggufs = {"bf16": "conversion to bf16 failed: boom", "q4_K_M": gguf}
    runs = regime.plan(_args(), tmp_path, s, {"bf16": 300 * MB, "int4": 280 * MB, "int4+int2": 290 * MB}, [[1, 2]],
                       [[3] * 7], ggufs)
    assert len(runs) == 2 * len(regime.SYSTEMS)
    by = {(r["limit_fraction"], r["system"]): r for r in runs}
    assert by[(1.2, "pcmoe bf16")]["budget"] == 1200 * MB - 300 * MB - regime.ALLOCATOR_SLACK
    assert by[(1.2, "pcmoe bf16")]["limit_bytes"] == 1200 * MB
    assert by[(0.5, "pcmoe int4")]["options"] == {"quantize": "int4", "nonexpert_quantize": "int4"}
    assert "not available" in by[(0.5, "pcmoe int8")]["skip"]
    assert "boom" in by[(0.5, "llama.cpp bf16")]["skip"]
    assert by[(0.5, "llama.cpp q4_K_M")]["gguf"] == str(gguf) and by[(0.5, "llama.cpp q4_K_M")]["use_mmap"]
    assert "not installed" in by[(0.5, "llama.cpp q8_0")]["skip"]
    assert "1 GiB" in by[(0.5, "accelerate")]["skip"]  # 500 MB cannot hold accelerate's runtime
    shadowed = by[(0.5, "pcmoe int4 + int2 shadows")]
    assert shadowed["policy"] == "committee" and shadowed["options"]["shadow"] == "int2"
    assert "shadow" not in by[(1.2, "pcmoe int4 + int2 shadows")]["options"]  # all resident: no shadows
    assert by[(1.2, "accelerate")]["budget_bytes"] == 1200 * MB - regime.ACCELERATE_ALLOWANCE
    again = regime.plan(_args(), tmp_path, s, {"bf16": 300 * MB, "int4": 280 * MB, "int4+int2": 290 * MB}, [[1, 2]],
                       [[3] * 7], ggufs)
    assert [r["key"] for r in again] == [r["key"] for r in runs] and len({r["key"] for r in runs}) == len(runs)
    longer = regime.plan(_args(decode_tokens=16), tmp_path, s, {"bf16": 300 * MB}, [[1, 2]], [[3] * 15], ggufs)
    assert longer[0]["key"] != runs[0]["key"]
    assert "no runtime overhead" in {r["system"]: r for r in longer}["pcmoe int4"]["skip"]  # int4 not calibrated


def _rec(system, limit, tps=None, **kw):
    rec = {"section": "regime", "experts": 32, "limit_bytes": limit, "system": system, "label": system,
           "returncode": 0 if tps else 137, "decode_tokens_per_s": tps, "prefill_tokens_per_s": tps and 10 * tps,
           "ttft_cold_s": 1.5, "decode_read_bytes_per_token": 2e6, "peak_rss_bytes": 500 * MB,
           "cgroup_max_usage_bytes": 600 * MB}
    rec.update(kw)
    return rec


def test_report_ratios_tables_and_plot(tmp_path):
    results = [_rec("pcmoe int4", 600 * MB, 40.0, policy="full", skipped=7600),  # 7600 masked expert choices
               _rec("llama.cpp q4_K_M", 600 * MB, 20.0),
               _rec("pcmoe bf16", 600 * MB, 10.0, budget=300 * MB), _rec("llama.cpp bf16", 600 * MB, 4.0),
               _rec("llama.cpp q8_0", 600 * MB, None, oom_killed=True),
               _rec("pcmoe int4 + int2 shadows", 600 * MB, 80.0, policy="full"),  # a second sample of int4
               _rec("pcmoe on-demand int4", 600 * MB, None, returncode=1,
                    error="PcmoeError: budget 1 MB is below the minimum 2 MB for these shadow experts"),
               {"section": "regime", "experts": 32, "limit_bytes": 600 * MB, "system": "pcmoe int8", "label": "x",
                "returncode": None, "skipped": "does not fit: 1 MB left for weights"}]
    (row,) = regime.ratios(results)
    assert row["pcmoe int4 / llama.cpp q4_K_M"] == 2.0 and row["pcmoe bf16 / llama.cpp bf16"] == 2.5
    assert row["pcmoe int8 / llama.cpp q8_0"] is None and row["best pcmoe / best llama.cpp"] == 2.0  # not 80/20
    refused = next(r for r in results if r["system"] == "pcmoe on-demand int4")
    assert regime.outcome(refused).startswith("does not fit") and regime.too_small(refused)
    meta = {"commit": "abc", "date": "d", "cpu": "cpu", "threads": 2, "command": "python -m pcmoe.bench.regime",
            "models": [{"experts": 32, "model": "m", "sizes": {"full": 1000 * MB, "nonexpert": 100 * MB},
                        "overheads": {"bf16": 300 * MB}, "gguf_bytes": {"q4_K_M": 290 * MB}, "routing": "baked"}]}
    regime.write_report(tmp_path, results, meta)
    md = (tmp_path / "regime.md").read_text()
    assert "| E32 | 600.00 MB | 10.0 | does not fit | 40.0 | does not fit | 80.0 | 4.0 | OOM | 20.0 |" in md
    assert "| E32 | 600.00 MB | 2.50 | - | 2.00 | 2.00 |" in md
    assert "OOM killed" in md and "weights 300.00 MB" in md and "all resident" in md
    assert "| pcmoe int4 | all resident | ok |" in md and regime.outcome(results[0]) == "ok"
    regime.main(["--report-only", "--out", str(tmp_path)])  # rewritten from regime.json alone
    assert (tmp_path / "regime.md").read_text() == md
    data = json.loads((tmp_path / "regime.json").read_text())
    assert data["ratios"][0]["best pcmoe"] == 40.0 and len(data["results"]) == 8
    if not common.missing("matplotlib"):
        assert (tmp_path / "regime.png").read_bytes()[:4] == b"\x89PNG"


def test_quality_twin_keeps_policy_precision_and_member_share(tmp_path):
    lm = ROOT / "models" / "pcmoe-lm"
    rec = {"system": "pcmoe int4", "policy": "committee", "committee_sizes": [8, 8, 16, 0], "experts": 32}
    assert regime.member_share(rec) == 0.25
    spec = regime.quality_spec(rec, lm, "heldout.txt", 1)
    assert spec["policy"] == "committee" and spec["plan"]["committee_sizes"] == [4] * 6  # 25 % of 16, 6 layers
    assert spec["plan"]["precisions"] == ["int4"] * 6 and spec["plan"]["nonexpert_precision"] == "int4"
    tiny = regime.quality_spec(dict(rec, committee_sizes=[1, 1, 1, 1]), lm, "heldout.txt", 1)
    assert tiny["plan"]["committee_sizes"] == [1] * 6  # at least one member
    assert spec["options"] == {"quantize": "int4", "nonexpert_quantize": "int4"}
    assert spec["eval_tokens"] == regime.QUALITY_TOKENS and "prompts" not in spec
    exact = regime.quality_spec({"system": "pcmoe on-demand bf16", "policy": "on-demand"}, lm, "heldout.txt", 1)
    assert exact["policy"] == "full" and exact["budget"] is None and exact["options"] == {}
    assert exact["key"] != spec["key"]
    assert regime.quality_spec({"system": "pcmoe bf16", "policy": "committee"}, lm, "x", 1) is None


def test_bad_options_are_one_line_errors(capsys):
    for argv, text in ((["--limits", "0.5,x"], "comma-separated numbers"), (["--experts", "1"], "at least 2"),
                       (["--systems", "pcmoe bf16,vllm"], "unknown system")):
        with pytest.raises(SystemExit):
            regime.main(argv)
        assert text in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--decode-tokens must be at least 2"):
        regime.main(["--decode-tokens", "1", "--source", str(ROOT / "models/pcmoe-lm")])
    with pytest.raises(SystemExit, match="does not exist"):
        regime.main(["--data", "/nonexistent.txt"])
    with pytest.raises(SystemExit, match="--out: .* is not a directory"):
        regime.main(["--source", str(ROOT / "models/pcmoe-lm"), "--out", str(ROOT / "README.md" / "x")])


def test_text_prompts_fold_ids_into_the_vocabulary(tmp_path):
    lm = ROOT / "models" / "pcmoe-lm"
    small = tmp_path / "small"
    small.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (small / f).write_bytes((lm / f).read_bytes())
    cfg = json.loads((lm / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**cfg, "vocab_size": 50}))
    prompts, conts = regime.text_prompts(small, str(lm / "eval" / "heldout.txt"), 2, 9)
    assert len(prompts) == 2 and all(len(p) == protocol.PROMPT_TOKENS for p in prompts)
    assert all(len(c) == 8 for c in conts) and max(max(p + c) for p, c in zip(prompts, conts)) < 50
    full_p, full_c = regime.text_prompts(lm, str(lm / "eval" / "heldout.txt"), 2, 9)
    assert [i % 50 for i in full_p[0] + full_c[0]] == prompts[0] + conts[0]  # the text continues the prompt


def test_decode_trials_feed_the_continuation():
    fed = []

    class Logits:
        def argmax(self):
            return 99

    def step(state, token):
        fed.append(token)
        return Logits()

    protocol.decode_trials(lambda ids: (None, Logits()), step, [[1], [2]], decode_tokens=3, trials=1, warmup=0,
                           continuations=[[5, 6], [7, 8, 9]])
    assert fed == [5, 6, 7, 8]
    fed.clear()
    protocol.decode_trials(lambda ids: (None, Logits()), step, [[1]], decode_tokens=3, trials=1, warmup=0)
    assert fed == [99, 99]  # greedy without continuations
    with pytest.raises(ValueError, match="continuation of at least 2"):
        protocol.decode_trials(lambda ids: (None, Logits()), step, [[1]], 3, continuations=[[5]])


def test_read_meter_splits_storage_reads_into_prefill_and_decode(tmp_path):
    if common.process_read_bytes() is None:
        pytest.skip("no /proc/self/io here")
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(8 << 20))
    os.sync()
    evict_file(path)
    start = common.process_read_bytes()
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
    if common.process_read_bytes() - start < (4 << 20):
        pytest.skip("this filesystem does not count reads in /proc/self/io (or could not evict the file)")
    evict_file(path)
    meter = common.ReadMeter()

    def prefill(ids):
        return None, None

    wrapped = meter.wrap(prefill)
    wrapped([1])
    with open(path, "rb", buffering=0) as f:  # read after the prefill returned: the decode phase
        while f.read(1 << 20):
            pass
    out = meter.stop()
    assert out["decode_read_bytes"] >= 7 << 20 and out["prefill_read_bytes"] < (1 << 20)
    assert 0 < out["ttft_cold_s"] < 3600
    age = common.process_age_s()
    assert age is not None and age >= out["ttft_cold_s"]


@pytest.mark.slow
def test_regime_end_to_end_on_a_tiny_checkpoint(tmp_path, monkeypatch):
    """The study on a tiny baked checkpoint, inside real cgroup limits (root, cgroup v1)."""
    from pcmoe.bench import cgroup

    if not cgroup.available():
        pytest.skip("needs cgroup v1 memory limits (root)")
    monkeypatch.chdir(tmp_path)  # data/ (checkpoint, trace) is built here
    lm = ROOT / "models" / "pcmoe-lm"
    out = tmp_path / "regime"
    argv = ["--shape", "tiny", "--experts", "16", "--limits", "2000,700", "--decode-tokens", "4", "--trials", "1",
            "--prompts", "1", "--source", str(lm), "--out", str(out),
            "--systems", "pcmoe bf16,pcmoe int4,pcmoe on-demand bf16"]
    assert regime.main(argv) == 0
    data = json.loads((out / "regime.json").read_text())
    measured = [r for r in data["results"] if r["section"] == "regime"]
    assert len(measured) == 6 and all(r["returncode"] == 0 for r in measured)
    assert all(r["cgroup_max_usage_bytes"] <= r["limit_bytes"] for r in measured)
    assert all(r["decode_tokens_per_s"] > 0 and r["ttft_cold_s"] > 0 for r in measured)
    assert "baked routing" in data["meta"]["models"][0]["routing"]
    assert all(r["quality_ppl"] > 1 for r in measured)  # the trained LM at each configuration
    quality = [r for r in data["results"] if r["section"] == "regime-quality"]
    assert quality and all(r["returncode"] == 0 for r in quality)
    first = (out / "runs.jsonl").read_text()
    assert regime.main(argv) == 0  # resumed: nothing is measured again
    assert (out / "runs.jsonl").read_text() == first
