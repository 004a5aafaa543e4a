"""The offline planner's pure core: configurations, predictors, quality models and the search."""

import json

import numpy as np
import pytest

from pcmoe.budget import format_bytes
from pcmoe.planner.predict import DeviceProfile, LatencyModel, LatencyPoint, MemoryModel, fit_line
from pcmoe.planner.quality import (
    MLPQuality,
    Sample,
    SensitivityQuality,
    errors,
    fit_quality,
    samples_from_dicts,
    split,
)
from pcmoe.planner.search import InfeasibleError, Problem, exhaustive, genetic, memory_points, pareto
from pcmoe.planner.space import Config, PlanError, SearchSpace

PRECISIONS = ("bf16", "int8", "int4")


def make_profile(num_experts, n_buffers=2, spare_slots=0, quant_staging=0, update_s=None):
    """Bytes shaped like the shipped LM's (int8 ~0.53x, int4 ~0.29x of bf16), latencies in ~ms."""
    L = len(num_experts)
    points = []
    for p, (a, b) in {"bf16": (1.0e-4, 6e-6), "int8": (1.2e-4, 5e-6), "int4": (1.3e-4, 7e-6)}.items():
        points += [LatencyPoint(size=n, precision=p, seconds=a + b * n) for n in (1, 8)]
    return DeviceProfile(num_experts=tuple(num_experts),
                         expert_bytes={"bf16": (1000,) * L, "int8": (530,) * L, "int4": (290,) * L},
                         nonexpert_bytes={"bf16": 5000, "int8": 3000}, n_buffers=n_buffers, spare_slots=spare_slots,
                         quant_staging=quant_staging, runtime_bytes=10_000, kv_bytes_per_token=10, context_tokens=100,
                         nonexpert_s={"bf16": 1e-3, "int8": 9e-4}, layer_points=tuple(points),
                         update_s={8: 2e-5, 32: 5e-6} if update_s is None else update_s)


def synthetic_problem(num_experts, seed=1, nonexpert=True, **profile_kw):
    """A known loss: convex in missing experts per layer, precision penalties, an interaction
    between the first two layers (so it is not additive), and small F / non-expert terms."""
    space = SearchSpace(num_experts=tuple(num_experts), precisions=PRECISIONS, intervals=(8, 32),
                        nonexpert_precisions=("bf16", "int8") if nonexpert else ())
    profile = make_profile(num_experts, **profile_kw)
    L, rng = len(num_experts), np.random.default_rng(seed)
    w = rng.uniform(0.05, 0.5, L)
    pen = np.stack([np.zeros(L), rng.uniform(0, 0.01, L), rng.uniform(0.01, 0.05, L)], axis=1)   # [L, P]

    def loss(b):
        miss = 1 - b.sizes / np.array(num_experts)
        return (2.5 + (w * miss ** 2).sum(1) + pen[np.arange(L), b.prec].sum(1) + 0.3 * miss[:, 0] * miss[:, 1]
                + 0.01 * b.interval + 0.02 * b.nonexpert)

    return Problem(space, MemoryModel(space, profile), loss, LatencyModel(space, profile))


# -- configurations ---------------------------------------------------------------------------------


def test_config_json_round_trips():
    space = SearchSpace(num_experts=(4, 6), precisions=PRECISIONS, intervals=(8, 32), nonexpert_precisions=("bf16",))
    c = Config(sizes=(2, 6), precisions=("int4", "bf16"), interval=32, nonexpert_precision="bf16")
    assert Config.from_json(c.to_json(), space) == c
    assert json.loads(c.to_json())["committee_sizes"] == [2, 6]
    plain = SearchSpace(num_experts=(4, 6))
    c2 = Config(sizes=(4, 1), precisions=("bf16", "int8"), interval=16)
    assert Config.from_dict(json.loads(c2.to_json()), plain) == c2
    batch = space.encode([c])
    assert space.decode(batch, 0) == c


def test_profile_json_round_trips():
    p = make_profile((4, 6), quant_staging=1)
    assert DeviceProfile.from_json(json.dumps(p.to_dict())) == p


def cfg(sizes, precisions=("bf16", "bf16"), every=16, **extra):
    return {"committee_sizes": sizes, "expert_precisions": list(precisions), "update_every": every, **extra}


@pytest.mark.parametrize("data, words", [
    (cfg([2], ["bf16"]), "1 committee sizes but the model has 2"),
    (cfg([2, 2], ["bf16"]), "1 expert precisions"),
    (cfg([0, 2]), "layer 0 must be an integer in 1..4"),
    (cfg([2, 7]), "layer 1 must be an integer in 1..6"),
    (cfg([2.5, 2]), "2.5 for MoE layer 0"),
    (cfg([True, 2]), "True for MoE layer 0"),
    (cfg([2, 2], ["bf16", "fp8"]), "'fp8' for MoE layer 1"),
    (cfg([2, 2], every=5), "interval 5 is not one of 16"),
    (cfg([2, 2], nonexpert_precision="int8"), "keeps non-expert weights"),
    ({"committee_sizes": [2, 2], "update_every": 16}, "lacks expert_precisions"),
    (cfg("2,2"), "must be lists"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_configs_are_one_line_errors(data, words):
    space = SearchSpace(num_experts=(4, 6), intervals=(16,))
    with pytest.raises(PlanError) as e:
        Config.from_dict(data, space)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_bad_json_and_bad_samples_are_one_line_errors():
    space = SearchSpace(num_experts=(4,), intervals=(16,))
    with pytest.raises(PlanError, match="not valid JSON"):
        Config.from_json("{", space)
    good = {"committee_sizes": [2], "expert_precisions": ["int8"], "update_every": 16}
    assert samples_from_dicts([{"config": good, "loss": 2.5}], space)[0].loss == 2.5
    with pytest.raises(PlanError, match=r"^quality sample 1: committee size 9 for MoE layer 0"):
        samples_from_dicts([{"config": good, "loss": 2.5},
                            {"config": {**good, "committee_sizes": [9]}, "loss": 2.0}], space)
    with pytest.raises(PlanError, match="quality sample 0 has a non-numeric loss"):
        samples_from_dicts([{"config": good, "loss": "x"}], space)


def test_profile_that_cannot_price_the_space_is_a_one_line_error():
    space = SearchSpace(num_experts=(4, 4), precisions=("bf16", "int2"))
    with pytest.raises(PlanError, match="needs bytes of one int2 expert for each of the 2 MoE layers"):
        MemoryModel(space, make_profile((4, 4)))
    with pytest.raises(PlanError, match=r"profile is for experts per layer \[4, 4\]"):
        MemoryModel(SearchSpace(num_experts=(4, 4, 4)), make_profile((4, 4)))
    with pytest.raises(PlanError, match="not a pcmoe device profile"):
        DeviceProfile.from_dict({"format": "pcmoe-plan/1"})


# -- memory and latency predictors -----------------------------------------------------------------


def test_memory_follows_the_runtime_accounting():
    space = SearchSpace(num_experts=(4, 6), precisions=PRECISIONS, intervals=(16,))
    fixed = 10_000 + 10 * 100                                          # runtime + KV bytes per token x context
    model = MemoryModel(space, make_profile((4, 6), n_buffers=2))

    def mem(sizes, precisions, m=model, s=space):
        return m(s.encode([Config(sizes, precisions, 16)]))[0]

    # A layer holding all its experts needs no staging; one that swaps brings the shared buffers.
    assert mem((4, 6), ("bf16", "bf16")) == 5000 + 10 * 1000 + fixed
    assert mem((2, 6), ("bf16", "bf16")) == 5000 + 8 * 1000 + 2 * 1000 + fixed
    assert mem((2, 3), ("int4", "int8")) == 5000 + 2 * 290 + 3 * 530 + 2 * 1000 + fixed
    # Spare slots replace the shared buffers; quantised layers keep a full-precision staging buffer.
    spare = MemoryModel(space, make_profile((4, 6), spare_slots=1, quant_staging=1))
    assert mem((2, 6), ("bf16", "int4"), spare) == 5000 + 3 * 1000 + (6 * 290 + 1000) + fixed
    assert mem((4, 6), ("bf16", "bf16"), spare) == 5000 + 10 * 1000 + fixed
    parts = model.breakdown(space.encode([Config((2, 6), ("bf16", "bf16"), 16)]))
    assert parts == {"nonexpert": 5000, "experts": 8000, "staging": 2000, "runtime": 10_000, "kv_cache": 1000,
                     "total": 26_000}


def test_latency_fit_is_a_nondecreasing_line():
    assert fit_line(np.array([1, 3, 5]), np.array([1.0, 2.0, 3.0])) == pytest.approx((0.5, 0.5))
    assert fit_line(np.array([1, 8]), np.array([2.0, 1.0])) == (1.5, 0.0)       # clamped: mean, flat
    assert fit_line(np.array([4, 4]), np.array([1.0, 3.0])) == (2.0, 0.0)       # one size: its mean
    space = SearchSpace(num_experts=(8, 8), precisions=("bf16",), intervals=(8,))
    points = (LatencyPoint(1, "bf16", 1.0), LatencyPoint(8, "bf16", 8.0), LatencyPoint(2, "bf16", 5.0, layer=1))
    profile = DeviceProfile(num_experts=(8, 8), expert_bytes={"bf16": (1, 1)}, nonexpert_bytes={"bf16": 1},
                            nonexpert_s={"bf16": 0.5}, layer_points=points, update_s={8: 0.25})
    model = LatencyModel(space, profile)
    # layer 0 uses the shared line t = n; layer 1 its own single point (flat 5); 2 swapping layers x 0.25
    assert model(space.encode([Config((3, 4), ("bf16", "bf16"), 8)]))[0] == pytest.approx(0.5 + 3 + 5 + 0.5)
    assert model(space.encode([Config((8, 8), ("bf16", "bf16"), 8)]))[0] == pytest.approx(0.5 + 8 + 5)
    with pytest.raises(PlanError, match="no decode-time points for int8 experts"):
        LatencyModel(SearchSpace(num_experts=(8, 8), precisions=("bf16", "int8")),
                     DeviceProfile(num_experts=(8, 8), expert_bytes={"bf16": (1, 1), "int8": (1, 1)},
                                   nonexpert_bytes={"bf16": 1}, nonexpert_s={"bf16": 0.5}, layer_points=points))


@pytest.mark.parametrize("num_experts, n_buffers", [((4, 5, 3), 2), ((2, 2), 3)])
def test_least_memory_and_latency_are_exact(num_experts, n_buffers):
    # ((2, 2), 3): three staging buffers cost more than holding every expert, so the minimum is "all full".
    problem = synthetic_problem(num_experts, n_buffers=n_buffers)
    for objective, model in (("memory", problem.memory), ("latency", problem.latency)):
        least, config = model.least()
        assert least == pytest.approx(getattr(exhaustive(problem, None, objective=objective), objective))
        assert model(config)[0] == least
    if num_experts == (2, 2):
        assert problem.space.decode(problem.memory.least()[1], 0).sizes == (2, 2)


# -- search -----------------------------------------------------------------------------------------


def test_genetic_finds_the_exhaustive_optimum():
    problem = synthetic_problem((3, 4, 5, 4, 3), seed=2, nonexpert=False)     # 349,920 configurations
    low_m, low_l = problem.memory.least()[0], problem.latency.least()[0]
    for k_mem, k_lat in ((1.1, None), (1.3, None), (1.6, None), (2.2, None), (1.4, 1.2), (3.0, 1.1), (2.0, 1.05)):
        m, lat = low_m * k_mem, (low_l * k_lat if k_lat else None)
        want = exhaustive(problem, m, lat)
        for seed, polish in ((0, False), (1, False), (0, True)):     # the GA alone, and with the final descent
            got = genetic(problem, m, lat, seed=seed, polish=polish)
            assert got.quality == pytest.approx(want.quality, abs=1e-4), (k_mem, k_lat, seed, polish)
            assert got.memory <= m and (lat is None or got.latency <= lat)
    # The generations do the work: the seeded start alone misses the tightest optimum.
    start_only = genetic(problem, low_m * 1.1, seed=0, generations=0, polish=False)
    assert start_only.quality > exhaustive(problem, low_m * 1.1).quality + 0.01


def test_plans_never_violate_their_constraints():
    problem = synthetic_problem((8,) * 12, seed=3)
    low_m, low_l = problem.memory.least()[0], problem.latency.least()[0]
    rng = np.random.default_rng(0)
    for seed in range(12):
        m, lat = low_m * rng.uniform(1.0, 3.0), (low_l * rng.uniform(1.0, 1.6) if seed % 2 else None)
        try:
            plan = genetic(problem, m, lat, seed=seed, patience=30)
        except InfeasibleError:
            continue
        batch = problem.space.encode([plan.config])                    # re-predict from the plan itself
        assert problem.memory(batch)[0] == plan.memory <= m
        assert lat is None or problem.latency(batch)[0] == plan.latency <= lat
    assert genetic(problem, low_m, seed=0).memory == low_m            # the tightest possible limit


def test_same_seed_same_plan():
    problem = synthetic_problem((8,) * 10, seed=5)
    m = problem.memory.least()[0] * 1.8
    assert genetic(problem, m, seed=7) == genetic(problem, m, seed=7)


def test_genetic_handles_48_layers():
    problem = synthetic_problem((16,) * 48, seed=2)
    m = problem.memory.least()[0] * 2
    plan = genetic(problem, m, problem.latency.least()[0] * 1.4, seed=0)
    assert plan.memory <= m and len(plan.config.sizes) == 48
    assert plan.quality < problem.quality(problem.memory.least()[1])[0]   # better than the smallest config


def test_impossible_constraints_name_what_can_be_met():
    problem = synthetic_problem((4, 5, 3))
    least_m, least_l = problem.memory.least()[0], problem.latency.least()[0]
    with pytest.raises(InfeasibleError) as e:
        genetic(problem, least_m - 1)
    assert f"the least memory any configuration needs is {format_bytes(least_m)}" in str(e.value)
    assert e.value.least_memory == least_m and "\n" not in str(e.value)
    with pytest.raises(InfeasibleError, match=f"the least latency any configuration has is {least_l * 1e3:.3g} ms"):
        genetic(problem, least_m * 10, least_l * 0.99)
    # Each limit alone can be met, both together cannot: the message says what each limit allows.
    fastest = exhaustive(problem, least_m, objective="latency").latency
    assert fastest > least_l
    with pytest.raises(InfeasibleError) as e:
        exhaustive(problem, least_m, least_l)
    assert f"within {format_bytes(least_m)} the fastest takes {fastest * 1e3:.3g} ms/token" in str(e.value)
    with pytest.raises(PlanError, match="memory limit must be positive"):
        genetic(problem, 0)


def test_pareto_points_improve_with_memory():
    problem = synthetic_problem((4, 5, 3))
    limits = [problem.memory.least()[0] - 1, *memory_points(problem, 5)]
    points = pareto(problem, limits, method="exhaustive")
    assert points[0] == (limits[0], None)
    losses = [plan.quality for _, plan in points[1:]]
    assert all(a >= b for a, b in zip(losses, losses[1:])) and losses[0] > losses[-1]
    assert [plan.memory <= m for m, plan in points[1:]] == [True] * 5
    ga = pareto(problem, limits[1:], seed=0)
    assert [round(p.quality, 6) for _, p in ga] == [round(q, 6) for q in losses]


# -- quality models ----------------------------------------------------------------------------------

SPACE6 = SearchSpace(num_experts=(8,) * 6, precisions=PRECISIONS, intervals=(8, 32))


def interacting_loss(b):
    """Non-additive: the first two layers' losses multiply, int4 hurts more in a small committee."""
    miss = 1 - b.sizes / 8
    return (2 + (np.linspace(0.2, 0.6, 6) * miss).sum(1) + 0.8 * miss[:, 0] * miss[:, 1]
            + 0.6 * (miss * (b.prec == 2)).sum(1) + 0.4 * miss.mean(1) ** 2 * (b.interval == 1))


def test_mlp_fits_a_synthetic_function():
    b = SPACE6.random(np.random.default_rng(0), 400)
    y = interacting_loss(b)
    train, test = split(400, 0.25, 0)
    mlp = MLPQuality(SPACE6, seed=0).fit(b.take(train), y[train])
    additive = SensitivityQuality(SPACE6).fit(b.take(train), y[train])
    mlp_rmse, add_rmse = errors(mlp(b.take(test)), y[test])["rmse"], errors(additive(b.take(test)), y[test])["rmse"]
    # Predicting the mean scores RMSE = std; the best additive model ~0.4 std (the truth has interactions);
    # measured 0.15 std on three seeds, so 0.2 std says the MLP learned the interactions, with margin.
    assert mlp_rmse < 0.2 * y[test].std() and mlp_rmse < 0.5 * add_rmse


def test_mlp_numpy_forward_matches_torch():
    b = SPACE6.random(np.random.default_rng(1), 50)
    mlp = MLPQuality(SPACE6, steps=50).fit(b, interacting_loss(b))
    assert np.allclose(mlp.raw(b), mlp.torch_raw(b), rtol=0, atol=1e-12)
    again = MLPQuality(SPACE6, steps=50).fit(b, interacting_loss(b))
    assert np.array_equal(mlp(b), again(b))                            # seeded


def test_sensitivity_model_recovers_an_additive_truth():
    rng = np.random.default_rng(4)
    space = SearchSpace(num_experts=(6, 8, 4), precisions=PRECISIONS, intervals=(8, 32))
    # Per layer: loss increase by size (0 at full), precision offsets; F adds a constant.
    curves = [np.concatenate([np.sort(rng.uniform(0, 1, N - 1))[::-1], [0.0]]) for N in space.num_experts]
    offsets = rng.uniform(0, 0.1, (3, 3)) * np.array([0, 1, 1])      # [L, P], bf16 is the reference

    offsets = np.cumsum(offsets, axis=1)                             # int8 <= int4, as the model assumes
    missing_share = lambda b: (1 - b.sizes / np.array(space.num_experts)).sum(1)   # noqa: E731

    def truth(b):   # F's term vanishes when every layer is full (nothing is updated then)
        return (1.5 + sum(curves[l][b.sizes[:, l] - 1] + offsets[l, b.prec[:, l]] for l in range(3))
                + 0.05 * b.interval * missing_share(b))

    b = space.random(rng, 300)
    model = SensitivityQuality(space).fit(b, truth(b))
    assert model.base == pytest.approx(1.5, abs=1e-4)   # free intercept (no full sample), small ridge
    for layer in range(3):
        for p, name in enumerate(PRECISIONS):
            want = curves[layer] + offsets[layer, p]
            assert np.allclose(model.layer_curve(layer, name), want, atol=1e-3), (layer, name)
    held = space.random(np.random.default_rng(9), 100)
    assert errors(model(held), truth(held))["max"] < 1e-3


def noisy_insensitive_samples(space, count=120, seed=3):
    """Measured-like samples: two layers matter, the others only add noise around 0, so unconstrained
    least squares gives them negative terms (the old model predicted plans better than the full model)."""
    rng = np.random.default_rng(seed)
    b = space.random(rng, count)
    miss = 1 - b.sizes / np.array(space.num_experts)
    loss = 2.658 + 0.4 * miss[:, 0] ** 2 + 0.2 * miss[:, 1] + 0.03 * (b.prec[:, 0] == 2) \
        + rng.normal(0, 0.01, count) * (miss.sum(1) > 0)
    samples = [Sample(space.decode(b, i), float(loss[i])) for i in range(count)]
    return samples + [Sample(space.decode(space.full(), 0), 2.658)]


@pytest.mark.parametrize("name", ["sensitivity", "mlp"])
def test_no_configuration_is_predicted_better_than_the_full_model(name):
    space = SearchSpace(num_experts=(8,) * 6, precisions=PRECISIONS, intervals=(8, 16, 32))
    samples = noisy_insensitive_samples(space)
    fit = fit_quality(space, samples, candidates=(name,))
    every = space.random(np.random.default_rng(7), 5000)
    assert fit(every).min() >= 2.658 - 1e-12
    for f in range(3):   # the full model, at any F, predicts its measured loss
        full = space.full()
        full.interval[:] = f
        assert fit(full)[0] == pytest.approx(2.658, abs=1e-12)
    if name == "sensitivity":   # and the old, unconstrained least squares did predict better than full here
        x = fit.model._terms(every)
        b = space.encode([s.config for s in samples])
        old = np.linalg.lstsq(np.concatenate([np.ones((len(b), 1)), fit.model._terms(b)], axis=1),
                              np.array([s.loss for s in samples]), rcond=None)[0]
        assert (old[0] + x @ old[1:]).min() < 2.658 - 0.005


def test_sensitivity_model_is_monotone_in_missing_experts_and_precision():
    space = SearchSpace(num_experts=(8, 16, 4), precisions=PRECISIONS, intervals=(8, 32))
    model = fit_quality(space, noisy_insensitive_samples(space, 200), candidates=("sensitivity",)).model
    assert (model.coef >= 0).all()
    b = space.random(np.random.default_rng(5), 2000)
    before = model(b)
    for layer in range(3):
        fewer = b.take(np.arange(len(b)))
        fewer.sizes[:, layer] = np.maximum(fewer.sizes[:, layer] - 1, 1)
        assert (model(fewer) >= before - 1e-12).all()
        coarser = b.take(np.arange(len(b)))
        coarser.prec[:, layer] = np.minimum(coarser.prec[:, layer] + 1, 2)
        assert (model(coarser) >= before - 1e-12).all()


def test_nnls_matches_a_brute_force_active_set():
    import itertools

    from pcmoe.planner.quality import nnls

    rng = np.random.default_rng(0)
    for _ in range(20):
        a, y = rng.normal(size=(30, 5)), rng.normal(size=30)
        x = nnls(a, y, free=1)
        assert (x[1:] >= 0).all()
        best = np.inf   # every subset of the constrained columns held at 0, the rest unconstrained
        for keep in itertools.product([0, 1], repeat=4):
            cols = [0] + [i + 1 for i in range(4) if keep[i]]
            z = np.zeros(5)
            z[cols] = np.linalg.lstsq(a[:, cols], y, rcond=None)[0]
            if (z[1:] >= -1e-12).all():
                best = min(best, float(np.sum((a @ z - y) ** 2)))
        assert np.sum((a @ x - y) ** 2) == pytest.approx(best, rel=1e-9)


def test_fit_quality_keeps_the_better_model_and_reports_both():
    b = SPACE6.random(np.random.default_rng(2), 240)
    additive = 2 + (1 - b.sizes / 8).sum(1) * 0.3 + 0.05 * (b.prec == 2).sum(1)
    for y, winner in ((additive, "sensitivity"), (interacting_loss(b), "mlp")):
        samples = [Sample(SPACE6.decode(b, i), float(y[i])) for i in range(len(y))]
        fit = fit_quality(SPACE6, samples, seed=0)
        assert fit.name == winner and set(fit.heldout) == {"sensitivity", "mlp"}
        assert fit.n_train + fit.n_heldout == 240 and fit.n_heldout == 60
        assert fit.heldout[winner]["rmse"] <= min(e["rmse"] for e in fit.heldout.values())
    with pytest.raises(PlanError, match="at least 4 samples"):
        fit_quality(SPACE6, samples[:3])


@pytest.mark.parametrize("gemm", [0, 400, 5000])
def test_full_gemm_term_and_least_memory_stay_exact(gemm):
    """Peak RSS rises once a full-precision bank of >= 2 slots computes (bf16 matmul workspaces): one term,
    not per layer, and least() is still the exact minimum (checked by enumerating the space)."""
    import dataclasses
    import itertools

    space = SearchSpace(num_experts=(3, 2), precisions=PRECISIONS, intervals=(16,))
    profile = dataclasses.replace(make_profile((3, 2), quant_staging=1), full_gemm_bytes=gemm)
    model, plain = MemoryModel(space, profile), MemoryModel(space, make_profile((3, 2), quant_staging=1))
    configs = [Config((a, b), (p, q), 16) for a, b in itertools.product((1, 2, 3), (1, 2))
               for p, q in itertools.product(PRECISIONS, PRECISIONS)]
    batch = space.encode(configs)
    extra = model(batch) - plain(batch)
    for c, e in zip(configs, extra):
        assert e == gemm * any(p == "bf16" and n >= 2 for n, p in zip(c.sizes, c.precisions))
    least, cfg = model.least()
    assert least == pytest.approx(model(batch).min()) and model(cfg)[0] == least
