"""The planner on the real runtime: device profiles, plan files, `pcmoe plan`, `--memory`, the
measurement worker, and the memory model against the runtime's own accounting."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import pcmoe
from pcmoe.cli import main
from pcmoe.formats import check_plan, check_precisions, read_plan
from pcmoe.planner import calibrate
from pcmoe.planner.planning import PROFILE_FILE, Planner, config_of_plan, parse_latency, parse_memory
from pcmoe.planner.predict import DeviceProfile, MemoryModel
from pcmoe.planner.space import Config, PlanError, SearchSpace

DOCS = "\n\n=====\n\n".join(["hello world the quick brown fox jumps over the lazy dog " * 3,
                               "def main():\n    return 0\n" * 4, "the lazy dog says hello world " * 5] * 2)
RUNTIME, GEMM, KV, UPDATE = 300_000_000, 50_000_000, 1_000, {"full": 1e-5, "int8": 3e-5, "int4": 6e-5}
NONEXPERT_S = {"full": 5e-4, "int8": 4e-4, "int4": 3e-4}        # seconds per token outside the MoE layers
NONEXPERT_LOSS = {"full": 0.0, "int8": 0.001, "int4": 0.03}
NONEXPERT_RUNTIME = {"full": 0, "int8": -5_000_000, "int4": -9_000_000}   # runtime bytes beyond full's


def planted_loss(sizes, precisions, num_experts, nonexpert="full"):
    """A known quality: loss grows as layers lose experts (the first layer most), with int4 experts
    and with quantised non-expert weights."""
    miss = 1 - np.array(sizes) / np.array(num_experts)
    int4 = sum(p == "int4" for p in precisions)
    return 2.0 + float((np.linspace(0.6, 0.2, len(sizes)) * miss ** 2).sum()) + 0.02 * int4 + NONEXPERT_LOSS[nonexpert]


def synthetic_measurements(facts, count=40, seed=0):
    """What a calibration of `facts` would have measured on a machine with RUNTIME bytes of runtime,
    KV bytes per token, per-layer decode times by precision and the planted loss."""
    space = SearchSpace(tuple(facts["num_experts"]), tuple(facts["expert_bytes"]), (8, 16, 32),
                        tuple(facts["nonexpert_precisions"]))
    weights = MemoryModel(space, DeviceProfile.from_dict({
        "num_experts": facts["num_experts"], "expert_bytes": facts["expert_bytes"],
        "nonexpert_bytes": facts["nonexpert_bytes"], "full_precision": "full", "n_buffers": facts["n_buffers"],
        "staging_bytes": facts["staging_bytes"], "quant_staging": facts["quant_staging"]}))
    layer_s = {"full": 1e-4, "int8": 2e-4, "int4": 3e-4}
    L, N = len(facts["num_experts"]), facts["num_experts"][0]
    rng = np.random.default_rng(seed)
    done = {f"kv:{w}": {"returncode": 0, "peak_rss_bytes": 400_000_000 + KV * w} for w in calibrate.KV_WINDOWS}

    def record(key, sizes, precs, f, ne="full"):
        cfg = {"committee_sizes": [int(n) for n in sizes], "expert_precisions": list(precs), "update_every": f,
               "nonexpert_precision": ne}
        w = weights(space.encode([Config.from_dict(cfg, space)]))[0]
        swapping = [p for n, p in zip(sizes, precs) if n < N]
        lat = NONEXPERT_S[ne] + sum(layer_s[p] for p in precs) + sum(UPDATE[p] for p in swapping) * 16 / f
        gemm = GEMM * any(p == "full" and n >= 2 for n, p in zip(sizes, precs))
        wobble = 1000 * (key.startswith("sample:") and int(key[7:]) % 3)     # runs differ a little
        done[key] = {"returncode": 0, "config": cfg, "loss": planted_loss(sizes, precs, facts["num_experts"], ne),
                     "latency_s": lat, "layer_s": [layer_s[p] for p in precs], "step_s": 0.0,
                     "peak_rss_bytes": int(w + RUNTIME + gemm - wobble + KV * calibrate.MEASURED_KV_TOKENS
                                           + NONEXPERT_RUNTIME[ne])}

    for p in facts["expert_bytes"]:
        for n in (1, N // 2, N):
            record(f"latency:{p}:{n}", [n] * L, [p] * L, 16)
    for q in facts["nonexpert_precisions"][1:]:
        record(f"nonexpert:{q}", [N] * L, ["full"] * L, 16, q)
    precisions = list(facts["expert_bytes"])
    for i in range(count):
        record(f"sample:{i}", rng.integers(1, N + 1, L), [precisions[j] for j in rng.integers(0, 3, L)],
               int(rng.choice([8, 16, 32])), facts["nonexpert_precisions"][i % len(facts["nonexpert_precisions"])])
    return done


@pytest.fixture(scope="module")
def lm_with_profile(tiny_lm, tmp_path_factory):
    """A copy of the tiny LM with a device profile derived from synthetic measurements beside it."""
    folder = tmp_path_factory.mktemp("planned") / "lm"
    shutil.copytree(tiny_lm, folder)
    facts = calibrate.model_facts(str(folder))
    profile = calibrate.derive(facts, synthetic_measurements(facts))
    profile["calibration"] = {"ident": {"stream": {"kind": "text", "data": str(folder / "docs.txt"),
                                                   "documents": "even", "doc_tokens": 64, "window": 16, "chunk": 8}}}
    (folder / PROFILE_FILE).write_text(json.dumps(profile))
    (folder / "docs.txt").write_text(DOCS)
    return folder


# -- device profiles ---------------------------------------------------------------------------------------


def test_long_runs_add_their_heap_growth_to_the_runtime_bytes(lm_with_profile):
    facts = calibrate.model_facts(str(lm_with_profile))
    done = synthetic_measurements(facts)
    base = calibrate.derive(facts, done)
    N = facts["num_experts"][0]
    longer = dict(done)
    for key, extra in ((f"long:full:{N}", 300_000), (f"long:int4:{N // 2}", 700_000)):
        short = done["latency:" + key[len("long:"):]]
        longer[key] = {**short, "key": key, "peak_rss_bytes": short["peak_rss_bytes"] + extra, "loss": 9.9}
    grown = calibrate.derive(facts, longer)
    assert grown["memory_fit"]["long_run_bytes"] == 700_000 and base["memory_fit"]["long_run_bytes"] == 0
    assert grown["runtime_bytes"] == base["runtime_bytes"] + 700_000
    assert grown["quality_samples"] == base["quality_samples"]      # long runs are not quality samples
    stream = {"kind": "frames", "data": None, "frames": 10, "seed": 4}
    long_specs = [s for s in calibrate.measurement_specs(str(lm_with_profile), facts, stream, 2, 0, 1)
                  if s["key"].startswith("long:")]
    assert [s["heldout"]["seed"] for s in long_specs] == [5, 5] and all(s["stream"] == stream for s in long_specs)


def test_derive_recovers_the_planted_machine(lm_with_profile):
    data = json.loads((lm_with_profile / PROFILE_FILE).read_text())
    margin = data["memory_fit"]["margin_bytes"]                   # 3 sd of the overheads: the runs wobble 0..2000
    assert 0 < margin < 3000 and data["runtime_bytes"] == RUNTIME + margin   # the largest overhead measured + margin
    assert data["full_gemm_bytes"] == GEMM
    assert RUNTIME - 2000 <= data["memory_fit"]["runtime_bytes_min"] < RUNTIME
    assert data["kv_bytes_per_token"] == max(KV, data["memory_fit"]["kv_bytes_per_token_cache"])
    # the tiny LM's head [300, 64] has no whole int4 blocks: int8 is the only quantised non-expert precision
    assert data["nonexpert_precisions"] == ["full", "int8"] and set(data["nonexpert_bytes"]) == {"full", "int8"}
    assert data["latency"]["nonexpert_s"] == pytest.approx({q: NONEXPERT_S[q] for q in ("full", "int8")})
    assert data["nonexpert_bytes"]["full"] > data["nonexpert_bytes"]["int8"]
    # the runtime's memory at int8 non-expert weights, as an offset from full (the runs wobble 0..2000)
    assert set(data["nonexpert_runtime_bytes"]) == {"int8"}
    assert data["nonexpert_runtime_bytes"]["int8"] == pytest.approx(NONEXPERT_RUNTIME["int8"], abs=2000)
    assert data["latency_fit"]["heldout"]["mae"] < 0.1
    q = data["quality"]
    assert q["metric"] == "log_ppl" and q["model"] in ("sensitivity", "mlp") and set(q["heldout"]) == {"sensitivity",
                                                                                                       "mlp"}
    assert q["full_loss"] == pytest.approx(2.0)
    planner = Planner.from_data(data)
    assert planner.full_memory() == pytest.approx(planner.memory(planner.space.full())[0])


def test_derive_divides_out_the_machine_speed_of_each_run(lm_with_profile):
    """Runs timed on a machine that drifts (each run 0.7 .. 1.4x slower, seen by its speed probe):
    the derived latency model is the median machine's, as if nothing drifted."""
    facts = calibrate.model_facts(str(lm_with_profile))
    steady = synthetic_measurements(facts)
    rng = np.random.default_rng(1)
    drifting = {}
    for key, r in steady.items():
        if r.get("latency_s"):
            k = float(rng.uniform(0.7, 1.4))
            r = {**r, "latency_s": r["latency_s"] * k, "layer_s": [t * k for t in r["layer_s"]], "probe_s": 0.01 * k}
        drifting[key] = r
    median = np.median([r["probe_s"] for r in drifting.values() if "probe_s" in r]) / 0.01
    want, got = calibrate.derive(facts, steady), calibrate.derive(facts, drifting)
    assert got["latency_fit"]["speed"]["source"] == "probe"
    assert got["latency"]["nonexpert_s"]["full"] == pytest.approx(want["latency"]["nonexpert_s"]["full"] * median)
    assert got["latency_fit"]["heldout"]["mae"] < 0.02 < got["latency_fit"]["raw"]["heldout"]["mae"]
    assert got["latency"]["probe_s"] == pytest.approx(0.01 * median)


def test_derive_only_rewrites_the_profile_from_its_measurements(lm_with_profile, tmp_path, capsys):
    folder = tmp_path / "lm"
    shutil.copytree(lm_with_profile, folder)
    facts = calibrate.model_facts(str(folder))
    data = json.loads((folder / PROFILE_FILE).read_text())
    data["measurements"] = synthetic_measurements(facts)
    data["runtime_bytes"] = 1                                  # stale: derive-only puts the measured one back
    (folder / PROFILE_FILE).write_text(json.dumps(data))
    assert main(["calibrate", "--model", str(folder), "--derive-only"]) == 0
    rewritten = json.loads((folder / PROFILE_FILE).read_text())
    assert rewritten["runtime_bytes"] == RUNTIME + rewritten["memory_fit"]["margin_bytes"]
    assert "rewrote" in capsys.readouterr().out
    del data["measurements"]
    (folder / PROFILE_FILE).write_text(json.dumps(data))
    assert main(["calibrate", "--model", str(folder), "--derive-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert "stores no measurements" in err and len(err.splitlines()) == 1


def test_measurement_specs_are_unique_valid_and_seeded(lm_with_profile):
    facts = calibrate.model_facts(str(lm_with_profile))
    stream = {"kind": "text", "data": "x.txt"}
    a = calibrate.measurement_specs(str(lm_with_profile), facts, stream, 12, seed=3, threads=1)
    b = calibrate.measurement_specs(str(lm_with_profile), facts, stream, 20, seed=3, threads=1)
    keys = [s["key"] for s in a]
    # load + imports, 2 KV windows, 9 latency points, 1 non-expert run, 2 long runs; near: half as many again;
    # 4 shadow forms x 2 sizes, half as many shadow samples again for version 3's two forms and a
    # quarter as many for each later form
    assert facts["shadow_modes"] == ["none", "int2", "int3", "vq6", "vq7"]
    assert len(set(keys)) == len(keys) and len(a) == 2 + 2 + 9 + 1 + 2 + 12 + 6 + 8 + 6 + 2 * 3
    forms = {s["config"]["shadow"] for s in a if s["key"].startswith("shadow-sample:")}
    assert forms == {"int2", "int3", "vq6", "vq7"}
    assert all(s["config"]["shadow"] == s["key"].split(":")[1] for s in a if s["key"].count(":") == 2
               and s["key"].startswith("shadow-sample:"))
    drawn = [s["config"]["nonexpert_precision"] for s in a if s["key"].startswith(("sample:", "near:"))]
    assert set(drawn) == set(facts["nonexpert_precisions"]) == {"full", "int8"}  # sampled (int4: the head's shape)
    assert all(s["plan"]["nonexpert_precision"] == s["config"]["nonexpert_precision"] for s in a if s.get("config"))
    by_key = {s["key"]: s for s in b}
    assert all(by_key[s["key"]].get("plan") == s.get("plan") for s in a)      # a longer run extends the same
    assert calibrate.measurement_specs(str(lm_with_profile), facts, stream, 12, seed=4, threads=1)[-1] != a[-1]
    space = SearchSpace(tuple(facts["num_experts"]), ("full", "int8", "int4"), (8, 16, 32), ("full", "int8", "int4"),
                        tuple(facts["shadow_modes"]))
    for s in a:
        if s.get("config"):
            Config.from_dict(s["config"], space)
            check_plan(s["plan"], facts["model_type"], facts["num_experts"])


def test_bad_device_profiles_are_one_line_errors(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text("{")
    for path, words in ((tmp_path / "none.json", "does not exist; make one with `pcmoe calibrate"),
                        (bad, "cannot be read")):
        with pytest.raises(PlanError, match=words):
            Planner.from_file(path)
    bad.write_text(json.dumps({"format": "pcmoe-profile/1"}))      # the routing profile is another file
    with pytest.raises(PlanError, match="not a pcmoe device profile"):
        Planner.from_file(bad)


@pytest.mark.parametrize("spec, value", [("900MB", 900_000_000), ("1GiB", 2**30), ("50%", 500), ("123", 123)])
def test_memory_and_latency_limits_parse(spec, value):
    assert parse_memory(spec, 1000) == value


def test_bad_limits_are_one_line_errors():
    with pytest.raises(PlanError, match="--budget"):
        parse_memory("50%experts", 1000)
    with pytest.raises(PlanError, match="cannot read memory"):
        parse_memory("lots", 1000)
    assert parse_latency("40ms") == pytest.approx(0.04) and parse_latency("1.5") == pytest.approx(0.0015)
    assert parse_latency("0.5s") == 0.5 and parse_latency(None) is None
    with pytest.raises(PlanError, match="cannot read latency"):
        parse_latency("fast")


# -- plan files --------------------------------------------------------------------------------------------


def test_plan_files_round_trip(lm_with_profile, tmp_path, capsys):
    out = tmp_path / "plan.json"
    planner = Planner.from_file(lm_with_profile / PROFILE_FILE)
    limit = (planner.memory.least()[0] + planner.full_memory()) / 2
    assert main(["plan", "--model", str(lm_with_profile), "--memory", str(int(limit)), "-o", str(out)]) == 0
    assert "plan: sizes" in capsys.readouterr().out
    data = read_plan(out)
    sizes = check_plan(data, "qwen3_moe", list(planner.space.num_experts))
    assert check_precisions(data, planner.space.layers) is not None
    config = config_of_plan(data)
    assert list(config.sizes) == sizes and config.interval == data["options"]["update_every"]
    assert data["predicted"]["memory_bytes"] <= limit and data["limits"]["memory_bytes"] == int(limit)
    assert planner.predict(config)["memory_bytes"] == data["predicted"]["memory_bytes"]
    assert data["nonexpert_precision"] == "full"
    engine = pcmoe.load(lm_with_profile, plan=out, progress=False)
    try:
        st = engine.stats()
        assert st["committee_sizes"] == sizes
        assert [r["precision"] for r in st["per_layer"]] == list(config.precisions)
    finally:
        engine.close()


def test_plans_quantise_the_nonexpert_weights_where_memory_needs_it(lm_with_profile, tmp_path):
    """The least memory any configuration needs has quantised (int8: see above) non-expert weights;
    its plan file says so and the runtime holds them so (pcmoe.nonexpert)."""
    planner = Planner.from_file(lm_with_profile / PROFILE_FILE)
    assert planner.space.nonexpert_precisions == ("full", "int8")
    least = planner.memory.least()[0]
    plan = planner.plan(least)
    assert plan.config.nonexpert_precision == "int8" and "non-expert int8" in planner.describe(plan)
    roomy = planner.plan(planner.full_memory())          # room for everything: the planted loss says full
    assert roomy.config.nonexpert_precision == "full"
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", str(lm_with_profile), "--memory", str(int(least)), "-o", str(out)]) == 0
    data = read_plan(out)
    assert data["nonexpert_precision"] == "int8"
    assert config_of_plan(data, planner.space) == plan.config
    assert planner.predict(config_of_plan(data, planner.space))["memory_bytes"] == int(plan.memory)
    engine = pcmoe.load(lm_with_profile, plan=out, progress=False)
    try:
        st = engine.stats()
        assert st["nonexpert_precision"] == "int8" and st["committee_sizes"] == list(plan.config.sizes)
        assert st["nonexpert_bytes"] == planner.profile.nonexpert_bytes["int8"]
        assert len(list(engine.generate("hello", max_new_tokens=3))) >= 1
    finally:
        engine.close()


@pytest.mark.parametrize("change, words", [
    ({"model_type": "mixtral"}, "the plan is for a mixtral model, not qwen3_moe"),
    ({"committee_sizes": [2]}, "the plan has 1 committee sizes but the model has 2 MoE layers"),
    ({"committee_sizes": [0, 2]}, "plan committee size 0 for MoE layer 0 must be an integer in 1..8"),
    ({"committee_sizes": [2, 9]}, "plan committee size 9 for MoE layer 1 must be an integer in 1..8"),
    ({"precisions": ["int2", "full"]}, "plan precision 'int2' is not one of full, int8, int4"),
    ({"precisions": ["full"]}, "precisions must be a list of 2 entries"),
    ({"format": "x"}, "not a pcmoe plan"),
])
def test_bad_plan_files_are_one_line_errors(lm_with_profile, tmp_path, capsys, change, words):
    plan = {"format": "pcmoe-plan/1", "model_type": "qwen3_moe", "num_experts": [8, 8], "committee_sizes": [2, 2],
            "precisions": ["full", "int8"], "options": {}, **change}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(plan))
    for argv in (["plan", "--model", str(lm_with_profile), "--validate", "--plan", str(path)],
                 ["eval", "--model", str(lm_with_profile), "--plan", str(path), "--data", str(lm_with_profile /
                                                                                            "docs.txt"), "--quiet"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and "Traceback" not in err


# -- pcmoe plan --------------------------------------------------------------------------------------------


def test_plan_cli_with_latency_and_json(lm_with_profile, capsys):
    planner = Planner.from_file(lm_with_profile / PROFILE_FILE)
    fast = planner.latency.least()[0] * 1.2
    assert main(["plan", "--model", str(lm_with_profile), "--memory", "100%", "--latency", f"{fast * 1e3}ms",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["predicted"]["latency_s"] <= fast * (1 + 1e-9)
    assert data["predicted"]["memory_bytes"] <= planner.full_memory()


def test_impossible_constraint_names_the_least_memory_and_latency(lm_with_profile, capsys):
    planner = Planner.from_file(lm_with_profile / PROFILE_FILE)
    least_mem, least_lat = planner.memory.least()[0], planner.latency.least()[0]
    for limits in (["--memory", "1kB"], ["--memory", "1kB", "--latency", "10ms"], ["--latency", "1us"]):
        assert main(["plan", "--model", str(lm_with_profile), *limits]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: no configuration")
        assert f"{least_mem / 1e6:.2f} MB" in err and f"{least_lat * 1e3:.3g} ms" in err


def test_weight_limits_ignore_the_runtime(lm_with_profile, capsys):
    planner = Planner.from_file(lm_with_profile / PROFILE_FILE, weights_only=True)
    least = planner.memory.least()[0]
    assert least < 10_000_000                                       # weights of a tiny model, no runtime
    assert main(["plan", "--model", str(lm_with_profile), "--weights", str(int(least * 1.5)), "--json"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["predicted"]["memory_bytes"] <= least * 1.5 and "weights_bytes" in data["limits"]


def test_pareto_prints_a_table_and_writes_a_png(lm_with_profile, tmp_path, capsys):
    png = tmp_path / "p.png"
    assert main(["plan", "--model", str(lm_with_profile), "--pareto", "--points", "4", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.count(" MB ") >= 4 and png.read_bytes()[:4] == b"\x89PNG"


def test_plan_arguments_are_checked_first(lm_with_profile, capsys):
    for argv, words in ((["--memory", "1GB", "--weights", "1GB"], "not allowed with"),
                        ([], "give a limit"),
                        (["--plan", "x.json"], "--plan FILE is for --validate"),
                        (["--memory", "lots"], "cannot read memory"),
                        (["--profile", "/nonexistent.json", "--memory", "1GB"], "does not exist")):
        assert main(["plan", "--model", str(lm_with_profile), *argv]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1


# -- --memory on serve / generate / eval -------------------------------------------------------------------


def test_memory_picks_a_plan_that_fits(lm_with_profile, capsys):
    planner = Planner.from_file(lm_with_profile / PROFILE_FILE)
    limit = int(planner.memory.least()[0] * 0.4 + planner.full_memory() * 0.6)
    assert main(["eval", "--model", str(lm_with_profile), "--memory", str(limit), "--data",
                 str(lm_with_profile / "docs.txt"), "--quiet", "--window", "8"]) == 0
    captured = capsys.readouterr()
    assert "planned for --memory" in captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    plan = planner.plan(limit)
    assert result["committee_sizes"] == list(plan.config.sizes) and plan.memory <= limit


def test_memory_excludes_budget_plan_and_other_policies(lm_with_profile, tmp_path, capsys):
    docs = str(lm_with_profile / "docs.txt")
    for extra, words in ((["--budget", "50%"], "drop --budget / --plan"),
                         (["--policy", "static-frequency"], "policy committee, not static-frequency"),
                         ([], "no configuration fits")):
        memory = "1kB" if not extra else "1GB"
        assert main(["eval", "--model", str(lm_with_profile), "--memory", memory, "--data", docs, *extra]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1
    bare = tmp_path / "bare"
    shutil.copytree(lm_with_profile, bare)
    (bare / PROFILE_FILE).unlink()
    assert main(["eval", "--model", str(bare), "--memory", "1GB", "--data", docs]) == 2
    assert "pcmoe calibrate --model" in capsys.readouterr().err


# -- the memory model is the runtime's accounting ----------------------------------------------------------


@pytest.mark.parametrize("seed, copies", [(0, "0"), (1, "0"), (2, "0"), (0, "1"), (1, "1")])
def test_memory_model_equals_the_runtime_accounting(tiny_checkpoint, seed, copies, monkeypatch):
    # copies "0": quantising on the fly (the model's quant_staging term, full-precision staging buffers);
    # "1": banks read from pcmoe.qcache copies hold no staging and stage swaps at their own precision
    monkeypatch.setenv("PCMOE_QUANT_COPY", copies)
    folder, _ = tiny_checkpoint("qwen3_moe")
    facts = calibrate.model_facts(str(folder))
    assert facts["quant_staging"] == (copies == "0")
    assert (facts["staging_bytes"]["int4"] < facts["staging_bytes"]["full"]) == (copies == "1")
    data = calibrate.derive(facts, {}, fit=False)
    space = SearchSpace(tuple(facts["num_experts"]), tuple(data["precisions"]), tuple(data["intervals"]))
    only = {**data, "runtime_bytes": 0, "kv_bytes_per_token": 0, "full_gemm_bytes": 0}   # weights alone
    profile = DeviceProfile.from_dict(only)
    weights = MemoryModel(space, DeviceProfile.from_dict({**only, "quant_staging": 0}))
    rng = np.random.default_rng(seed)
    N = facts["num_experts"][0]
    for _ in range(4):
        sizes = [int(n) for n in rng.integers(1, N + 1, space.layers)]
        if rng.random() < 0.3:
            sizes = [N] * space.layers
        precs = [str(p) for p in rng.choice(space.precisions, space.layers)]
        plan = {"format": "pcmoe-plan/1", "committee_sizes": sizes, "precisions": precs, "options": {}}
        batch = space.encode([Config(tuple(sizes), tuple(precs), 16)])
        engine = pcmoe.load(folder, plan=plan, progress=False)
        try:
            assert engine.stats()["resident_bytes"] == weights(batch)[0]
            # Quantised banks hold one full-precision staging buffer (the loading thread's): the model's extra term.
            staging = 0
            for layer in engine.layers:
                bank = layer.block.experts
                buffers = getattr(bank._staging, "buffers", None)
                assert (buffers is not None) == (bank.quant is not None and copies == "0")
                staging += sum(t.numel() * t.element_size() for t in (buffers or {}).values())
            assert MemoryModel(space, profile)(batch)[0] - weights(batch)[0] == staging
        finally:
            engine.close()


# -- the measurement worker --------------------------------------------------------------------------------


def test_worker_measures_loss_latency_and_memory(lm_with_profile):
    from pcmoe.planner.worker import run, select_documents

    assert select_documents(list("abcde"), "even") == ["a", "c", "e"]
    assert select_documents(list("abcde"), "odd") == ["b", "d"]
    plan = {"format": "pcmoe-plan/1", "committee_sizes": [3, 8], "precisions": ["int8", "full"],
            "options": {"update_every": 8}}
    stream = {"kind": "text", "data": str(lm_with_profile / "docs.txt"), "documents": "even", "doc_tokens": 24,
              "window": 16, "chunk": 8}
    out = run({"model": str(lm_with_profile), "plan": plan, "threads": 1, "stream": stream,
               "decode": {"prompts": 2, "prompt_tokens": 4, "tokens": 6, "trials": 1, "warmup": 1},
               "heldout": {**stream, "documents": "odd"}})
    assert out["committee_sizes"] == [3, 8] and out["precisions"] == ["int8", "full"]
    assert out["tokens"] > 0 and math.isfinite(out["loss"]) and out["ppl"] == pytest.approx(math.exp(out["loss"]))
    assert out["latency_s"] > 0 and len(out["layer_s"]) == 2 and all(t > 0 for t in out["layer_s"])
    assert out["decode_steps"] == 2 * 5 and out["peak_rss_bytes"] >= out["rss_after_load_bytes"]
    assert math.isfinite(out["heldout"]["loss"]) and out["heldout"]["tokens"] > 0
    assert out["probe_s"] > 0 and out["probe_before_s"] > 0 and out["probe_after_s"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("command", ["eval", "generate", "serve"])
@pytest.mark.parametrize("where", [0.0, 0.5, 1.0])
def test_memory_run_survives_a_cgroup_of_exactly_that_limit(command, where):
    """The shipped LM with its committed profile: `pcmoe eval|generate|serve --memory X` inside a cgroup
    limit of exactly X, for X from the least memory any plan needs (where 0) to the full model's
    (where 1): the process survives, and its peak RSS stays within X."""
    from pcmoe.bench.cgroup import available
    from pcmoe.planner.memcheck import check, run_command

    model = Path(__file__).resolve().parents[1] / "models" / "pcmoe-lm"
    if not available() or not (model / PROFILE_FILE).exists():
        pytest.skip("needs cgroup v1 (root) and the committed device profile")
    data = json.loads((model / PROFILE_FILE).read_text())
    planner = Planner.from_data(data, extra_bytes=(data.get("frontend_bytes") or {}).get(command, 0))
    least, full = planner.memory.least()[0], planner.full_memory()
    limit = int(math.ceil(least + where * (full - least)))
    row = check(run_command(command, str(model), str(limit), limit, str(model / "eval" / "heldout.txt")),
                int(planner.plan(limit).memory))
    assert row["survived"], row
    assert row["peak_rss_bytes"] <= limit and row["cgroup_max_usage_bytes"] <= limit


def test_profile_command_refuses_memory(lm_with_profile, capsys):
    assert main(["profile", "--model", str(lm_with_profile), "--memory", "1GB", "--data",
                 str(lm_with_profile / "docs.txt"), "--out", "p.json"]) == 2
    assert "--memory" in capsys.readouterr().err


PROBE = """
import json, sys
from pcmoe.cli import main
rc = main(json.loads(sys.argv[1]))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "fastapi", "uvicorn")
               or m.startswith(("pcmoe.bench", "pcmoe.server", "pcmoe.engine")))
print(json.dumps({"rc": rc, "heavy": heavy}))
"""


@pytest.mark.parametrize("argv", [["plan", "--help"], ["calibrate", "--help"], ["plan", "--memory", "1kB"],
                                  ["plan", "--memory", "100%", "--quality-model", "sensitivity"]])
def test_plan_and_calibrate_answer_without_torch(lm_with_profile, argv):
    import os
    import subprocess
    import sys

    argv = [*argv, "--model", str(lm_with_profile)] if "--help" not in argv else argv
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True, text=True,
                          timeout=300, env={**os.environ})
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rc"] in (0, 2) and result["heavy"] == [], (result, proc.stderr)


def test_bench_plans_a_planned_curve(lm_with_profile):
    from pcmoe.bench import suite
    from pcmoe.cli import build_parser

    args = build_parser("bench").parse_args(["bench", "--model", str(lm_with_profile), "--data", "d.txt", "--quick"])
    sizes = suite._model_sizes(str(lm_with_profile))
    runs = [r for r in suite.plan_runs(args, [[1]], sizes) if r["curve"] == "planned"]
    budgets = {suite._pct_bytes(sizes, b) for b in suite.QUICK_BUDGETS} | {q["full"] for q in sizes["quant"].values()}
    ne = sizes["nonexpert_quantized"]          # and everything (experts and non-expert weights) int8 / int4
    budgets |= {sizes["quant"][q]["full"] - sizes["nonexpert"] + ne[q] for q in ne}
    assert len(runs) == len(budgets) and len({r["key"] for r in runs}) == len(runs)
    planner = Planner.from_file(lm_with_profile / PROFILE_FILE, weights_only=True)
    for r in runs:
        if r.get("skip"):
            assert r["weight_bytes"] < planner.memory.least()[0]
            continue
        assert r["weight_bytes"] == r["plan"]["predicted"]["memory_bytes"] <= r["plan"]["limits"]["weights_bytes"]
        assert r["policy"] == "committee" and r["section"] == "quant"
    args = build_parser("bench").parse_args(["bench", "--model", str(lm_with_profile), "--skip", "planned"])
    assert not [r for r in suite.plan_runs(args, [[1]], sizes) if r["curve"] == "planned"]


def test_memcheck_counts_a_run_over_its_limit_or_killed_as_failed():
    from pcmoe.planner.memcheck import check, markdown

    ok = check({"command": "eval", "memory": "450MB", "limit_bytes": 450, "returncode": 0, "peak_rss_bytes": 440,
                "cgroup_max_usage_bytes": 300, "cgroup_failcnt": 0, "oom_killed": False}, 445)
    over = check({**ok, "peak_rss_bytes": 451}, 445)
    killed = check({**ok, "returncode": -9, "oom_killed": True, "error": "Killed"}, 445)
    assert ok["survived"] and not over["survived"] and not killed["survived"]
    assert ok["rss_over_predicted"] == pytest.approx(440 / 445 - 1)
    table = markdown([ok, over, killed])
    assert table.count("\n") == 5 and "NO: Killed" in table and "NO: over the limit" in table


def test_validation_compares_and_flags_violations_and_busy_timing(lm_with_profile):
    from pcmoe.planner.validate import compare, report_lines

    data = json.loads((lm_with_profile / PROFILE_FILE).read_text())
    data["latency"]["probe_s"] = 0.01
    planner = Planner.from_data(data)
    plan = planner.plan_dict(planner.plan(planner.full_memory()), {"memory_bytes": 10**9, "latency_s": 1e-3})
    plan["predicted"].update(memory_bytes=500_000_000, latency_s=1e-3, loss=2.0)
    rec = {"returncode": 0, "peak_rss_bytes": 510_000_000, "cgroup_max_usage_bytes": 400_000_000,
           "latency_s": 2e-3, "probe_s": 0.02, "loss": 2.0, "cpu_other_share": 0.5}
    result = compare(planner, plan, rec, 10**9)
    assert result["errors"]["memory_bytes_at_plan_context"] == pytest.approx(0.02)
    unheld = planner.profile.kv_bytes_per_token * (planner.profile.context_tokens - calibrate.MEASURED_KV_TOKENS)
    assert unheld > 0 and result["predicted"]["memory_bytes_at_run_context"] == 500_000_000 - unheld
    assert result["errors"]["memory_bytes"] == pytest.approx(510_000_000 / (500_000_000 - unheld) - 1)
    assert result["errors"]["latency_s"] == pytest.approx(1.0)
    assert result["errors"]["latency_at_calibration_speed"] == pytest.approx(0.0)   # the run was 2x slow
    assert result["errors"]["quality"] == pytest.approx(0.0)
    assert result["violations"] == ["latency 2 ms > limit 1 ms"]
    text = "\n".join(report_lines(planner, result))
    assert "at the calibration's machine speed" in text and "warning: other processes used 50%" in text
    over = compare(planner, plan, {**rec, "peak_rss_bytes": 10**9 + 1, "latency_s": 5e-4}, 10**9)
    assert len(over["violations"]) == 1 and over["violations"][0].startswith("peak RSS")
    killed = compare(planner, plan, {**rec, "returncode": -9, "oom_killed": True}, 10**9)
    assert "killed (out of memory)" in killed["violations"]


def test_import_quality_adds_losses_only_when_the_shared_runs_agree(lm_with_profile, tmp_path):
    facts = calibrate.model_facts(str(lm_with_profile))
    old = synthetic_measurements(facts, count=40, seed=0)
    new = {k: r for k, r in old.items() if not k.startswith("sample:") or int(k[7:]) < 10}
    ident = {"ident": {"stream": {"kind": "text", "data": "d.txt"}}}
    for name, measurements in (("old", old), ("new", new)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"calibration": ident, "measurements": measurements}))
    assert calibrate.import_quality(str(tmp_path / "new.json"), str(tmp_path / "old.json")) == 30
    data = json.loads((tmp_path / "new.json").read_text())
    imported = [k for k in data["measurements"] if k.startswith("quality:")]
    assert len(imported) == 30 and all("peak_rss_bytes" not in data["measurements"][k] for k in imported)
    profile = calibrate.derive(facts, data["measurements"])
    assert len(profile["quality_samples"]) == len(new) - 2 + 30            # kv runs are not scored
    assert profile["memory_fit"]["samples"] == len(new) - 2                # imported losses are no memory samples
    bad = {k: ({**r, "loss": r["loss"] + 0.01} if k == "sample:3" else r) for k, r in old.items()}
    (tmp_path / "old.json").write_text(json.dumps({"calibration": ident, "measurements": bad}))
    (tmp_path / "new.json").write_text(json.dumps({"calibration": ident, "measurements": new}))
    with pytest.raises(PlanError, match="disagree by up to 0.01"):
        calibrate.import_quality(str(tmp_path / "new.json"), str(tmp_path / "old.json"))
