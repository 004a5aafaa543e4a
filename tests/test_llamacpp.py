"""llama.cpp as a bench peer: helpers without llama.cpp, then a tiny end-to-end conversion + parity check."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pcmoe.bench import gguf as G
from pcmoe.bench import llamacpp as L
from pcmoe.bench import runner

REPO = Path(__file__).resolve().parents[1]
UNKNOWN = "BPE pre-tokenizer was not recognized - update get_vocab_base_pre()"


# -- pure helpers --------------------------------------------------------------------------------


class _FakeTextModel:
    """Stands in for conversion.base.TextModel: `res` None means an unknown hash."""

    def __init__(self, res=None, error=UNKNOWN):
        self.res, self.error = res, error

    def get_vocab_base_pre(self, tokenizer):
        if self.res is None:
            raise NotImplementedError(self.error)
        return self.res


def test_pre_fallback_only_for_unknown_hash():
    wrapped = G.with_pre_fallback(_FakeTextModel.get_vocab_base_pre)
    assert wrapped.__wrapped__ is _FakeTextModel.get_vocab_base_pre
    assert wrapped(_FakeTextModel("qwen2"), object()) == "qwen2"  # known hashes are untouched
    assert wrapped(_FakeTextModel(None), object()) == "gpt-2"
    with pytest.raises(NotImplementedError, match="something else"):
        wrapped(_FakeTextModel(None, error="something else"), object())


def test_patch_converter_patches_textmodel_once(monkeypatch):
    base = SimpleNamespace(TextModel=type("TextModel", (_FakeTextModel,), {}))
    pkg = SimpleNamespace(base=base)
    monkeypatch.setitem(sys.modules, "conversion", pkg)
    monkeypatch.setitem(sys.modules, "conversion.base", base)
    G.patch_converter()
    patched = base.TextModel.get_vocab_base_pre
    G.patch_converter()  # idempotent: no wrapper around the wrapper
    assert base.TextModel.get_vocab_base_pre is patched
    assert base.TextModel().get_vocab_base_pre(None) == "gpt-2"


def test_pre_tokenizer_kind(tmp_path):
    from pcmoe.testing import make_tokenizer

    tok = make_tokenizer(tmp_path)
    assert G.byte_level_kind(tok) == "gpt2-byte-level"
    assert G.pre_tokenizer_kind({"type": "ByteLevel", "use_regex": False}) == "ByteLevel"
    assert G.pre_tokenizer_kind({"type": "Metaspace"}) == "Metaspace"


def test_nll_matches_torch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 4
    targets = torch.randint(0, 50, (6,), generator=g)
    ref = torch.nn.functional.cross_entropy(logits.double(), targets, reduction="sum").item()
    assert math.isclose(L.log_softmax_nll(logits.numpy(), targets.tolist()), ref, rel_tol=1e-9)


def _fake_sdist(path: Path) -> Path:
    top = "llama_cpp_python-9.9.9"
    files = {f"{top}/vendor/llama.cpp/convert_hf_to_gguf.py": b"print('hi')\n",
             f"{top}/vendor/llama.cpp/conversion/__init__.py": b"",
             f"{top}/vendor/llama.cpp/gguf-py/gguf/__init__.py": b"",
             f"{top}/vendor/llama.cpp/ggml/src/ggml.c": b"int x;\n",
             f"{top}/vendor/llama.cpp/conversion/../../evil.py": b"",
             f"{top}/llama_cpp/__init__.py": b""}
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_extract_only_the_converter(tmp_path):
    sdist = _fake_sdist(tmp_path / "llama_cpp_python-9.9.9.tar.gz")
    root = G.extract_converter(sdist, tmp_path / "src")
    got = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert got == ["conversion/__init__.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    assert G.converter_root(root) == root
    # find_converter accepts the tarball itself (extracted into the pcmoe cache) ...
    found = G.find_converter(sdist, fetch=False)
    assert G.converter_root(found) == found and found.is_relative_to(Path(os.environ["PCMOE_CACHE"]))


def test_converter_root_layouts(tmp_path, monkeypatch):
    tree = tmp_path / "data" / "llama_cpp_python-1.0" / "vendor" / "llama.cpp"
    (tree / "conversion").mkdir(parents=True)
    (tree / "gguf-py").mkdir()
    (tree / "convert_hf_to_gguf.py").write_text("")
    assert G.converter_root(tree) == tree  # a llama.cpp tree
    assert G.converter_root(tree.parents[1]) == tree  # an extracted sdist
    assert G.converter_root(tmp_path / "data") == tree  # a folder holding one
    assert G.converter_root(tmp_path) is None
    monkeypatch.setenv("PCMOE_LLAMACPP_SRC", str(tmp_path / "data"))
    assert G.find_converter(None, fetch=False) == tree
    with pytest.raises(RuntimeError, match="convert_hf_to_gguf"):
        G.find_converter(tmp_path, fetch=False)


def test_limits_overhead_and_keys():
    sizes = {"nonexpert": 100, "all_experts": 1000, "dtype": "bfloat16"}
    assert L.mmap_limit(sizes, "bf16", 7) == 100 + 500 + 7
    assert L.mmap_limit(sizes, "f32", 7) == 2 * 600 + 7
    f32 = dict(sizes, dtype="float32")  # a float32 checkpoint: its bytes are already f32's
    assert L.mmap_limit(f32, "f32", 7) == 600 + 7 and L.mmap_limit(f32, "bf16", 7) == 300 + 7
    with pytest.raises(ValueError, match="dtype"):
        L.mmap_limit({"nonexpert": 100, "all_experts": 1000}, "bf16", 7)  # no silent bf16 assumption
    assert L.precisions("bfloat16") == (("bf16", "f32", "q8_0", "q4_K_M"), ("bf16", "f32"))
    assert L.precisions("bfloat16", quick=True) == (("bf16", "q8_0", "q4_K_M"), ("bf16",))
    assert L.precisions("float32") == (("f32", "bf16", "q8_0", "q4_K_M"), ("f32", "bf16"))
    assert L.runtime_overhead({"returncode": 0, "peak_rss_bytes": 1500, "model_bytes": 1000}) == 500
    assert L.runtime_overhead({"returncode": 1}) is None
    a = {"label": "x", "eval_tokens": 8, "prompts": [[1]], "gguf": "/a.gguf", "streams": "/s.json"}
    assert L._key(a) == L._key(dict(a, prompts=[[2]], gguf="/b.gguf", streams="/t.json"))
    assert L._key(a) != L._key(dict(a, eval_tokens=9))


def test_cache_follows_the_checkpoint(tiny_lm, tmp_path):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_lm, model)
    out = G.gguf_path(tmp_path / "g", model, "bf16")
    assert out.name == "m-bf16.gguf"
    assert G._sibling(out.with_name("m-q4_K_M.gguf"), "q4_K_M", "f32").name == "m-f32.gguf"
    assert G._sibling(out.with_name("other.gguf"), "q4_K_M", "bf16").name == "other-bf16.gguf"
    out.parent.mkdir()
    out.write_bytes(b"GGUF")
    meta = G.source(model, "bf16")
    assert not G._cached(out, meta)
    G._mark(out, meta)
    assert G._cached(out, meta)
    data = bytearray((model / "model.safetensors").read_bytes())
    data[-1] ^= 1  # the weights changed: the cached file is stale
    (model / "model.safetensors").write_bytes(bytes(data))
    assert not G._cached(out, G.source(model, "bf16"))


def test_run_all_skips_without_llama_cpp(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import raises ImportError
    recs = L.run_all(SimpleNamespace(model=str(tmp_path)), {}, None, False, tmp_path / "runs.jsonl", {})
    assert recs == [{"label": "llama.cpp", "section": "peers", "returncode": None, "skipped": L.SKIP_MESSAGE}]
    assert "pip install 'pcmoe[llamacpp]'" in L.SKIP_MESSAGE
    assert not (tmp_path / "runs.jsonl").exists()


# -- the driver against a stand-in llama_cpp (no build needed) -----------------------------------

FAKE_LLAMA = """
import numpy as np

class Llama:
    # Deterministic logits from the last token: enough to drive pcmoe.bench.llamacpp.measure.
    def __init__(self, model_path, n_ctx=64, n_batch=16, vocab_only=False, **kw):
        self.n_ctx, self.n_tokens, self.vocab = n_ctx, 0, 300
        self.scores = np.zeros((n_ctx, self.vocab), dtype=np.float32)
        self.kw = kw

    def reset(self):
        self.n_tokens = 0

    def eval(self, ids):
        for t in ids:
            row = np.sin(np.arange(self.vocab) * (1 + int(t) % 7))
            self.scores[self.n_tokens] = row
            self.n_tokens += 1

    def close(self):
        pass
"""


def test_run_all_with_a_stand_in_llama_cpp(tiny_lm, tmp_path, monkeypatch):
    from pcmoe.bench import cgroup

    fake = tmp_path / "fake"
    (fake / "llama_cpp").mkdir(parents=True)
    (fake / "llama_cpp" / "__init__.py").write_text(FAKE_LLAMA)
    spec = importlib.util.spec_from_file_location("llama_cpp", fake / "llama_cpp" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "llama_cpp", module)  # this process; undone after the test
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake), str(REPO)]))  # the measuring processes
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" * 1000)
    monkeypatch.setattr(L, "convert", lambda model, out, outtype, **kw: gguf)
    data = tmp_path / "heldout.txt"
    data.write_text("\n\n=====\n".join(["the quick brown fox jumps over the lazy dog " * 12,
                                         "def main():\n    return 0\n" * 12]))
    args = SimpleNamespace(model=str(tiny_lm), data=str(data), threads=1, eval_tokens=40, decode_tokens=3, prompts=1,
                           trials=2, quick=True, out=str(tmp_path / "out"), llamacpp_src=None, gguf_dir=None)
    sizes = {"nonexpert": 40_000, "all_experts": 300_000, "dtype": "float32"}  # tiny_lm is float32
    use_cgroup = cgroup.available()
    from pcmoe.bench.common import RunLog

    log = RunLog(tmp_path / "runs.jsonl")
    recs = {r["label"]: r for r in L.run_all(args, sizes, None, use_cgroup, log, {})}
    assert list(recs) == ["llama.cpp resident/f32", "llama.cpp resident/q8_0", "llama.cpp resident/q4_K_M",
                          "llama.cpp mmap@50%/f32"]  # the checkpoint's own precision first
    for t in ("f32", "q8_0", "q4_K_M"):
        r = recs[f"llama.cpp resident/{t}"]
        assert r["returncode"] == 0, r.get("error")
        assert r["tokens"] == 40 and len(r["decode_trials"]) == 2 and r["warmup"] == 1
        assert 0 <= r["cpu_other_share"] <= 1 and r["curve"] == "llama.cpp resident"
    mmap = recs["llama.cpp mmap@50%/f32"]
    if use_cgroup:
        assert mmap["returncode"] == 0, mmap.get("error")
        assert mmap["budget_bytes"] == 40_000 + 150_000  # float32 checkpoint bytes are f32's: no rescaling
        assert mmap["cgroup_limit_bytes"] == mmap["budget_bytes"] + mmap["overhead_allowance_bytes"]
    else:
        print("cgroup v1 memory controller not writable: the mmap run is skipped")
        assert mmap["returncode"] is None and "cgroup" in mmap["skipped"]
    done = log.done()
    monkeypatch.setattr(runner, "measure", lambda *a, **k: pytest.fail("a finished run was measured again"))
    again = L.run_all(args, sizes, None, use_cgroup, log, done)
    assert [r["label"] for r in again] == list(recs)


# -- end to end on a tiny checkpoint (needs llama-cpp-python and the converter source) -----------


def _converter_or_skip() -> Path:
    for src in (os.environ.get("PCMOE_LLAMACPP_SRC"), REPO / "data" / "llamacpp"):
        if src and G.converter_root(src):
            return G.converter_root(src)
    pytest.skip("llama.cpp converter source not found (set PCMOE_LLAMACPP_SRC)")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    src = _converter_or_skip()
    from pcmoe.testing import make_checkpoint, make_tokenizer

    folder = tmp_path_factory.mktemp("tiny_llamacpp")
    tok = make_tokenizer(folder)
    make_checkpoint("qwen3_moe", folder, vocab_size=len(tok), dtype=torch.bfloat16)
    out = G.convert(folder, G.gguf_path(folder / "gguf", folder, "f32"), "f32", src=src)
    return folder, out, tok


def test_tiny_f32_gguf_matches_transformers(tiny_gguf):
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    folder, gguf, tok = tiny_gguf
    assert json.loads(gguf.with_name(gguf.name + ".json").read_text())["source"]["outtype"] == "f32"
    assert G.convert(folder, gguf, "f32", src="/nonexistent") == gguf  # cached: no converter needed

    # Tokenisation: llama.cpp (tokenizer.ggml.pre = gpt-2) splits text like the HF tokenizer.
    vocab = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    for text in ("the quick brown fox", "def main():\n    return 0", "hello  world!! 42 it's"):
        assert vocab.tokenize(text.encode(), add_bos=False, special=False) == tok(text, add_special_tokens=False)[
            "input_ids"], text
    vocab.close()

    # Logits of every position, fed as ids, against transformers in float32.
    ids = [tok.eos_token_id] + tok("the quick brown fox jumps over the lazy dog", add_special_tokens=False)[
        "input_ids"]
    spec = {"gguf": str(gguf), "threads": 1, "n_ctx": 128, "n_batch": 32, "logits_for": ids,
            "eval_tokens": 40, "window": 16, "streams": [[0] + list(range(5, 60)) + [0]],
            "prompts": [ids[:8], ids[:5]], "decode_tokens": 4}
    p = subprocess.run([sys.executable, "-m", "pcmoe.bench.llamacpp", json.dumps(spec)], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor([ids])).logits[0]
        stream = torch.tensor(spec["streams"][0])
        nll = 0.0
        for start in range(0, 40, 16):  # the worker's windows: 16 + 16 + 8 predicted tokens
            n = min(16, 40 - start)
            logits = model(input_ids=stream[None, start:start + n]).logits[0]
            nll += torch.nn.functional.cross_entropy(logits, stream[start + 1:start + 1 + n], reduction="sum").item()
    got = torch.tensor(res["logits"])
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-3
    assert torch.equal(got.argmax(-1), ref.argmax(-1))

    # With a f32 KV cache (llama.cpp's default is f16) the match is much tighter.
    exact = Llama(model_path=str(gguf), n_ctx=128, n_batch=32, n_threads=1, logits_all=True, verbose=False,
                  type_k=0, type_v=0)
    exact.eval(ids)
    assert (torch.from_numpy(exact.scores[:len(ids)].copy()) - ref).abs().max().item() < 1e-4
    exact.close()

    assert res["kv_cache"] == "f16" and res["tokens"] == 40
    assert math.isclose(res["ppl"], math.exp(nll / 40), rel_tol=1e-3)
    for k in ("eval_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes", "load_s"):
        assert res[k] > 0, k
    assert len(res["decode_trials"]) == 3 and res["warmup"] == 1
    assert res["model_bytes"] == gguf.stat().st_size and res["use_mmap"] is False
    assert res["peak_rss_bytes"] > res["model_bytes"]
    assert "logits_for" not in res["spec"] and "streams" not in res["spec"]


def test_last_logits_without_logits_all_are_the_last_row(tiny_gguf):
    """Decode-only runs (the regime study) leave logits_all off; the row they read is the same."""
    import numpy as np
    from llama_cpp import Llama

    from pcmoe.bench.llamacpp import last_logits

    _, gguf, _ = tiny_gguf
    rows = {}
    for every in (True, False):
        llm = Llama(model_path=str(gguf), n_ctx=64, n_batch=16, n_threads=1, logits_all=every, verbose=False)
        llm.eval([3, 9, 14, 2, 7])
        first = last_logits(llm, every)
        llm.eval([11])
        rows[every] = (first, last_logits(llm, every))
        llm.close()
    for a, b in zip(rows[True], rows[False]):
        assert np.abs(a - b).max() < 1e-4


def test_tiny_q4_k_m_from_the_cached_f32(tiny_gguf, capsys):
    folder, f32, _ = tiny_gguf
    q4 = G.convert(folder, G.gguf_path(f32.parent, folder, "q4_K_M"), "q4_K_M", src="/nonexistent")
    assert q4.stat().st_size < f32.stat().st_size / 3  # quantised from the cached f32: no converter run
    spec = {"gguf": str(q4), "threads": 1, "n_ctx": 64, "n_batch": 16, "eval_tokens": 20,
            "streams": [list(range(1, 30))], "use_mmap": True}
    assert L.main([json.dumps(spec)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["tokens"] == 20 and math.isfinite(res["ppl"]) and res["model_bytes"] == q4.stat().st_size


def test_run_all_records_and_resumes(tiny_gguf, tmp_path, monkeypatch):
    from pcmoe.bench import cgroup

    folder, f32, _ = tiny_gguf
    # Every precision served by the f32 file: this checks the driver, not the converter (tested above).
    monkeypatch.setattr(L, "convert", lambda model, out, outtype, **kw: f32)
    data = tmp_path / "heldout.txt"
    data.write_text("\n\n=====\n".join(["the quick brown fox jumps over the lazy dog " * 12,
                                         "def main():\n    return 0\n" * 12, "hello world " * 30]))
    args = SimpleNamespace(model=str(folder), data=str(data), threads=1, eval_tokens=64, decode_tokens=4,
                           prompts=2, out=str(tmp_path / "out"), llamacpp_src=None, gguf_dir=str(tmp_path / "g"))
    sizes = {"nonexpert": 40_000, "all_experts": 300_000, "dtype": "bfloat16"}
    use_cgroup = cgroup.available()
    log = tmp_path / "runs.jsonl"
    recs = L.run_all(args, sizes, None, use_cgroup, log, {})
    by = {r["label"]: r for r in recs}
    resident, mmap = L.precisions("bfloat16")
    assert list(by) == [f"llama.cpp resident/{t}" for t in resident] + [f"llama.cpp mmap@50%/{t}" for t in mmap]
    for t in resident:
        r = by[f"llama.cpp resident/{t}"]
        assert r["returncode"] == 0, r.get("error")
        assert r["section"] == "peers" and r["tokens"] == 64 and r["model_bytes"] == f32.stat().st_size
        assert r["use_mmap"] is False and len(r["decode_trials"]) == 3 and r["key"].startswith("llamacpp-")
    for t in mmap:
        r = by[f"llama.cpp mmap@50%/{t}"]
        if not use_cgroup:
            assert r["returncode"] is None and "cgroup" in r["skipped"]
            continue
        assert r["returncode"] == 0, r.get("error")
        overhead = L.runtime_overhead(by[f"llama.cpp resident/{t}"])
        assert r["overhead_bytes"] == overhead > 0 and r["use_mmap"] is True
        assert r["cgroup_limit_bytes"] == L.mmap_limit(sizes, t, overhead + L.ALLOCATOR_SLACK)
        assert r["cgroup_max_usage_bytes"] <= r["cgroup_limit_bytes"] and r["oom_killed"] is False
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["label"] for x in lines] == [label for label, r in by.items() if not r.get("skipped")]
    done = {x["key"]: x for x in lines if x["returncode"] == 0}
    monkeypatch.setattr(runner, "measure", lambda *a, **k: pytest.fail("a finished run was measured again"))
    again = L.run_all(args, sizes, None, use_cgroup, log, done)
    assert [r["label"] for r in again] == list(by) and len(log.read_text().splitlines()) == len(lines)
