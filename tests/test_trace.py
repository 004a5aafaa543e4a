"""Routing traces: record, the seeded mapping, forced replay through a real engine, locality figures."""

from __future__ import annotations

import numpy as np
import pytest

import pcmoe
from pcmoe import trace as tr
from pcmoe.options import PcmoeError


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    from pcmoe.testing import make_checkpoint

    folder = tmp_path_factory.mktemp("src")
    make_checkpoint("qwen3_moe", folder, num_experts=8, num_experts_per_tok=2)
    with pcmoe.load(folder, policy="full", progress=False) as engine:
        streams = [list(range(3, 50)), list(range(10, 50))]
        trace = tr.record(engine, streams, window=16)
    path = tmp_path_factory.mktemp("trace") / "t.npz"
    tr.save(trace, path)
    return trace, path


def test_record_keeps_every_fed_token_and_the_models_own_choices(recorded):
    trace, path = recorded
    assert trace.idx.shape == (trace.layers, 46 + 39, 2) and trace.num_experts == 8
    assert (trace.idx >= 0).all() and np.allclose(trace.weights.sum(-1), 1.0, atol=1e-5)  # norm_topk_prob
    again = tr.load_trace(path)
    assert (again.idx == trace.idx).all() and (again.tokens == trace.tokens).all()


def test_a_bad_trace_file_is_one_line(tmp_path):
    bad = tmp_path / "x.npz"
    bad.write_text("nope")
    for path in (bad, tmp_path / "missing.npz"):
        with pytest.raises(PcmoeError) as e:
            tr.load_trace(path)
        assert "\n" not in str(e.value)


def test_mapping_splits_each_expert_over_its_own_group(recorded):
    trace, _ = recorded
    mapped = tr.map_trace(trace, layers=5, num_experts=32, top_k=4, seed=3)
    assert mapped.idx.shape == (5, trace.idx.shape[1], 4)
    assert tr.map_trace(trace, 5, 32, 4, seed=3).idx.tolist() == mapped.idx.tolist()  # fixed by the seed
    for j in range(5):
        rows = np.sort(mapped.idx[j], axis=1)
        assert (np.diff(rows, axis=1) > 0).all()                          # k' distinct experts per token
        assert np.allclose(mapped.weights[j].sum(1), trace.weights[j % trace.layers].sum(1), atol=1e-5)
        groups = {}
        for c in range(4):  # target choice c carries source choice c % 2
            for src, dst in zip(trace.idx[j % trace.layers][:, c % 2], mapped.idx[j][:, c]):
                groups.setdefault(int(src), set()).add(int(dst))
        assert sum(map(len, groups.values())) == len(set().union(*groups.values()))  # disjoint groups
        assert max(map(len, groups.values())) <= 4                                   # of 32 / 8 experts
    with pytest.raises(PcmoeError, match="at least as many experts"):
        tr.map_trace(trace, 2, 4, 2)
    with pytest.raises(PcmoeError, match="fan out"):
        tr.map_trace(trace, 2, 8, 4)


def test_replay_forces_the_mapped_choices_and_says_so(recorded, tmp_path):
    from pcmoe.testing import make_checkpoint

    trace, path = recorded
    target = tmp_path / "big"
    make_checkpoint("qwen3_moe", target, num_experts=16, num_experts_per_tok=2, num_hidden_layers=3)
    tokens = [list(range(3, 50)), list(range(10, 50))]
    with pcmoe.load(target, policy="full", progress=False, routing_trace=str(path), routing_trace_seed=1) as engine:
        assert engine.load_info["routing"].startswith(tr.REPLAYED)
        assert engine.stats()["routing"] == engine.load_info["routing"]
        got = tr.record(engine, tokens, window=16)
        mapped = tr.map_trace(trace, 3, 16, 2, seed=1)
        assert (np.sort(got.idx, 2) == np.sort(mapped.idx, 2)).all()
        assert np.allclose(np.sort(got.weights, 2), np.sort(mapped.weights, 2), atol=1e-4)
    # under a committee the forced routing still goes through masked gating and the scheduler
    with pcmoe.load(target, budget="50%experts", policy="committee", progress=False, synchronous=True,
                    routing_trace=str(path)) as engine:
        steps = list(engine.generate([5, 6, 7], max_new_tokens=12, temperature=0, stop_on_eos=False))
        assert len(steps) == 12 and engine.stats()["choices"] > 0


def test_locality_figures_on_known_streams():
    steady = np.zeros((1, 64, 2), dtype=np.int16)
    steady[0, :, 1] = 1                                                   # always experts 0 and 1
    loc = tr.locality(steady, 8, window=16)
    assert loc["consecutive_overlap"] == 1.0 and loc["window_entropy_bits"] == pytest.approx(1.0)
    assert loc["lru_hit_rate"]["0.25"] == pytest.approx(1 - 2 / 128)
    rotating = np.array([[[t % 8, (t + 4) % 8] for t in range(64)]], dtype=np.int16)
    loc = tr.locality(rotating, 8, window=16)
    assert loc["consecutive_overlap"] == 0.0 and loc["lru_hit_rate"]["0.5"] < 0.5
    assert loc["window_entropy_share"] == pytest.approx(1.0)


def test_the_trace_command_writes_a_trace(tiny_lm, tmp_path):
    from pcmoe.cli import main

    data = tmp_path / "text.txt"
    data.write_text("def f(x):\n    return x + 1\n\n=====\nprint(f(2)) and some more words here\n")
    out = tmp_path / "t.npz"
    assert main(["trace", "--model", str(tiny_lm), "--data", str(data), "-o", str(out)]) == 0
    trace = tr.load_trace(out)
    assert trace.idx.shape[1] == len(trace.tokens) > 5
    assert main(["trace", "--model", str(tiny_lm), "--data", str(tmp_path / "none.txt"), "-o", str(out)]) == 2
