"""The command line, run as a user would (in-process through pcmoe.cli.main)."""

import json

import pytest

from pcmoe.cli import main

DOCS = "hello world the quick brown fox\n\n=====\n\ndef main():\n    return 0\n\fthe lazy dog says hello world\n"


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text(DOCS)
    return path


def test_info(tiny_lm, capsys):
    assert main(["info", "--model", str(tiny_lm), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "qwen3_moe" and info["moe_layers"] == 2 and info["experts_per_layer"] == 8
    assert info["minimum_budget_committee"] < info["full_model_bytes"]


def test_generate_streams_and_prints_stats(tiny_lm, capsys):
    assert main(["generate", "--model", str(tiny_lm), "--budget", "60%experts", "--prompt", "hello",
                 "--max-tokens", "5", "--quiet", "--json"]) == 0
    out = capsys.readouterr().out
    assert "hit rate" in out and "router mass outside" in out
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["policy"] == "committee" and stats["choices"] > 0


def test_eval_prints_a_json_last_line(tiny_lm, data_file, capsys):
    assert main(["eval", "--model", str(tiny_lm), "--budget", "50%experts", "--data", str(data_file),
                 "--quiet", "--window", "8"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("ppl", "tokens", "tokens_per_s", "peak_rss_bytes", "resident_expert_bytes", "budget_bytes",
                "hit_rate", "router_mass_outside", "bytes_read", "stall_s"):
        assert key in result, key
    assert result["documents"] == 3 and result["tokens"] > 10 and result["ppl"] > 1
    assert result["resident_bytes"] <= result["budget_bytes"]


def test_profile_then_static_frequency(tiny_lm, data_file, tmp_path, capsys):
    profile = tmp_path / "profile.json"
    assert main(["profile", "--model", str(tiny_lm), "--data", str(data_file), "--out", str(profile),
                 "--quiet"]) == 0
    data = json.loads(profile.read_text())
    assert data["format"] == "pcmoe-profile/1" and sum(data["counts"][0]) > 0
    assert main(["eval", "--model", str(tiny_lm), "--budget", "50%experts", "--policy", "static-frequency",
                 "--profile", str(profile), "--data", str(data_file), "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["policy"] == "static-frequency"


@pytest.mark.parametrize("argv, message", [
    (["info", "--model", "/nonexistent/model"], "does not exist"),
    (["eval", "--model", "{lm}", "--budget", "1%", "--data", "{data}"], "below the minimum"),
    (["eval", "--model", "{lm}", "--data", "/nonexistent.txt", "--quiet"], "does not exist"),
    (["generate", "--model", "{lm}", "--prompt", "hi", "--budget", "much"], "cannot read budget"),
    (["eval", "--model", "{lm}", "--data", "{data}", "--window", "0", "--quiet"], "window and chunk"),
    (["eval", "--model", "{lm}", "--data", "{data}", "--chunk", "-3", "--quiet"], "window and chunk"),
    (["eval", "--model", "{lm}", "--data", "{data}", "--plan", "{data}", "--quiet"], "not valid JSON"),
    (["generate", "--model", "{lm}", "--prompt", "hi", "--update-every", "0"], "update_every must be"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_lm, data_file, capsys, argv, message):
    argv = [a.format(lm=tiny_lm, data=data_file) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
