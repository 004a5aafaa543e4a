"""Live budget changes for an engine loaded with shadow experts: committees and shadow counts
follow the new budget (pcmoe.budget.shadow_sizing), as a load at that budget would size them."""

from __future__ import annotations

import pytest
import torch

import pcmoe
from pcmoe.options import PcmoeError
from pcmoe.testing import generate_with_budget_changes


def _load(folder, **options):
    options.setdefault("update_every", 4)
    options.setdefault("margin", 0.0)
    options.setdefault("shadow", "int2")
    return pcmoe.load(folder, policy="committee", progress=False, synchronous=True, kernel="eager", **options)


def _generate(engine, changes: dict):
    return generate_with_budget_changes(engine, changes, tokens=30)


def _shadow_counts(stats) -> list[int]:
    return [row["shadow_experts"] for row in stats["per_layer"]]


def _check_banks(engine):
    """Every shadow row is ready and belongs to a non-member or an expert the scheduler is promoting."""
    for layer in engine.layers:
        bank = layer.controller.chooser.shadows
        if bank is not None:
            assert all(bank.has(e) and bank.row_of[e] == r for r, e in enumerate(bank.experts))


def test_shrink_and_grow_with_shadows_mid_generation(tiny_lm):
    with _load(tiny_lm, budget="70%experts") as engine:
        vocab = engine.config.vocab_size
        before = engine.stats()
        again = engine.plan_budget("70%experts")  # the load's arithmetic: the same budget, the same sizing
        assert (again.committee_sizes, again.shadow_counts, again.weight_bytes) == \
            (engine.sizing.committee_sizes, engine.sizing.shadow_counts, engine.sizing.weight_bytes)
        small, grown = engine.plan_budget("40%experts"), engine.plan_budget("90%experts")
        assert small.shadow_counts and sum(small.committee_sizes) < sum(engine.committee_sizes)
        tokens, seen = _generate(engine, {5: "40%experts", 15: "90%experts"})
        assert len(tokens) == 30 and all(0 <= t < vocab for t in tokens)
        shrunk = seen[6]
        assert shrunk["committee_sizes"] == small.committee_sizes
        assert shrunk["resident_bytes"] <= small.budget < before["resident_bytes"]
        assert shrunk["shadow_bytes"] == small.shadow_bytes
        assert _shadow_counts(shrunk) == list(small.shadow_counts)
        # members cost experts and free shadows: more members, fewer shadows
        assert all(n <= m for n, m in zip(small.committee_sizes, grown.committee_sizes))
        assert all(s >= g for s, g in zip(small.shadow_counts, grown.shadow_counts))
        after = seen[16]
        assert after["resident_bytes"] <= grown.budget and _shadow_counts(after) == list(grown.shadow_counts)
        assert after["budget_changes"] == 2
        members = [len(layer["members"]) for layer in seen[16 + 8]["per_layer"]]
        assert members == grown.committee_sizes
        _check_banks(engine)


def test_too_small_a_budget_changes_nothing(tiny_lm):
    with _load(tiny_lm, budget="50%experts") as engine:
        sizes, counts, sizing = engine.committee_sizes, _shadow_counts(engine.stats()), engine.sizing
        with pytest.raises(PcmoeError, match="budget unchanged"):
            engine.set_budget(engine.model_bytes.nonexpert + 1)
        assert engine.committee_sizes == sizes and engine.sizing is sizing
        assert _shadow_counts(engine.stats()) == counts


def test_fewer_shadows_go_to_the_least_important(tiny_lm):
    with _load(tiny_lm, budget="70%experts", shadow_experts=2) as engine:
        engine.set_budget("40%experts")
        for i, layer in enumerate(engine.layers):
            bank, committee = layer.controller.chooser.shadows, layer.committee
            outside = [e for e in engine._importance_order(i) if not committee.is_member(e)]
            assert bank is not None and sorted(bank.experts) == sorted(outside[:2])


def test_growing_to_every_expert_decodes_as_the_full_engine(tiny_lm):
    prompt = [5, 6, 7, 8]
    with pcmoe.load(tiny_lm, policy="full", progress=False, kernel="eager") as full:
        with torch.inference_mode():
            want, state = full.prefill(prompt)
            want = [want] + [full.decode_step(state, t) for t in (9, 10, 11)]
    with _load(tiny_lm, budget="40%experts", update_every=1) as engine:
        engine.set_budget("100%")
        with torch.inference_mode():
            state = engine.new_state()
            for t in prompt * 3:  # the scheduler fills the new slots, amortised
                engine.forward(torch.tensor([[t]]), state)
        assert engine.stats()["shadow_bytes"] == 0
        assert all(len(c.members()) == c.num_experts for c in engine.committees)
        with torch.inference_mode():
            got, state = engine.prefill(prompt)
            got = [got] + [engine.decode_step(state, t) for t in (9, 10, 11)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_the_admin_call_changes_a_shadow_engines_budget(tiny_lm):
    """POST /admin/budget on a server over a --shadow engine: sizes and shadow counts in the reply and stats."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from pcmoe.server import create_app

    with _load(tiny_lm, budget="70%experts") as engine:
        before = _shadow_counts(engine.stats())
        app = create_app(engine, model_name="tiny", admin_token="secret")
        with TestClient(app) as client:
            ok = {"Authorization": "Bearer secret"}
            r = client.post("/admin/budget", json={"budget": "40%experts"}, headers=ok)
            body = r.json()
            assert r.status_code == 200 and body["applied"] and body["resident_bytes"] <= body["budget_bytes"]
            assert engine.committee_sizes == body["committee_sizes"]
            assert _shadow_counts(engine.stats()) != before
            r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 5})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
            assert client.post("/admin/budget", json={"budget": "1kB"}, headers=ok).status_code == 400
            assert engine.committee_sizes == body["committee_sizes"]


def test_live_budget_keeps_each_layers_shadow_form(tiny_lm):
    """A form per layer ("none" in some): a budget change resizes each layer's bank in its own form,
    and a layer without a form gets no shadows at any budget."""
    probe = pcmoe.load(tiny_lm, policy="full", progress=False)
    L = len(probe.layers)
    forms = (["vq7", "none", "int2"] * L)[:L]
    with _load(tiny_lm, budget="70%experts", shadow=",".join(forms)) as engine:
        small = engine.plan_budget("40%experts")
        assert [c for c, f in zip(small.shadow_counts, forms) if f == "none"] == [0] * forms.count("none")
        tokens, seen = _generate(engine, {5: "40%experts", 15: "90%experts"})
        assert len(tokens) == 30
        assert _shadow_counts(seen[6]) == list(small.shadow_counts) and small.shadow_counts[0] > 0   # vq7 layer
        for layer, form in zip(engine.layers, forms):
            bank = layer.controller.chooser.shadows if layer.controller.chooser else None
            assert (bank.mode if bank is not None else "none") in (form, "none")
            if form == "none":
                assert bank is None
        _check_banks(engine)
