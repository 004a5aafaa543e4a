"""The lean serve path (LeanConfig + LeanTokenizer + the lean skeleton) imports no transformers module,
and gives what transformers' config and tokenizer give: the same fields, ids, text, special tokens,
chat prompts, perplexity and greedy tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pcmoe.models.config import REQUIRED, lean_config
from pcmoe.tokenizer import LeanTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LM = ROOT / "models" / "pcmoe-lm"
PROMPT = "def fibonacci(n):\n    "
TEXTS = ["hello world", "  leading spaces and trailing  ", "def f(x):\n\treturn x * 2\n", "naïve café — 日本語 🙂",
         "<|im_start|>user\nhi<|im_end|>\n", "a<|endoftext|>b<|im_end|>", "<|im_start|", "", "\n\n\n", "x" * 300,
         "Numbers 1234567890 and symbols !@#$%^&*()[]{}"]

_SERVE = """
import json, sys
import pcmoe
from pcmoe import protocol
engine = pcmoe.load(sys.argv[1], policy="full", threads=1)
steps = list(engine.generate(engine.encode(sys.argv[2]), max_new_tokens=8, stop_on_eos=False))
stream = engine.encode(open(sys.argv[3]).read()[:4000])
nll, count = protocol.stream_nll(lambda x, s: engine.forward(x, s), engine.new_state, [stream], max_tokens=128)
print(json.dumps({"transformers": sorted(m for m in sys.modules if m.split(".")[0] == "transformers"),
                  "tokens": [s.token_id for s in steps], "nll": nll, "count": count,
                  "tokenizer": type(engine.tokenizer).__name__, "config": type(engine.config).__name__}))
"""


def _outputs(engine, heldout: Path) -> dict:
    from pcmoe import protocol

    steps = list(engine.generate(engine.encode(PROMPT), max_new_tokens=8, stop_on_eos=False))
    stream = engine.encode(heldout.read_text()[:4000])
    nll, count = protocol.stream_nll(lambda x, s: engine.forward(x, s), engine.new_state, [stream], max_tokens=128)
    return {"tokens": [s.token_id for s in steps], "nll": nll, "count": count}


def test_lean_serve_path_imports_no_transformers_and_matches_transformers(monkeypatch):
    heldout = LM / "eval" / "heldout.txt"
    out = subprocess.run([sys.executable, "-c", _SERVE, str(LM), PROMPT, str(heldout)], capture_output=True,
                         text=True, cwd=ROOT, check=True)
    lean = json.loads(out.stdout.strip().splitlines()[-1])
    assert lean["transformers"] == []
    assert (lean["tokenizer"], lean["config"]) == ("LeanTokenizer", "LeanConfig")

    import pcmoe
    from pcmoe import loader

    # the path before: transformers' config and AutoTokenizer
    monkeypatch.setattr(loader, "lean_config", lambda *a, **k: None)
    monkeypatch.setattr(LeanTokenizer, "from_folder", classmethod(lambda cls, folder: None))
    engine = pcmoe.load(LM, policy="full", threads=1)
    assert type(engine.tokenizer).__name__ != "LeanTokenizer" and type(engine.config).__name__ != "LeanConfig"
    before = _outputs(engine, heldout)
    assert lean["tokens"] == before["tokens"]
    assert (lean["nll"], lean["count"]) == (before["nll"], before["count"])


def _auto_config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def _check_fields(folder: Path):
    data = json.loads((folder / "config.json").read_text())
    lean, auto = lean_config(data, folder), _auto_config(folder)
    assert lean is not None
    for name in REQUIRED[data["model_type"]] + ("model_type", "head_dim", "layer_types", "clip_qkv"):
        assert hasattr(lean, name) == hasattr(auto, name), name
        if hasattr(auto, name):
            assert getattr(lean, name) == getattr(auto, name), name


def test_lean_config_fields_equal_transformers_config_shipped_lm():
    _check_fields(LM)


@pytest.mark.parametrize("family", sorted(REQUIRED))
def test_lean_config_fields_equal_transformers_config_tiny(family, tmp_path):
    from pcmoe.testing import make_checkpoint

    make_checkpoint(family, tmp_path)
    _check_fields(tmp_path)


def test_lean_config_needs_every_field():
    data = json.loads((LM / "config.json").read_text())
    del data["norm_topk_prob"]  # transformers' class default would apply: leave it to transformers
    assert lean_config(data) is None
    assert lean_config({"model_type": "phimoe"}) is None


def test_twin_builds_from_lean_config():
    import pcmoe

    engine = pcmoe.load(LM, policy="full", threads=1, kernel="eager")
    twin = engine.model.transformers_model()
    assert type(twin).__name__ == "Qwen3MoeForCausalLM"
    assert twin.config.num_experts == engine.config.num_experts


def test_lean_tokenizer_matches_transformers_on_shipped_lm():
    from transformers import AutoTokenizer

    lean, auto = load_tokenizer(LM), AutoTokenizer.from_pretrained(LM)
    assert isinstance(lean, LeanTokenizer)
    for text in TEXTS:
        for special in (False, True):
            ids = lean(text, add_special_tokens=special)["input_ids"]
            assert ids == auto(text, add_special_tokens=special)["input_ids"], text
            assert lean.encode(text) == auto.encode(text), text
            for skip in (False, True):
                assert lean.decode(ids, skip_special_tokens=skip) == auto.decode(ids, skip_special_tokens=skip)
    for name in ("eos_token", "eos_token_id", "pad_token", "pad_token_id", "bos_token_id", "unk_token_id"):
        assert getattr(lean, name) == getattr(auto, name), name
    assert lean.get_vocab() == auto.get_vocab() and len(lean) == len(auto)
    assert lean.all_special_tokens == auto.all_special_tokens and lean.all_special_ids == auto.all_special_ids
    for tokens in (["Ġhello", "Ġwor", "ld"], ["<|im_end|>", "Ġa"], []):
        assert lean.convert_tokens_to_string(tokens) == auto.convert_tokens_to_string(tokens)
    assert lean.convert_tokens_to_ids("<|im_end|>") == auto.convert_tokens_to_ids("<|im_end|>")
    assert lean.chat_template == auto.chat_template
    chats = [[{"role": "user", "content": "hi"}],
             [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "4"}, {"role": "user", "content": "café <|im_end|>"}]]
    for messages in chats:
        for gen in (False, True):
            assert lean.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == \
                auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def test_other_tokenizers_go_to_transformers(tmp_path):
    (tmp_path / "tokenizer.json").write_text((LM / "tokenizer.json").read_text())
    config = json.loads((LM / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "Qwen2Tokenizer"}))
    assert LeanTokenizer.from_folder(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    assert LeanTokenizer.from_folder(tmp_path) is None
    assert load_tokenizer(tmp_path / "absent") is None
