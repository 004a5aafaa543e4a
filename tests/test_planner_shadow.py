"""The planner's shadow genes (issue 13): a shadow form per layer for its non-members, priced by the
memory and latency models, learned by the quality model, searched, measured by calibrate and
carried by plan files to the loader. Pure numpy except the plan-file test."""

import dataclasses

import numpy as np
import pytest
from test_planner import PRECISIONS, make_profile

from pcmoe.planner.calibrate import derive, measurement_specs, shadow_sizes
from pcmoe.planner.moves import children, gene_ranges
from pcmoe.planner.predict import LatencyModel, MemoryModel
from pcmoe.planner.quality import SensitivityQuality, mlp_features
from pcmoe.planner.search import Problem, exhaustive, genetic
from pcmoe.planner.space import Batch, Config, PlanError, SearchSpace

FORMS = ("none", "int2", "int3")


def shadow_space(num_experts=(4, 4, 4), **kw):
    return SearchSpace(num_experts=num_experts, precisions=PRECISIONS, intervals=(8, 32), shadow_modes=FORMS, **kw)


def shadow_profile(num_experts=(4, 4, 4), runtime=(0, 0), seconds=(4e-5, 6e-5)):
    L = len(num_experts)
    return dataclasses.replace(make_profile(num_experts), staging_bytes={"bf16": 1000, "int8": 530, "int4": 290},
                               shadow_bytes={"int2": (140,) * L, "int3": (200,) * L},
                               shadow_runtime_bytes=dict(zip(FORMS[1:], runtime)),
                               shadow_s=dict(zip(FORMS[1:], seconds)))


def test_configs_carry_the_shadow_form():
    space = shadow_space()
    c = Config((2, 4, 1), ("int4",) * 3, 8, shadow="int2")
    assert Config.from_json(c.to_json(), space) == c
    assert space.decode(space.encode([c]), 0) == c
    # null is "none" where shadows are searched, and "none" is null where they are not
    assert Config.from_dict({**c.to_dict(), "shadow": None}, space).shadow == "none"
    plain = SearchSpace(num_experts=(4, 4, 4), precisions=PRECISIONS, intervals=(8, 32))
    assert Config.from_dict({**c.to_dict(), "shadow": "none"}, plain).shadow is None
    with pytest.raises(PlanError, match="shadow 'int5' is not one of none, int2, int3"):
        Config.from_dict({**c.to_dict(), "shadow": "int5"}, space)
    with pytest.raises(PlanError, match="no shadow experts"):
        Config.from_dict(c.to_dict(), plain)
    with pytest.raises(PlanError, match="start with 'none'"):
        SearchSpace(num_experts=(4,), shadow_modes=("int2",))
    assert space.size() == plain.size() * 3 ** 3          # a form per layer
    assert space.encode([c]).genomes().shape == (1, 3 * 3 + 2)
    # one form per layer: a tuple, a list in JSON; the same form everywhere is that form
    mixed = dataclasses.replace(c, shadow=("int2", "none", "int3"))
    assert mixed.to_dict()["shadow"] == ["int2", "none", "int3"]
    assert Config.from_json(mixed.to_json(), space) == mixed and space.decode(space.encode([mixed]), 0) == mixed
    assert Config.from_dict({**c.to_dict(), "shadow": ["int2"] * 3}, space) == c
    with pytest.raises(PlanError, match="2 shadow forms but the model has 3"):
        Config.from_dict({**c.to_dict(), "shadow": ["int2", "int3"]}, space)
    with pytest.raises(PlanError, match="shadow 'int5' is not one of"):
        Config.from_dict({**c.to_dict(), "shadow": ["int2", "int5", "none"]}, space)


def test_memory_and_latency_price_a_shadow_per_non_member():
    space, profile = shadow_space(), shadow_profile(runtime=(700, 900))
    mem, lat = MemoryModel(space, profile), LatencyModel(space, profile)
    base = Config((2, 4, 1), ("int4",) * 3, 8)
    batch = space.encode([base, dataclasses.replace(base, shadow="int2"), dataclasses.replace(base, shadow="int3")])
    # (4 - 2) + 0 + (4 - 1) non-members; the runtime offset while a layer swaps
    assert mem(batch)[1] - mem(batch)[0] == pytest.approx(5 * 140 + 700)
    assert mem(batch)[2] - mem(batch)[0] == pytest.approx(5 * 200 + 900)
    assert mem.breakdown(batch, 1)["shadows"] == 5 * 140
    assert sum(v for k, v in mem.breakdown(batch, 1).items() if k != "total") == mem(batch)[1]
    # seconds per layer at share 1, times each layer's shadowed share
    assert lat(batch)[1] - lat(batch)[0] == pytest.approx(4e-5 * (2 / 4 + 0 + 3 / 4))
    # every layer full: the loader makes no shadow, so nothing is priced
    full = space.encode([Config((4, 4, 4), ("bf16",) * 3, 8, shadow=s) for s in FORMS])
    assert np.ptp(mem(full)) == 0 and np.ptp(lat(full)) == 0
    # the least memory and latency never carry shadows
    assert (mem.least()[1].shadow == 0).all() and (lat.least()[1].shadow == 0).all()
    # a form per layer: each layer's own bytes and time; the runtime offset of the largest form held
    mixed = space.encode([dataclasses.replace(base, shadow=("int3", "int2", "int2"))])
    assert mem(mixed)[0] - mem(batch)[0] == pytest.approx(2 * 200 + 3 * 140 + 900)
    assert lat(mixed)[0] - lat(batch)[0] == pytest.approx(6e-5 * 2 / 4 + 4e-5 * 3 / 4)
    # a form on a full layer (no non-member) costs nothing, its runtime offset neither
    idle = space.encode([dataclasses.replace(base, shadow=("int2", "int3", "int2"))])
    assert mem(idle)[0] == mem(batch)[1] and lat(idle)[0] == lat(batch)[1]


def test_a_space_without_shadows_searches_as_before():
    plain = SearchSpace(num_experts=(4, 4, 4), precisions=PRECISIONS, intervals=(8, 32))
    pop = plain.random(np.random.default_rng(0), 16)
    a, la = children(plain, pop, 32, np.random.default_rng(1))
    assert (a.shadow == 0).all()
    lows, highs = gene_ranges(plain)
    assert (highs[6:9] == 0).all() and (lows[6:9] == 0).all()   # the shadow genes have no choice: never mutated
    b, _ = children(shadow_space(), pop, 32, np.random.default_rng(1))
    assert b.shadow.max() <= 2


def shadow_truth(space, keep):
    """A loss whose missing-expert part shrinks to `keep[form]` with shadows."""
    N = np.array(space.num_experts)
    w = np.array([0.4, 0.2, 0.3])

    def loss(b: Batch):
        miss = 1 - b.sizes / N
        members = np.where(b.shadow > 0, b.sizes / N, 1.0)   # int4 members compute their share
        return 2.0 + (keep[b.shadow] * w * miss).sum(1) + 0.02 * ((b.prec == 2) * members).sum(1)
    return loss


def test_sensitivity_model_learns_what_shadows_leave():
    space = shadow_space()
    keep = np.array([1.0, 0.35, 0.15])
    truth = shadow_truth(space, keep)
    b = space.random(np.random.default_rng(3), 400)
    model = SensitivityQuality(space, full_loss=2.0).fit(b, truth(b))
    # k and a (a form's own error per share shadowed) trade off where the curves are linear, as here:
    # what must hold is the prediction, and that shadows leave a small part of the missing loss
    assert model.keep[0] == 1 and (model.keep[1:] < 0.5).all()
    held = space.random(np.random.default_rng(4), 100)
    assert np.abs(model(held) - truth(held)).max() < 0.02
    one = space.encode([Config((1, 1, 1), ("int8",) * 3, 8, shadow=f) for f in FORMS])
    assert model(one) == pytest.approx(truth(one), abs=0.02)
    # a form no sample used keeps k = 1: predicted to buy nothing
    none_or_int2 = b.take(np.flatnonzero((b.shadow < 2).all(axis=1)))
    assert SensitivityQuality(space, full_loss=2.0).fit(none_or_int2, truth(none_or_int2)).keep[2] == 1.0
    # the MLP sees each layer's form and its share
    plain = SearchSpace((4, 4, 4), PRECISIONS, (8, 32))
    assert mlp_features(space, b).shape[1] == mlp_features(plain, b).shape[1] + 2 * 2 * 3


def test_search_picks_shadows_where_they_pay_and_agrees_with_exhaustive():
    space, profile = shadow_space(), shadow_profile()
    truth = shadow_truth(space, np.array([1.0, 0.3, 0.2]))
    problem = Problem(space, MemoryModel(space, profile), truth, LatencyModel(space, profile))
    low = problem.memory.least()[0]
    int4 = float(problem.memory(space.encode([Config((4, 4, 4), ("int4",) * 3, 8)]))[0])
    chose = set()
    for f in (0.2, 0.5, 0.8, 1.2):   # between the least memory and int4 all resident, and above
        limit = low + f * (int4 - low)
        want = exhaustive(problem, limit)
        got = genetic(problem, limit, seed=0)
        assert got.quality == pytest.approx(want.quality, abs=1e-6) and got.memory <= limit
        chose.add(got.config.shadow)
        if f > 1:
            assert got.config.shadow == "none"   # every expert resident: nothing to shadow
    assert chose - {"none"}       # below int4 all resident, shadows that leave a third of the loss pay
    # shadows that change nothing are never chosen (they cost bytes)
    N = np.array(space.num_experts)

    def unchanged(b: Batch):
        return 2.0 + (np.array([0.4, 0.2, 0.3]) * (1 - b.sizes / N)).sum(1) + 0.02 * (b.prec == 2).sum(1)
    useless = Problem(space, problem.memory, unchanged, problem.latency)
    assert all(genetic(useless, low + f * (int4 - low), seed=0).config.shadow == "none" for f in (0.2, 0.5, 0.8))


def test_search_chooses_a_form_per_layer():
    """Shadows pay in one layer only (the others lose little without their experts but shadows cost
    bytes there): the search shadows that layer alone, as the exhaustive search does."""
    space, profile = shadow_space(), shadow_profile()
    N = np.array(space.num_experts)
    w, keep = np.array([0.9, 0.02, 0.02]), np.array([1.0, 0.2, 0.1])

    def truth(b: Batch):
        return 2.0 + (keep[b.shadow] * w * (1 - b.sizes / N)).sum(1) + 0.01 * (b.prec == 2).sum(1)
    problem = Problem(space, MemoryModel(space, profile), truth, LatencyModel(space, profile))
    low = problem.memory.least()[0]
    int4 = float(problem.memory(space.encode([Config((4, 4, 4), ("int4",) * 3, 8)]))[0])
    limit = low + 0.3 * (int4 - low)
    want, got = exhaustive(problem, limit), genetic(problem, limit, seed=0)
    assert got.quality == pytest.approx(want.quality, abs=1e-6) and got.memory <= limit
    forms = got.config.layer_shadows(3)
    assert forms[0] != "none" and isinstance(got.config.shadow, tuple), got.config


FACTS = {"model_type": "qwen3_moe", "num_experts": [4, 4], "vision": False,
         "expert_bytes": {"full": [1000, 1000], "int8": [530, 530], "int4": [290, 290]},
         "nonexpert_bytes": {"full": 5000}, "nonexpert_precisions": [],
         "shadow_modes": ["none", "int2"], "shadow_bytes": {"int2": [140, 140]},
         "n_buffers": 2, "staging_bytes": {"full": 1000, "int8": 530, "int4": 290}, "quant_staging": 0,
         "dtype": "bfloat16", "update_unit": "tokens", "default_interval": 16,
         "kv_bytes_per_token_cache": 10, "context_tokens": 100}


def test_calibrate_measures_and_samples_shadows():
    specs = measurement_specs("m", FACTS, {"kind": "text"}, samples=8, seed=0, threads=1)
    keys = [s["key"] for s in specs]
    assert [k for k in keys if k.startswith("shadow:")] == [f"shadow:int2:{n}" for n in shadow_sizes(4)] == \
        ["shadow:int2:1", "shadow:int2:2"]
    sampled = [s for s in specs if s["key"].startswith("shadow-sample:")]
    assert len(sampled) == 4 and all(s["plan"]["shadow"] == "int2" and s["config"]["shadow"] == "int2" for s in sampled)
    assert all(max(s["config"]["committee_sizes"]) < 4 for s in sampled)   # shadows exist below full layers
    # the other samples are those of a calibration without shadows (own random streams)
    plain = measurement_specs("m", {**FACTS, "shadow_modes": [], "shadow_bytes": {}}, {"kind": "text"}, 8, 0, 1)
    same = {s["key"]: s["config"]["committee_sizes"] for s in plain if s["key"].startswith(("sample:", "near:"))}
    assert all(s["config"]["committee_sizes"] == same[s["key"]] for s in specs if s["key"] in same)


def _run(config, latency, peak, loss=2.5):
    return {"returncode": 0, "config": config, "loss": loss, "latency_s": latency, "peak_rss_bytes": peak,
            "layer_s": [latency / 4] * 2, "step_s": 0.0}


def test_derive_prices_shadows_from_their_twins():
    specs = measurement_specs("m", FACTS, {"kind": "text"}, samples=8, seed=0, threads=1)
    done = {}
    for s in specs:
        c = s.get("config")
        if c is None:
            continue
        n_missing = sum(4 - n for n in c["committee_sizes"])
        shadowed = c.get("shadow") == "int2"
        latency = 1e-3 + 1e-5 * sum(c["committee_sizes"]) + shadowed * 3e-5 * n_missing / 4
        weights = sum(n * 1000 for n in c["committee_sizes"]) + 5000
        peak = 200_000 + weights + shadowed * (140 * n_missing + 2000)
        done[s["key"]] = _run(c, latency, peak)
    profile = derive(FACTS, done, fit=False)
    assert profile["shadow_modes"] == ["none", "int2"]
    assert profile["latency"]["shadow_s"]["int2"] == pytest.approx(3e-5)
    # the twins' weights differ in precision (int4 runs are priced at int4): compare overheads only
    assert profile["shadow_runtime_bytes"]["int2"] == pytest.approx(2000, abs=1)
    # without the shadow runs there is no gene (and the shadow samples are left out)
    partial = {k: v for k, v in done.items() if not k.startswith("shadow:")}
    p2 = derive(FACTS, partial, fit=False)
    assert p2["shadow_modes"] == [] and all(q["config"].get("shadow") in (None, "none") for q in p2["quality_samples"])


def test_plan_files_carry_the_shadow_form(tmp_path):
    from pcmoe.formats import FormatError, check_shadow

    assert check_shadow({"shadow": "int3"}) == "int3"
    assert check_shadow({"shadow": "none"}) is None and check_shadow({}) is None
    with pytest.raises(FormatError, match="plan shadow 'int9' is not one of none, int1, int2, int3, vq6"):
        check_shadow({"shadow": "int9"})
    # one form per layer; the same form everywhere is kept per layer, "none" everywhere is no shadows
    assert check_shadow({"shadow": ["vq7", "none", "int2"]}) == ("vq7", None, "int2")
    assert check_shadow({"shadow": ["none", "none"]}) is None
    assert check_shadow({"shadow": ("vq7", None, "int2")}) == ("vq7", None, "int2")   # parsed twice: the same
    for bad in (["int2", 3], [], {"a": 1}, 5):
        with pytest.raises(FormatError, match="plan shadow"):
            check_shadow({"shadow": bad})

    # a plan's shadow form reaches the loader: every non-member of a planned layer gets a shadow,
    # and the planner's price of those shadows is the loader's
    import pcmoe
    from pcmoe.shadow import shadow_nbytes
    from pcmoe.testing import make_checkpoint

    folder = tmp_path / "qwen3"
    make_checkpoint("qwen3_moe", folder)
    full = pcmoe.load(folder, policy="full", progress=False)
    N = full.committees[0].num_experts
    sizes = [1] + [N] * (len(full.committees) - 1)
    plan = {"format": "pcmoe-plan/1", "model_type": "qwen3_moe", "num_experts": [N] * len(sizes),
            "committee_sizes": sizes, "precisions": ["full"] * len(sizes), "shadow": "int2"}
    engine = pcmoe.load(folder, plan=plan, policy="committee", progress=False)
    layers = engine.stats()["per_layer"]
    assert [layer["shadow_experts"] for layer in layers] == [N - 1] + [0] * (len(sizes) - 1)
    one = shadow_nbytes(full.family.kernel(), engine.layers[0].block.experts.dtype, "int2")
    assert engine.stats()["shadow_bytes"] == (N - 1) * one
    explicit = pcmoe.load(folder, plan=plan, policy="committee", progress=False, shadow="int3")
    assert explicit.stats()["per_layer"][0]["shadow_experts"] == N - 1    # an explicit --shadow wins
    assert explicit.stats()["shadow_bytes"] > engine.stats()["shadow_bytes"]
    # a form per layer, "none" in some: each layer's own shadows (the planner writes such lists)
    sizes2 = [1] * len(sizes)
    forms = (["vq7", "none"] * len(sizes))[:len(sizes)]
    mixed = pcmoe.load(folder, plan={**plan, "committee_sizes": sizes2, "shadow": forms}, policy="committee",
                       progress=False)
    assert mixed.options.shadow == tuple(None if f == "none" else f for f in forms)
    assert [layer["shadow_experts"] for layer in mixed.stats()["per_layer"]] == \
        [N - 1 if f != "none" else 0 for f in forms]
