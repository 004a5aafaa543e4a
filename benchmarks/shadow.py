"""Shadow experts (issue 13): quality at equal weight memory with and without shadows, on the shipped
LM (held-out perplexity) and the vision frame stream (accuracy), and decode speed with shadows as a
ratio to the same memory without. Writes docs/results/shadow.json, .md and .png (atomically).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/shadow.py [--max-tokens 4096] [--frames 2000] [--quick]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/shadow.py --only what_if   # one section, merged into the JSON

Perplexity and accuracy do not depend on machine load; the decode ratio is taken from interleaved
runs (min of 5) so that load slows both sides alike.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import pcmoe
from pcmoe.bench.common import interleaved_decode_s
from pcmoe.evaluate import perplexity
from pcmoe.protocol import read_documents
from pcmoe.system import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
LM = ROOT / "models" / "pcmoe-lm"
VIT = ROOT / "models" / "pcmoe-vit"
I4 = {"quantize": "int4"}
# Per budget: the configurations without shadows, then with (shadow_experts None = all non-members).
NO_SHADOW = [("static-frequency", {**I4, "strategy": "exchange"}), ("static-frequency", {**I4, "strategy": "hybrid"}),
             ("committee", I4), ("committee", {})]
WITH_SHADOW = {
    "9.7MB": [("static-frequency", {**I4, "shadow": "int2", "shadow_experts": m}) for m in (2, 7)],
    "12MB": [("static-frequency", {**I4, "shadow": "int2", "shadow_experts": m}) for m in (7, 10)]
    + [("static-frequency", {**I4, "shadow": "int2", "shadow_experts": 10, "strategy": "hybrid"})],
    "14MB": [("static-frequency", {**I4, "shadow": "int2"}), ("static-frequency", {**I4, "shadow": "int3",
                                                                                   "shadow_experts": 10})],
    "17MB": [("static-frequency", {**I4, "shadow": "int2"}), ("static-frequency", {**I4, "shadow": "int3"})],
    "22.5MB": [("static-frequency", {**I4, "shadow": "int3"}), ("committee", {"shadow": "int2"})],
}
VISION = [("30%experts", "committee", {}), ("30%experts", "committee", {"shadow": "int2"}),
          ("30%experts", "committee", {"shadow": "int3"})]
DECODE = [("14MB", "static-frequency", I4), ("14MB", "static-frequency", {**I4, "shadow": "int2"}),
          ("14MB", "committee", I4)]


def _row(budget, policy, options):
    return {"budget": budget, "policy": policy, **options, "shadows": bool(options.get("shadow"))}


def lm_runs(max_tokens: int, budgets) -> list[dict]:
    docs = read_documents(LM / "eval" / "heldout.txt")
    plan = [(None, "full", {})] + [(b, p, o) for b in budgets for p, o in NO_SHADOW + WITH_SHADOW[b]]
    rows = []
    for budget, policy, options in plan:
        row = _row(budget, policy, options)
        try:
            engine = pcmoe.load(LM, budget=budget, policy=policy, progress=False, **options)
        except pcmoe.PcmoeError as e:
            rows.append({**row, "error": str(e)})
            continue
        result = perplexity(engine, docs, max_tokens=max_tokens, progress=False)
        st = engine.stats()
        rows.append({**row, "ppl": result["ppl"], "tokens": result["tokens"], "resident_bytes": st["resident_bytes"],
                     "shadow_bytes": st["shadow_bytes"], "committee_sizes": st["committee_sizes"],
                     "shadowed": st["shadowed"], "exchanged": st["exchanged"], "skipped": st["skipped"],
                     "router_mass_outside": st["router_mass_outside"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def vision_runs(frames: int) -> list[dict]:
    from pcmoe.models.vit_moe import evaluate_stream

    rows = []
    for budget, policy, options in VISION:
        row = _row(budget, policy, options)
        engine = pcmoe.load(VIT, budget=budget, policy=policy, progress=False, **options)
        result = evaluate_stream(engine, frames=frames, progress=False)
        st = engine.stats()
        rows.append({**row, "accuracy": result["accuracy"], "frames": result["frames"],
                     "resident_bytes": st["resident_bytes"], "shadow_bytes": st["shadow_bytes"],
                     "committee_sizes": st["committee_sizes"], "shadowed": st["shadowed"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


@torch.inference_mode()
def decode_runs(repeats: int = 5, tokens: int = 48) -> list[dict]:
    engines = [pcmoe.load(LM, budget=b, policy=p, progress=False, **o) for b, p, o in DECODE]
    prompt = engines[0].encode((LM / "eval" / "heldout.txt").read_text()[:2000])[:64]
    best = interleaved_decode_s(engines, prompt, repeats, tokens)
    return [{**_row(b, p, o), "ms_per_token": t * 1e3, "speed_vs_first": best[0] / t, "kernel": e.load_info["kernel"]}
            for (b, p, o), t, e in zip(DECODE, best, engines)]


# What if the non-expert weights (embedding, attention; 6.61 MB in bf16) were quantised too, as
# llama.cpp's q4_K_M does? Simulated: quantised and dequantised in place (pcmoe has no such
# kernels), bytes by arithmetic; the engine's budget is the target plus the bytes that would save.
WHAT_IF = [(8, "9.7MB", 13.0e6, "static-frequency", {**I4, "shadow": "int2"}),
           (8, "9.7MB", 13.0e6, "static-frequency", {**I4, "strategy": "hybrid"}),
           (8, "7MB", 10.3e6, "static-frequency", {**I4, "shadow": "int2", "shadow_experts": 7}),
           (8, "7MB", 10.3e6, "static-frequency", {**I4, "strategy": "hybrid"}),
           (4, "7MB", 11.54e6, "static-frequency", {**I4, "shadow": "int2", "shadow_experts": 12}),
           (4, "7MB", 11.54e6, "static-frequency", {**I4, "strategy": "hybrid"})]


@torch.inference_mode()
def _fake_quantize_nonexpert(model, bits: int) -> int:
    """Non-expert [out, in] weights rounded to int8 (per row) or int4 (groups of 32, scale + minimum);
    returns the bytes that would save against bf16."""
    saved = 0
    for name, p in model.named_parameters():
        if ".experts." in name or p.dim() != 2 or p.shape[-1] % 32:
            continue
        w = p.float()
        if bits == 8:
            scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
            p.copy_((torch.round(w / scale).clamp(-127, 127) * scale).to(p.dtype))
            saved += p.numel() * (p.element_size() - 1) - p.shape[0] * 2
        else:
            g = w.view(w.shape[0], -1, 32)
            lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            scale = (hi - lo).clamp(min=1e-12) / 15
            p.copy_((torch.round((g - lo) / scale).clamp(0, 15) * scale + lo).view_as(w).to(p.dtype))
            saved += int(p.numel() * (p.element_size() - 0.5)) - p.numel() // 32 * 4
    return saved


def what_if_runs(max_tokens: int) -> list[dict]:
    docs = read_documents(LM / "eval" / "heldout.txt")
    rows = []
    for bits, target, budget, policy, options in [(8, "all", None, "full", {}), (4, "all", None, "full", {}),
                                                  *WHAT_IF]:
        engine = pcmoe.load(LM, budget=budget and int(budget), policy=policy, progress=False, **options)
        saved = _fake_quantize_nonexpert(engine.model, bits)
        result = perplexity(engine, docs, max_tokens=max_tokens, progress=False)
        st = engine.stats()
        rows.append({**_row(target, policy, options), "nonexpert_bits": bits, "ppl": result["ppl"],
                     "weight_bytes": st["resident_bytes"] - saved, "committee_sizes": st["committee_sizes"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _options(r) -> str:
    return ", ".join(f"{k}={r[k]}" for k in ("quantize", "strategy", "shadow", "shadow_experts") if r.get(k))


def markdown(data: dict) -> str:
    full = next(r["ppl"] for r in data["lm"] if r["policy"] == "full" and "ppl" in r)
    out = [f"# Shadow experts: shipped LM, held-out ppl (first {data['max_tokens']} tokens; full {full:.2f})", "",
           "| budget | policy | options | ppl | x full | resident MB | committee | shadowed | exchanged | skipped |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["lm"]:
        if "error" in r:
            out.append(f"| {r['budget']} | {r['policy']} | {_options(r)} | - | - | - | - | - | - | "
                       f"{r['error'][:70]} |")
        else:
            out.append(f"| {r['budget'] or 'all'} | {r['policy']} | {_options(r)} | {r['ppl']:.2f} | "
                       f"{r['ppl'] / full:.3f} | {r['resident_bytes'] / 1e6:.2f} | {r['committee_sizes']} | "
                       f"{r['shadowed']} | {r['exchanged']} | {r['skipped']} |")
    out += ["", "## Best at each budget", "", "| budget | best without shadows | best with shadows |", "|---|---|---|"]
    for budget, (plain, shadow) in _best(data["lm"]).items():
        def cell(r):
            return f"{r['ppl']:.2f} ({r['policy']}, {_options(r)})" if r else "-"
        out.append(f"| {budget} | {cell(plain)} | {cell(shadow)} |")
    if data.get("vision"):
        out += ["", f"## Vision frame stream ({data['vision'][0]['frames']} frames)", "",
                "| budget | policy | options | accuracy | resident kB | committee |", "|---|---|---|---|---|---|"]
        out += [f"| {r['budget']} | {r['policy']} | {_options(r)} | {r['accuracy']:.4f} | "
                f"{r['resident_bytes'] / 1e3:.1f} | {r['committee_sizes']} |" for r in data["vision"]]
    if data.get("what_if"):
        out += ["", "## What if the non-expert weights were quantised too (simulated in place; bytes by arithmetic)",
                "", "| target | non-expert bits | policy | options | weights MB | ppl | x full |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['budget']} | {r['nonexpert_bits']} | {r['policy']} | {_options(r)} | "
                f"{r['weight_bytes'] / 1e6:.2f} | {r['ppl']:.2f} | {r['ppl'] / full:.3f} |" for r in data["what_if"]]
    if data.get("decode"):
        out += ["", "## Decode (one token, interleaved min of 5; ratios are what counts on a busy machine)", "",
                "| budget | policy | options | ms/token | speed vs first row | kernel |", "|---|---|---|---|---|---|"]
        out += [f"| {r['budget']} | {r['policy']} | {_options(r)} | {r['ms_per_token']:.3f} | "
                f"{r['speed_vs_first']:.3f} | {r['kernel']} |" for r in data["decode"]]
    return "\n".join(out) + "\n"


def _best(rows) -> dict:
    best: dict = {}
    for r in rows:
        if "ppl" not in r or r["budget"] is None:
            continue
        pair = best.setdefault(r["budget"], [None, None])
        i = int(r["shadows"])
        if pair[i] is None or r["ppl"] < pair[i]["ppl"]:
            pair[i] = r
    return best


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pcmoe.bench.common import savefig

    best = _best(data["lm"])
    full = next(r["ppl"] for r in data["lm"] if r["policy"] == "full" and "ppl" in r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, label in ((0, "best without shadows"), (1, "best with shadows (int2/int3 + chooser)")):
        pts = sorted((r["resident_bytes"] / 1e6, r["ppl"]) for r in (p[i] for p in best.values()) if r)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.axhline(full, color="grey", linestyle="--", label=f"full ({full:.2f})")
    ax.axhline(1.1 * full, color="grey", linestyle=":", label="1.10 x full")
    ax.set_xlabel("resident weight bytes (MB)")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("pcmoe-lm: shadow experts at equal weight memory")
    fig.tight_layout()
    savefig(fig, path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="12 MB and 14 MB only, no vision, no decode")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "shadow"))
    ap.add_argument("--only", choices=("lm", "what_if", "vision", "decode"),
                    help="run one section and merge it into the JSON already written")
    args = ap.parse_args()
    torch.set_num_threads(1)
    budgets = ("12MB", "14MB") if args.quick else tuple(WITH_SHADOW)
    sections = {"lm": lambda: lm_runs(args.max_tokens, budgets), "what_if": lambda: what_if_runs(args.max_tokens),
                "vision": lambda: vision_runs(args.frames), "decode": decode_runs}
    if args.only:
        data = json.loads(Path(args.out + ".json").read_text())
        data[args.only] = sections[args.only]()
    else:
        data = {"max_tokens": args.max_tokens}
        for name in ("lm",) if args.quick else sections:
            data[name] = sections[name]()
    atomic_write_text(Path(args.out + ".json"), json.dumps(data, indent=1))
    atomic_write_text(Path(args.out + ".md"), markdown(data))
    plot(data, Path(args.out + ".png"))
    print(f"wrote {args.out}.json, .md, .png")


if __name__ == "__main__":
    main()
