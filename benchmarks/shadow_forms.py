"""Shadow forms below 2 bits (issue 13's 7 MB target): on the shipped LM, with int4 members and int4
non-expert weights (what llama.cpp's q4_K_M quantises too), held-out perplexity at weight budgets
from 6.3 to 9.7 MB for every shadow form, per-layer mixes, and the best configuration without
shadows; what the planner picks for those weight budgets (`pcmoe plan --weights`: committee
sizes, precisions and a shadow form per layer) and what it measures; each form's measured relative
output error per layer; decode speed at 7 MB as a ratio to
the int4 committee without shadows at the same memory (interleaved runs, min of 5). Writes
docs/results/shadow_forms.json, .md and .png (atomically).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/shadow_forms.py [--max-tokens 4096] [--write-errors]

--write-errors merges the measured errors into models/pcmoe-lm/pcmoe_shadow_errors.json (the
chooser's per-layer errors; first 2048 tokens of eval/stdlib.txt, as that file's other forms) and
models/pcmoe-vit's (256 stream frames of the Fashion-MNIST train split, seed 5).
Perplexity does not depend on machine load; the eval speeds (teacher-forced chunks of 32 tokens: the
prefill path) and the decode section do: run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch

import pcmoe
from pcmoe import shadow as S
from pcmoe.bench.common import git_commit, interleaved_decode_s, machine
from pcmoe.evaluate import perplexity
from pcmoe.protocol import read_documents
from pcmoe.system import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
LM = ROOT / "models" / "pcmoe-lm"
BASE = {"quantize": "int4", "nonexpert_quantize": "int4"}
FORMS = ("int1", "int2", "vq6", "vq7", "vq8")
MIXES = {"vq6/vq7 alternating": "vq6,vq7,vq6,vq7,vq6,vq7", "vq7 first 3, vq6 last 3": "vq7,vq7,vq7,vq6,vq6,vq6",
         "vq6 first 3, vq7 last 3": "vq6,vq6,vq6,vq7,vq7,vq7"}
BUDGETS = ("6.3MB", "7MB", "7.9MB", "9.7MB")   # 7 MB / 9.7 MB: 50 % / 70 % of q4_K_M's weight bytes
# without shadows: the int4 committee and the int4 fixed subset (hybrid: the best strategy there)
PLAIN = [("committee", {}), ("static-frequency", {"strategy": "hybrid"})]
DECODE_AT = "7MB"
DECODE = [("committee", {}), ("static-frequency", {"shadow": "vq7"}), ("static-frequency", {"shadow": "vq6"})]


def _label(policy: str, options: dict) -> str:
    extra = ", ".join(f"{k}={v}" for k, v in options.items())
    return f"{policy}" + (f" ({extra})" if extra else "")


def quality_runs(max_tokens: int) -> list[dict]:
    docs = read_documents(LM / "eval" / "heldout.txt")
    plan = [(None, "full", {}, False)]
    for b in BUDGETS:
        plan += [(b, p, {**BASE, **o}, False) for p, o in PLAIN]
        plan += [(b, "static-frequency", {**BASE, "shadow": f}, False) for f in FORMS]
        plan += [(b, "static-frequency", {**BASE, "shadow": m}, True) for m in MIXES.values()]
    rows = []
    for budget, policy, options, mixed in plan:
        row = {"budget": budget, "policy": policy, "options": options, "shadow": options.get("shadow"),
               "mixed": mixed}
        try:
            engine = pcmoe.load(LM, budget=budget, policy=policy, progress=False, **options)
        except pcmoe.PcmoeError as e:
            rows.append({**row, "error": str(e)})
            print(json.dumps(rows[-1]), flush=True)
            continue
        result = perplexity(engine, docs, max_tokens=max_tokens, progress=False)
        st = engine.stats()
        rows.append({**row, "ppl": result["ppl"], "tokens": result["tokens"], "resident_bytes": st["resident_bytes"],
                     "eval_tokens_per_s": result["tokens_per_s"],
                     "shadow_bytes": st["shadow_bytes"], "committee_sizes": st["committee_sizes"],
                     "shadowed": st["shadowed"], "exchanged": st["exchanged"], "skipped": st["skipped"]})
        engine.close()
        print(json.dumps(rows[-1]), flush=True)
    return rows


PLANNED = ("7MB", "7.5MB", "8MB", "9.7MB")


def planned_runs(max_tokens: int) -> list[dict]:
    """`pcmoe plan --weights W` for each budget, then the plan measured like the rows above."""
    import sys
    import tempfile

    docs = read_documents(LM / "eval" / "heldout.txt")
    rows = []
    for budget in PLANNED:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "plan.json"
            done = subprocess.run([sys.executable, "-m", "pcmoe", "plan", "--model", str(LM), "--weights", budget,
                                   "-o", str(path)], capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({"budget": budget, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
                continue
            plan = json.loads(path.read_text())
            engine = pcmoe.load(LM, plan=str(path), progress=False)
        result = perplexity(engine, docs, max_tokens=max_tokens, progress=False)
        st = engine.stats()
        rows.append({"budget": budget, "policy": engine.policy, "committee_sizes": plan["committee_sizes"],
                     "precisions": plan["precisions"], "nonexpert_precision": plan["nonexpert_precision"],
                     "shadow": plan.get("shadow"), "update_every": plan["options"].get("update_every"),
                     "predicted_weight_bytes": plan["predicted"]["memory_bytes"], "ppl": result["ppl"],
                     "resident_bytes": st["resident_bytes"], "shadowed": st["shadowed"], "swaps": st["swaps"]})
        engine.close()
        print(json.dumps(rows[-1]), flush=True)
    return rows


def error_runs(write: bool) -> dict:
    """Each form's relative output error per layer (pcmoe.shadow.measure) on the first 2048 tokens of
    eval/stdlib.txt, all experts resident."""
    engine = pcmoe.load(LM, policy="full", progress=False)
    ids = engine.encode((LM / "eval" / "stdlib.txt").read_text())[:2048]
    measured = S.measure(engine, S.lm_feed(engine, ids), [(f, None, None) for f in FORMS])
    if write:
        S.write_errors(LM / S.ERRORS_FILE, engine.checkpoint.fingerprint(), measured, len(ids),
                       "eval/stdlib.txt (first 2048 tokens)")
    engine.close()
    return measured


VIT = ROOT / "models" / "pcmoe-vit"


def vision_error_runs(write: bool) -> dict:
    """The same errors on the vision model: 256 stream frames of the Fashion-MNIST train split
    (seed 5), as its pcmoe_shadow_errors.json's other forms."""
    from pcmoe.models.vit_moe import frame_stream, load_fashion_mnist

    engine = pcmoe.load(VIT, policy="full", progress=False)
    images, labels = load_fashion_mnist("train")

    def feed():
        for frame, _ in frame_stream(images, labels, 256, seed=5):
            engine.model(pixel_values=frame)
    measured = S.measure(engine, feed, [(f, None, None) for f in FORMS])
    if write:
        S.write_errors(VIT / S.ERRORS_FILE, engine.checkpoint.fingerprint(), measured, 256,
                       "Fashion-MNIST train split, 256 stream frames (seed 5)")
    engine.close()
    return measured


@torch.inference_mode()
def decode_runs(rounds: int = 5, repeats: int = 5, tokens: int = 48) -> list[dict]:
    """`rounds` rounds of interleaved timing (each configuration's best of `repeats`); the ratio to the
    committee per round, and its median (the machine's speed drifts between rounds by +-5 %)."""
    import statistics

    engines = [pcmoe.load(LM, budget=DECODE_AT, policy=p, progress=False, **BASE, **o) for p, o in DECODE]
    prompt = engines[0].encode((LM / "eval" / "heldout.txt").read_text()[:2000])[:64]
    per_round = [interleaved_decode_s(engines, prompt, repeats, tokens) for _ in range(rounds)]
    out = []
    for i, ((p, o), e) in enumerate(zip(DECODE, engines)):
        ratios = [r[0] / r[i] for r in per_round]
        out.append({"budget": DECODE_AT, "policy": p, "options": {**BASE, **o},
                    "ms_per_token": statistics.median(r[i] for r in per_round) * 1e3,
                    "speed_vs_committee": statistics.median(ratios), "ratios": ratios,
                    "kernel": e.load_info["kernel"]})
    return out


def _best(rows: list[dict]) -> dict:
    """Per budget: the best row without shadows, with one form, and with a per-layer mix."""
    best: dict = {}
    for r in rows:
        if "ppl" not in r or r["budget"] is None:
            continue
        kind = "mixed" if r["mixed"] else "one form" if r["shadow"] else "no shadows"
        cur = best.setdefault(r["budget"], {}).get(kind)
        if cur is None or r["ppl"] < cur["ppl"]:
            best[r["budget"]][kind] = r
    return best


def markdown(data: dict) -> str:
    full = next(r["ppl"] for r in data["quality"] if r["policy"] == "full")
    m = data["meta"]
    out = [f"# Shadow forms below 2 bits: shipped LM, held-out ppl (first {data['max_tokens']} tokens; full "
           f"{full:.2f})", "", f"Commit {m['commit']}, {m['machine']}, `{m['command']}`"
           + (f" (decode section: `--only-decode` at {m['decode_commit']})" if m.get("decode_commit") else "")
           + ". Members and non-expert weights int4 throughout.", "",
           "| budget | policy | shadows | ppl | x full | resident MB | eval tokens/s | committee | shadowed "
           "| exchanged | skipped |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["quality"]:
        opts = {k: v for k, v in r["options"].items() if k not in BASE and k != "shadow"}
        policy = _label(r["policy"], opts)
        if "error" in r:
            out.append(f"| {r['budget']} | {policy} | {r['shadow'] or '-'} | - | - | - | - | - | - | - | "
                       f"{r['error'][:90]} |")
        else:
            out.append(f"| {r['budget'] or 'all'} | {policy} | {r['shadow'] or '-'} | {r['ppl']:.2f} | "
                       f"{r['ppl'] / full:.3f} | {r['resident_bytes'] / 1e6:.2f} | {r['eval_tokens_per_s']:.0f} | "
                       f"{r['committee_sizes']} | {r['shadowed']} | {r['exchanged']} | {r['skipped']} |")
    out += ["", "## Best at each budget (x full)", "", "| budget | without shadows | one form | per-layer mix |",
            "|---|---|---|---|"]
    for budget, kinds in _best(data["quality"]).items():
        def cell(r):
            return f"{r['ppl']:.2f} ({r['ppl'] / full:.3f}x, {r['shadow'] or r['policy']})" if r else "-"
        out.append(f"| {budget} | {cell(kinds.get('no shadows'))} | {cell(kinds.get('one form'))} | "
                   f"{cell(kinds.get('mixed'))} |")
    if data.get("vision_errors"):
        out += ["", "## Vision model: relative output error per layer (256 train-split stream frames)", "",
                "| form | layer errors |", "|---|---|"]
        out += [f"| {key} | " + " ".join(f"{e['shadow']:.3f}" for e in layers) + " |"
                for key, layers in data["vision_errors"].items()]
    if data.get("planned"):
        out += ["", "## Planned (`pcmoe plan --weights W`, then the plan measured as above)", "",
                "| weights | policy | committee | precisions | shadow forms per layer | F | ppl | x full | "
                "resident MB | swaps |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in data["planned"]:
            if "error" in r:
                out.append(f"| {r['budget']} | - | - | - | - | - | - | - | - | {r['error'][:80]} |")
                continue
            forms = r["shadow"] if isinstance(r["shadow"], str) else " ".join(r["shadow"] or ["none"])
            precs = sorted(set(r["precisions"]))
            out.append(f"| {r['budget']} | {r['policy']} | {r['committee_sizes']} | {' '.join(precs)} "
                       f"(non-expert {r['nonexpert_precision']}) | {forms} | {r['update_every']} | {r['ppl']:.2f} | "
                       f"{r['ppl'] / full:.3f} | {r['resident_bytes'] / 1e6:.2f} | {r['swaps']} |")
    if data.get("errors"):
        out += ["", "## Relative output error per layer (router-weighted; exchange ~1.0-1.2, skip 1.0)", "",
                "| form | bytes per expert | layer errors |", "|---|---|---|"]
        for key, layers in data["errors"].items():
            out.append(f"| {key} | {data['bytes'].get(key.split('/')[0], '-')} | "
                       + " ".join(f"{e['shadow']:.3f}" for e in layers) + " |")
    if data.get("decode"):
        rounds = len(data["decode"][0].get("ratios", [0]))
        out += ["", f"## Decode at {DECODE_AT} (one token; {rounds} rounds of interleaved runs, each the best of 5; "
                "medians)", "", "| policy | shadows | ms/token | speed vs the int4 committee | per round | kernel |",
                "|---|---|---|---|---|---|"]
        out += [f"| {r['policy']} | {r['options'].get('shadow', '-')} | {r['ms_per_token']:.3f} | "
                f"{r['speed_vs_committee']:.3f} | {' '.join(f'{x:.3f}' for x in r.get('ratios', []))} | "
                f"{r['kernel']} |" for r in data["decode"]]
    return "\n".join(out) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pcmoe.bench.common import savefig

    full = next(r["ppl"] for r in data["quality"] if r["policy"] == "full")
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    curves: dict = {}
    for r in data["quality"]:
        if "ppl" in r and r["budget"] and not r["mixed"]:
            name = f"int4 members + {r['shadow']} shadows" if r["shadow"] else f"no shadows: {r['policy']}"
            curves.setdefault(name, []).append((r["resident_bytes"] / 1e6, r["ppl"]))
    planned = sorted((r["resident_bytes"] / 1e6, r["ppl"]) for r in data.get("planned", []) if "ppl" in r)
    if planned:
        curves["planned (pcmoe plan --weights)"] = planned
    for name, pts in sorted(curves.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                linestyle="--" if name.startswith("no") else "-")
    ax.axhline(full, color="grey", linestyle="--", label=f"full bf16 ({full:.2f})")
    ax.axhline(1.3 * full, color="grey", linestyle=":", label="1.3 x full (target at 7 MB)")
    ax.axvline(7.0, color="lightgrey", linestyle=":")
    ax.set_xlabel("resident weight bytes (MB)")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("pcmoe-lm below q4_K_M's size: shadow forms at equal weight memory")
    fig.tight_layout()
    savefig(fig, path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "shadow_forms"))
    ap.add_argument("--write-errors", action="store_true", help="merge the measured errors into the LM's "
                                                                "pcmoe_shadow_errors.json")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--only-decode", action="store_true", help="rerun the decode section into the JSON already "
                                                                "written")
    args = ap.parse_args()
    commit = git_commit(ROOT)
    data = {"max_tokens": args.max_tokens,
            "meta": {"commit": commit, "machine": f"{machine()['cpu']}, {torch.get_num_threads()} threads",
                     "command": "python benchmarks/shadow_forms.py" + (" --write-errors" if args.write_errors else "")}}
    if args.only_decode:
        data = json.loads(Path(args.out + ".json").read_text())
        data["decode"] = decode_runs()
        data["meta"]["decode_commit"] = commit
        atomic_write_text(Path(args.out + ".json"), json.dumps(data, indent=1))
        atomic_write_text(Path(args.out + ".md"), markdown(data))
        print(f"wrote {args.out}.json, .md (decode section)")
        return
    data["errors"] = error_runs(args.write_errors)   # first: the chooser reads them in the runs below
    data["vision_errors"] = vision_error_runs(args.write_errors)
    probe = pcmoe.load(LM, policy="full", progress=False)
    data["bytes"] = {f: S.shadow_nbytes(probe.family.kernel(), probe.blocks[0].experts.dtype, f) for f in FORMS}
    probe.close()
    data["quality"] = quality_runs(args.max_tokens)
    data["planned"] = planned_runs(args.max_tokens)
    if not args.skip_decode:
        data["decode"] = decode_runs()
    atomic_write_text(Path(args.out + ".json"), json.dumps(data, indent=1))
    atomic_write_text(Path(args.out + ".md"), markdown(data))
    plot(data, Path(args.out + ".png"))
    print(f"wrote {args.out}.json, .md, .png")


if __name__ == "__main__":
    main()
