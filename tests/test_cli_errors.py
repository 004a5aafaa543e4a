"""Bad input to the command line, as a new user types it: each answered by one line on stderr and
exit code 2, before any model is loaded and, where the answer needs no model, before torch is
imported; warnings for input that works but means little."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pcmoe.args
import pcmoe.cli
from pcmoe.cli import COMMANDS, command_parser, data_warnings, main, minimum_budget_lines

ROOT = Path(__file__).resolve().parents[1]
DOCS = "hello world the quick brown fox\n\n=====\n\ndef main():\n    return 0\n\fthe lazy dog says hello world\n"


def _idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = np.array([magic, len(array), *array.shape[1:]], dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(folder: Path, n: int = 40) -> Path:
    """A small IDX folder shaped like Fashion-MNIST's test split (random pixels, every class)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    _idx(folder / "t10k-images-idx3-ubyte.gz", 0x0803, rng.integers(0, 256, (n, 28, 28)))
    _idx(folder / "t10k-labels-idx1-ubyte.gz", 0x0801, np.arange(n) % 10)
    return folder


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_lm, tiny_checkpoint):
    import torch

    from pcmoe.models.vit_moe import VitMoeConfig, VitMoeForImageClassification, save_pretrained

    root = tmp_path_factory.mktemp("cli_errors")
    torch.manual_seed(0)
    vit = root / "vit"
    save_pretrained(VitMoeForImageClassification(VitMoeConfig(
        hidden_size=32, num_layers=2, num_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
        stem_channels=8)).eval(), vit)
    (root / "docs.txt").write_text(DOCS)
    (root / "empty").mkdir()
    good = write_fashion_mnist(root / "fmnist")
    corrupt = root / "corrupt"
    corrupt.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (corrupt / name).write_bytes(b"this is not gzip")
    truncated = root / "truncated"
    truncated.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (truncated / name).write_bytes((good / name).read_bytes()[:200])
    header = root / "header"
    header.mkdir()
    _idx(header / "t10k-images-idx3-ubyte.gz", 0x0803, np.zeros((4, 27, 27)))
    _idx(header / "t10k-labels-idx1-ubyte.gz", 0x0801, np.zeros(4))
    plan = root / "plan.json"
    plan.write_text(json.dumps({"format": "pcmoe-plan/1", "committee_sizes": [4, 4]}))
    bare, _ = tiny_checkpoint("qwen3_moe")  # no tokenizer
    for name, weights in (("config_only", None), ("truncated_lm", b"garbage")):
        (root / name).mkdir()
        (root / name / "config.json").write_text((bare / "config.json").read_text())
        if weights:
            (root / name / "model.safetensors").write_bytes(weights)
    return {"lm": tiny_lm, "vit": vit, "data": root / "docs.txt", "tmp": root, "empty": root / "empty",
            "fmnist": good, "corrupt": corrupt, "truncated": truncated, "header": header, "plan": plan,
            "bare": bare, "config_only": root / "config_only", "truncated_lm": root / "truncated_lm"}


GEN = ["generate", "--model", "{lm}", "--prompt", "hi"]
EVAL = ["eval", "--model", "{lm}", "--data", "{data}", "--quiet"]
PROFILE = ["profile", "--model", "{lm}", "--data", "{data}", "--out", "{tmp}/p.json", "--quiet"]
VIT = ["eval", "--model", "{vit}", "--quiet"]

BAD = [  # argv, what the one line must say
    # sampling values: the rules the server applies (issue 11 items 2 and 7)
    (GEN + ["--top-p", "0", "--temperature", "1"], "--top-p must be a number above 0 and at most 1 (got 0.0)"),
    (GEN + ["--temperature", "-1"], "--temperature must be a number from 0"),
    (GEN + ["--temperature", "nan"], "--temperature must be"),
    (GEN + ["--top-p", "2"], "--top-p must be"),
    (GEN + ["--max-tokens", "0"], "--max-tokens must be an integer of at least 1 (got 0)"),
    (GEN + ["--max-tokens", "-1"], "--max-tokens must be"),
    (GEN + ["--seed-sample", str(2**64)], "--seed-sample must be"),
    (GEN + ["--stop", "a", "--stop", "b", "--stop", "c", "--stop", "d", "--stop", "e"], "at most 4"),
    (["chat", "--model", "{lm}", "--top-p", "0", "--temperature", "1"], "--top-p must be"),
    (["chat", "--url", "http://127.0.0.1:9/v1", "--temperature", "3"], "--temperature must be"),
    # text that is not UTF-8 (item 5): Python hands such argv bytes over as U+DC80..U+DCFF
    (["generate", "--model", "{lm}", "--prompt", "ab\udcffc"], "--prompt is not UTF-8 text: byte 0xFF at character 2"),
    (GEN + ["--stop", "\udcfe"], "--stop is not UTF-8 text"),
    # profile --out checked before the work (item 3)
    (PROFILE[:-3] + ["--out", "{data}/p.json", "--quiet"], "--out: "),
    (PROFILE[:-3] + ["--out", "{tmp}", "--quiet"], "is a directory"),
    (PROFILE + ["--policy", "committee"], "drop --policy"),
    (PROFILE + ["--window", "0"], "--window must be at least 1"),
    (PROFILE + ["--max-tokens", "0"], "--max-tokens must be at least 1"),
    # vision eval data and frames (item 4)
    (VIT + ["--data", "{data}"], "is a file"),
    (VIT + ["--data", "{tmp}/nowhere"], "does not exist"),
    (VIT + ["--data", "{empty}"], "has no t10k-images-idx3-ubyte.gz"),
    (VIT + ["--data", "{corrupt}"], "cannot read"),
    (VIT + ["--data", "{truncated}"], "cannot read"),
    (VIT + ["--data", "{header}"], "is not a Fashion-MNIST IDX file"),
    (VIT + ["--data", "{fmnist}", "--frames", "0"], "--frames must be at least 1 (got 0)"),
    (VIT + ["--data", "{fmnist}", "--frames", "-3"], "--frames must be at least 1"),
    # messages that misled (item 9)
    (["generate", "--model", "{bare}", "--prompt", "hi"], "through the Python API"),
    (["eval", "--model", "{bare}", "--data", "{data}"], "has no tokenizer"),
    (["eval", "--model", "{lm}", "--data", "{tmp}"], "data file {tmp} is a directory"),
    (EVAL + ["--plan", "{plan}", "--policy", "full"], "policy full keeps every expert resident and would ignore it"),
    (GEN + ["--plan", "{plan}", "--policy", "topk-reduce"], "would ignore it"),
    (["generate", "--model", "{vit}", "--prompt", "hi"], "is an image classifier"),
    # paths and values, before torch
    (["info", "--model", "{data}"], "is a file, not a checkpoint folder"),
    (["info", "--model", "{config_only}"], "has no *.safetensors files"),
    (["info", "--model", "{truncated_lm}"], "is truncated"),
    (["generate", "--model", "{empty}", "--prompt", "hi"], "has no config.json"),
    (GEN + ["--profile", "{tmp}/none.json"], "does not exist; make one with `pcmoe profile`"),
    (GEN + ["--plan", "{tmp}/none.json"], "plan file {tmp}/none.json does not exist"),
    (GEN + ["--budget", "lots"], "cannot read budget"),
    (["eval", "--model", "{lm}", "--quiet"], "needs --data"),
    (EVAL + ["--max-tokens", "0"], "--max-tokens must be at least 1"),
    (EVAL + ["--window", "0"], "window and chunk must be positive"),
    # argument errors, on one line too
    (GEN + ["--max-tokens", "abc"], "argument --max-tokens: invalid int value: 'abc'"),
    (["generate", "--model", "{lm}"], "required: --prompt"),
    ([], "required: command"),
    (["serve-me"], "invalid choice: 'serve-me'"),
]


def _fmt(argv, paths):
    return [a.format(**paths) for a in argv]


@pytest.mark.parametrize("argv, message", BAD)
def test_bad_input_is_one_line_exit_2_before_any_load(paths, capsys, monkeypatch, argv, message):
    def no_load(args):
        raise AssertionError("bad input must be refused before the model is loaded")

    monkeypatch.setattr(pcmoe.cli, "engine_from_args", no_load)
    monkeypatch.setattr(pcmoe.args, "engine_from_args", no_load)
    assert main(_fmt(argv, paths)) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: ") and message.format(**paths) in err, err


def test_no_tokenizer_after_load_says_what_to_do(paths, capsys, monkeypatch):
    """The twin of the pre-load check: a tokenizer that load() does not find gets the same advice."""
    monkeypatch.setattr(pcmoe.cli, "has_tokenizer", lambda model: True)
    assert main(["generate", "--model", str(paths["bare"]), "--prompt", "hi", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "through the Python API" in err and "instead of text" not in err


def test_profile_write_failure_is_one_line(paths, capsys, monkeypatch):
    """If the destination goes bad during the work, the atomic writer's WriteError is one line too."""
    monkeypatch.setattr("pcmoe.system.check_writable", lambda path: None)
    out = paths["data"] / "p.json"  # below a file: cannot be created
    assert main(_fmt(PROFILE[:-3], paths) + ["--out", str(out), "--quiet"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot write {out}"), errors


def test_budget_above_the_model_warns(paths, capsys):
    assert main(_fmt(GEN, paths) + ["--budget", "200%", "--max-tokens", "2", "--quiet"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "more than the whole model" in warnings[0]
    assert main(_fmt(GEN, paths) + ["--budget", "60%experts", "--max-tokens", "2", "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("content, warning", [
    ("a", "only 2 token(s) scored"),
    ("\0" * 3000, "does not look like text: 3000 of its 3000 characters are control characters"),
])
def test_data_that_means_little_warns(paths, tmp_path, capsys, content, warning):
    data = tmp_path / "odd.txt"
    data.write_text(content)
    assert main(["eval", "--model", str(paths["lm"]), "--data", str(data), "--quiet", "--window", "16",
                 "--max-tokens", "40"]) == 0
    err = capsys.readouterr().err
    assert warning in err and "Traceback" not in err


def test_data_warnings_leave_text_alone():
    assert data_warnings("x", ["def f():\n\treturn 1\r\n", "plain text\f"]) == []
    assert data_warnings("x", ["text\0" + "x" * 10]) != []


def test_vision_eval_on_a_frame_folder(paths, capsys):
    assert main(_fmt(VIT, paths) + ["--data", str(paths["fmnist"]), "--frames", "12", "--budget", "50%experts"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["frames"] == 12 and 0 <= result["accuracy"] <= 1


def test_vision_eval_shows_progress(paths, capsys):
    import pcmoe
    from pcmoe.models.vit_moe import evaluate_stream, load_fashion_mnist

    with pcmoe.load(paths["vit"], progress=False) as engine:
        result = evaluate_stream(engine, load_fashion_mnist("test", paths["fmnist"]), frames=5, progress=True)
    assert result["frames"] == 5 and "frames" in capsys.readouterr().err  # the tqdm bar


def test_minimum_budget_headline_is_the_default_load():
    info = {"minimum_budget": 9_760_000, "minimum_budget_static": 8_970_000, "minimum_budget_committee": 11_330_000}
    lines = minimum_budget_lines(info)
    assert lines[0] == "  minimum budget       9.76 MB for the default load (policy committee)"
    assert "8.97 MB for a fixed subset" in lines[1] and "11.33 MB for a committee with a spare slot" in lines[2]
    old = minimum_budget_lines({k: v for k, v in info.items() if k != "minimum_budget"})
    assert len(old) == 1 and "default load" not in old[0]


def test_info_prints_the_minimum_inspect_gives(paths, capsys):
    from pcmoe.engine import inspect

    assert main(["info", "--model", str(paths["lm"])]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = minimum_budget_lines(inspect(paths["lm"]))
    assert lines and out[-len(lines):] == lines


# -- help ---------------------------------------------------------------------------------------


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert set(COMMANDS) == {"info", "generate", "eval", "profile", "trace", "calibrate", "plan", "serve", "budget",
                             "chat", "bench"}
    for name, (summary, _) in COMMANDS.items():
        assert f"{name}  " in out and summary.split()[0] in out, name
    # each summary on its own line, after its name
    lines = [line.split() for line in out.splitlines()]
    assert all(any(words[:1] == [name] and len(words) > 1 for words in lines) for name in COMMANDS)


@pytest.mark.parametrize("command", ["info", "generate", "eval", "profile"])
def test_every_option_has_help(command):
    for action in command_parser(command)._actions:
        assert action.help and action.help.strip(), f"{command} {action.option_strings} has no help"


# -- import-time checks, in real processes ------------------------------------------------------

PROBE = """
import json, sys
from pcmoe.cli import main
rc = main(json.loads(sys.argv[1]))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "fastapi", "uvicorn")
               or m.startswith(("pcmoe.bench", "pcmoe.server", "pcmoe.engine")))
print(json.dumps({"rc": rc, "heavy": heavy}))
"""


def _probe(argv, env=None):
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.parametrize("argv", [
    ["--help"], ["info", "--help"], ["generate", "--help"],
    ["generate", "--model", "missing-folder", "--prompt", "x"],
    ["eval", "--model", "{lm}", "--data", "{tmp}/missing.txt"],
    ["generate", "--model", "{lm}", "--prompt", "x", "--top-p", "0"],
    ["profile", "--model", "{lm}", "--data", "{data}", "--out", "{data}/x.json"],
    ["eval", "--model", "{vit}", "--data", "{empty}"],
    ["eval", "--model", "{vit}", "--frames", "0"],
])
def test_help_and_bad_input_answer_before_torch(paths, argv):
    result, err = _probe(_fmt(argv, paths))
    assert result["rc"] in (0, 2) and result["heavy"] == [], (result, err)


def test_info_imports_neither_server_nor_bench(paths):
    result, err = _probe(["info", "--model", str(paths["lm"])])
    assert result["rc"] == 0, err
    assert not [m for m in result["heavy"] if m.startswith(("fastapi", "uvicorn", "pcmoe.server", "pcmoe.bench"))]


def test_non_utf8_bytes_on_the_real_command_line(paths):
    proc = subprocess.run([sys.executable, "-m", "pcmoe", "generate", "--model", str(paths["lm"]).encode(),
                           "--prompt", b"caf\xe9"], capture_output=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "LC_ALL": "C.UTF-8"})
    err = proc.stderr.decode()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "byte 0xE9 at character 3" in err, err


# -- the torch-free checks agree with what load() does ------------------------------------------


def test_vision_file_check_agrees_with_the_reader(paths, tmp_path):
    from pcmoe.cli import VISION_TEST_FILES
    from pcmoe.models.vit_moe import load_fashion_mnist
    from pcmoe.options import PcmoeError

    for keep in ((), VISION_TEST_FILES[:1], VISION_TEST_FILES[1:], VISION_TEST_FILES):
        folder = tmp_path / f"keep{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        for name in keep:
            (folder / name).write_bytes((paths["fmnist"] / name).read_bytes())
        args = command_parser("eval").parse_args(["--model", str(paths["vit"]), "--data", str(folder)])
        try:
            pcmoe.cli.check_eval(args)
            fast = None
        except PcmoeError as e:
            fast = str(e).split(";")[0]
        try:
            load_fashion_mnist("test", folder)
            slow = None
        except PcmoeError as e:
            slow = str(e).split(";")[0]
        assert fast == slow, keep


def test_names_agree_with_the_engine(paths):
    import pcmoe
    from pcmoe.args import ALL_RESIDENT_POLICIES, has_tokenizer
    from pcmoe.policies import ALL_RESIDENT_POLICIES as engine_policies

    assert ALL_RESIDENT_POLICIES == engine_policies
    for model in (paths["lm"], paths["bare"]):
        with pcmoe.load(model, progress=False) as engine:
            assert has_tokenizer(model) == (engine.tokenizer is not None)
