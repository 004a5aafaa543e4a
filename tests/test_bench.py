"""The benchmark suite runs end to end on a tiny model (a reduced --quick) and writes its outputs."""

import json

from pcmoe.cli import main


def test_bench_quick_writes_json_markdown_and_plots(tiny_lm, tmp_path, capsys):
    data = tmp_path / "heldout.txt"
    data.write_text("\n\n=====\n\n".join(["hello world " * 40, "def main():\n    return 0\n" * 20] * 2))
    out = tmp_path / "bench"
    argv = ["bench", "--model", str(tiny_lm), "--data", str(data), "--out", str(out), "--quick", "--vision", "",
            "--budgets", "50", "--policies", "committee,magnitude-keep,on-demand", "--eval-tokens", "64",
            "--prompts", "1", "--decode-tokens", "4", "--threads", "1", "--no-cgroup",
            "--skip", "storage,quant,llamacpp,topk"]
    assert main(argv) == 0
    report = json.loads((out / "bench.json").read_text())
    labels = {r["label"]: r for r in report["runs"]}
    for label in ("full", "committee@50%", "magnitude-keep@50%", "on-demand@50%", "transformers"):
        assert labels[label]["returncode"] == 0, labels[label].get("error")
    assert labels["on-demand@50%"]["ppl"] == labels["full"]["ppl"]  # exact policy, same tokens
    assert abs(labels["transformers"]["ppl"] - labels["full"]["ppl"]) < 1e-3 * labels["full"]["ppl"]
    assert {t["target"] for t in report["targets"]} >= {"committee ppl / full ppl", "committee decode / full decode"}
    md = (out / "bench.md").read_text()
    assert "| committee@50% |" in md
    assert (out / "memory_vs_quality.png").stat().st_size > 1000 and (out / "memory_vs_speed.png").exists()
    # a second invocation resumes from runs.jsonl instead of measuring again
    assert main(argv) == 0
    assert len((out / "runs.jsonl").read_text().splitlines()) == len(report["runs"])
