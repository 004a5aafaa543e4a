"""Training the default LM: tokenizer, a tiny training run, and the shipped checkpoint."""

import json
from pathlib import Path

import pytest
import torch

from pcmoe.training.corpus import DOC_SEPARATOR, DOMAINS
from pcmoe.training.lm import ModelShape, TrainConfig, prepare, revive_dead_experts, train

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "pcmoe-lm"

TEXTS = {
    "pydoc": ["The :mod:`os` module provides a portable way of using operating system dependent functionality.",
              "Changed in version 3.11: the *flags* parameter was added. See also :func:`open`."],
    "linuxdoc": ["The kernel scheduler decides which task runs next on each CPU.",
                 "Memory management: pages are allocated from zones by the buddy allocator."],
    "stdlib": ["def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n    return a + b\n",
               "import os\n\nclass Path:\n    def __init__(self, name):\n        self.name = name\n"],
}


@pytest.fixture
def tiny_work(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for domain in DOMAINS:
        docs = TEXTS[domain] * 30
        (corpus / f"train_{domain}.txt").write_text(DOC_SEPARATOR.join(docs))
        (corpus / f"val_{domain}.txt").write_text(DOC_SEPARATOR.join(TEXTS[domain]))
    (corpus / "manifest.json").write_text("{}")
    prepare(tmp_path, vocab_size=300)
    return tmp_path


def test_tokenizer_round_trips_and_has_a_chat_template(tiny_work):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_work / "tokenizer")
    for text in ("def f(x):\n    return x  # ünïcödé ✓", "The kernel scheduler", "   spaces\tand\ttabs\n\n"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_training_run_decreases_the_loss(tiny_work):
    shape = ModelShape(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, max_position_embeddings=64)
    cfg = TrainConfig(shape=shape, seq_len=32, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=5, max_steps=40,
                      eval_every=40, eval_tokens=256, ckpt_every=20, bf16=False)
    torch.manual_seed(0)
    train(tiny_work, cfg, log=lambda m: None)
    log = [json.loads(line) for line in (tiny_work / "log.jsonl").read_text().splitlines()]
    first = sum(r["ce"] for r in log[:5]) / 5
    last = sum(r["ce"] for r in log[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert "val_ppl" in log[-1] and (tiny_work / "ckpt.pt").exists()
    # Resuming continues from the checkpoint instead of starting over.
    cfg.max_steps = 45
    train(tiny_work, cfg, log=lambda m: None)
    steps = [json.loads(line)["step"] for line in (tiny_work / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == 45 and steps.count(41) == 1
    # Reviving experts the router neglects: they become copies of busy ones, the rest is untouched.
    before = torch.load(tiny_work / "ckpt.pt", weights_only=False)
    done = revive_dead_experts(tiny_work, cfg, threshold=0.2, sample_tokens=2048)
    after = torch.load(tiny_work / "ckpt.pt", weights_only=False)
    assert done and after["revivals"][-1]["step"] == 45
    key = f"model.layers.{done[0]['layer']}.mlp.experts.gate_up_proj"
    d, j = done[0]["expert"], done[0]["copied_from"]
    assert torch.allclose(after["model"][key][d], before["model"][key][j], atol=0.05 * before["model"][key][j].std())
    assert not torch.equal(after["model"][key][d], before["model"][key][d])
    train(tiny_work, TrainConfig(**{**cfg.__dict__, "max_steps": 47}), log=lambda m: None)  # still trains


@pytest.mark.skipif(not (SHIPPED / "config.json").exists(), reason="the default LM is not in this checkout")
def test_shipped_lm_loads_with_pcmoe_and_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pcmoe

    tok = AutoTokenizer.from_pretrained(SHIPPED)
    ids = tok("def fibonacci(n):\n    ", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "def fibonacci(n):\n    "
    ref = AutoModelForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32)
    with pcmoe.load(SHIPPED, policy="full", dtype="float32", progress=False) as engine:
        with torch.no_grad():
            ours = engine.model(input_ids=torch.tensor([ids])).logits
            theirs = ref(input_ids=torch.tensor([ids])).logits
        assert ours.shape == (1, len(ids), ref.config.vocab_size)
        assert torch.isfinite(ours).all()
        assert (ours - theirs).abs().max() < 1e-4
    with pcmoe.load(SHIPPED, budget="50%experts", progress=False) as engine:
        text = "".join(s.text for s in engine.generate("import os\n", max_new_tokens=8))
        assert len(text) > 0


def test_balance_loss_is_per_layer():
    """Two layers that each use half of the experts, complementary halves: pooled over layers they
    look balanced, per layer they are not."""
    from pcmoe.training.balance import expert_shares, load_balancing_loss

    T, N = 64, 4
    first = torch.full((T, N), -10.0)
    first[:, :2] = torch.randn(T, 2)           # layer 0 uses experts 0 and 1
    second = first[:, [2, 3, 0, 1]]            # layer 1 uses experts 2 and 3
    balanced = torch.zeros(T, N)
    balanced[torch.arange(T), torch.arange(T) % N] = 5.0
    assert load_balancing_loss((balanced,), 1) == pytest.approx(1.0, abs=0.05)
    assert load_balancing_loss((first, second), 2) > 1.8          # each layer starves two experts
    pooled = expert_shares((torch.cat([first, second]),), 2)[0]
    assert torch.allclose(pooled, torch.full((N,), 0.25, dtype=torch.float64))
    assert (expert_shares((first, second), 2)[:, 2:4][0] == 0).all()
