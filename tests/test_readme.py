"""The README runs: its Python blocks execute against the shipped models, and every `pcmoe` command
line in it parses (commands, flags and the model folders it names exist)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pcmoe.cli import COMMANDS, command_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SHIPPED = (ROOT / "models" / "pcmoe-lm" / "model.safetensors").exists()


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def command_lines() -> list[list[str]]:
    """Each `pcmoe ...` command of the README's bash blocks, continuation lines joined."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["pcmoe"]:
                out.append(words[1:])
    return out


def test_readme_has_code():
    assert blocks("python") and len(command_lines()) >= 7


@pytest.mark.skipif(not SHIPPED, reason="models/pcmoe-lm is not in this checkout")
@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_blocks_run(index, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the README's paths are relative to the checkout
    exec(compile(blocks("python")[index], f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out  # it prints what it shows


@pytest.mark.parametrize("argv", command_lines(), ids=lambda argv: " ".join(argv[:3]))
def test_command_lines_parse(argv):
    assert argv and argv[0] in COMMANDS, argv
    args = command_parser(argv[0]).parse_args(argv[1:])  # SystemExit (a failure) on an unknown flag
    for value in vars(args).values():
        if isinstance(value, str) and value.startswith("models/"):
            assert (ROOT / value).exists(), value


def test_setup_commands_exist():
    for script in re.findall(r"^bash (scripts/\S+\.sh)", README, flags=re.M):
        assert (ROOT / script).is_file(), script
    assert {"scripts/demo.sh", "scripts/test.sh"} <= set(re.findall(r"^bash (scripts/\S+\.sh)", README, flags=re.M))


def test_listed_files_exist():
    block = README[README.index("## Files"):]
    block = block[block.index("```\n") + 4:]
    block = block[:block.index("```")]
    folder = None
    for line in block.splitlines():
        if not line.strip() or line.startswith(" " * 6):  # blank, or a description's second line
            continue
        name = line.split()[0]
        if not line.startswith(" "):  # a top-level folder, its files below it
            folder = name
            assert (ROOT / name).is_dir(), name
        else:
            assert (ROOT / folder / name).exists(), f"{folder}{name}"
