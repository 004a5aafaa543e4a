"""Decode speed with quantised non-expert weights (pcmoe/nonexpert.py) against bf16, in one run.

    .venv/bin/python benchmarks/nonexpert_decode.py --out docs/results/nonexpert_decode \
        [--model data/bench/scale/qwen3-moe-e32] [--rounds 5] [--tokens 32] [--threads 2]

Every configuration (bf16; int4 experts; int4 experts + int8 / int4 non-expert weights; int8
experts + int8 non-expert) is loaded once, all resident (policy full), then the rounds interleave
them: each round decodes --tokens more tokens greedily (after the same 8-token prompt, prefilled
once) in every configuration, in turn (the order rotated each round). Per configuration: the least ms/token
over the rounds (the run least disturbed by other work), the median, and the ratio
bf16 / configuration of the least times (speed-up). Bytes: non-expert and expert bytes as the engine holds them. Writes
nonexpert_decode.json and .md into --out (atomically). On a busy machine only the ratios within
one run mean something. The default model is the 1.3 GB random Qwen3-MoE of pcmoe/bench/scale.py
(pcmoe/bench/scaling.py builds the same shape under data/bench/scaling).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import pcmoe  # noqa: E402
from pcmoe.system import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # name -> (expert quantize, non-expert quantize[, attention op by op])
    "bf16": (None, None),
    "int4 experts": ("int4", None),
    "int4 experts + int8 non-expert": ("int4", "int8"),
    "int4 experts + int4 non-expert": ("int4", "int4"),
    "int8 experts + int8 non-expert": ("int8", "int8"),
    # the op-by-op twin of the fused quantised attention block (fast.LeanCausalLM.fused_quantized=False)
    "int4 experts + int4 non-expert (op by op)": ("int4", "int4", True),
}
DEFAULT = [n for n in CONFIGS if "op by op" not in n]
PROMPT = [11, 257, 1023, 42, 7, 4099, 310, 5]


class Decoder:
    """One configuration's greedy decode, continued across rounds: the prompt is prefilled once,
    so no round times right after a prefill (torch's threads still spinning beside the native
    pool's); every configuration sees the same context lengths."""

    def __init__(self, engine):
        self.engine = engine
        logits, self.state = engine.prefill(PROMPT)
        self.token = int(logits.argmax())

    def ms_per_token(self, tokens: int) -> float:
        t0 = time.perf_counter()
        for _ in range(tokens):
            self.token = int(self.engine.decode_step(self.state, self.token).argmax())
        return (time.perf_counter() - t0) * 1000 / tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "data" / "bench" / "scale" / "qwen3-moe-e32"))
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "nonexpert_decode"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", default=",".join(DEFAULT), help="comma-separated names of: " + ", ".join(CONFIGS))
    args = p.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    bad = [n for n in names if n not in CONFIGS]
    if bad or not Path(args.model, "config.json").exists():
        print(f"error: unknown configuration {bad[0]!r}" if bad else
              f"error: no model at {args.model} (build it with pcmoe/bench/scale.py)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    engines, info = {}, {}
    for name in names:
        quant, nonexpert, *op_by_op = CONFIGS[name]
        engine = pcmoe.load(args.model, policy="full", quantize=quant, nonexpert_quantize=nonexpert,
                            threads=args.threads, progress=False)
        if op_by_op and engine.fast is not None:
            engine.fast.fused_quantized = False
        stats = engine.stats()
        engines[name] = engine
        info[name] = {"quantize": quant or "full", "nonexpert_precision": stats["nonexpert_precision"],
                      "nonexpert_bytes": stats["nonexpert_bytes"],
                      "expert_bytes": stats["resident_expert_bytes"], "kernel": engine.load_info["kernel"]}
    decoders = {name: Decoder(engine) for name, engine in engines.items()}
    for decoder in decoders.values():
        decoder.ms_per_token(8)  # warm-up: first-call allocations
    times = {name: [] for name in names}
    with torch.inference_mode():
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:   # each takes every turn in turn
                times[name].append(decoders[name].ms_per_token(args.tokens))
    for engine in engines.values():
        engine.close()
    base = min(times[names[0]])
    rows = []
    for name in names:
        best = min(times[name])
        rows.append({"config": name, **info[name], "ms_per_token_min": best,
                     "ms_per_token_median": statistics.median(times[name]), "ms_per_token_all": times[name],
                     f"speedup_vs_{names[0]}": base / best})
    result = {"model": args.model, "threads": args.threads, "rounds": args.rounds, "tokens": args.tokens,
              "commit": _commit(), "note": "interleaved rounds; least time per configuration; contended machines: "
                                           "ratios only", "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "nonexpert_decode.json", json.dumps(result, indent=1))
    md = [f"# Decode with quantised non-expert weights ({Path(args.model).name})", "",
          f"`benchmarks/nonexpert_decode.py`, commit {result['commit']}, {args.threads} threads, {args.rounds} "
          f"interleaved rounds of {args.tokens} tokens; least ms/token per configuration.", "",
          f"| configuration | non-expert | non-expert MB | expert MB | ms/token (min) | median | speed-up vs "
          f"{names[0]} |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['config']} | {r['nonexpert_precision']} | {r['nonexpert_bytes'] / 1e6:.1f} | "
                  f"{r['expert_bytes'] / 1e6:.1f} | {r['ms_per_token_min']:.2f} | {r['ms_per_token_median']:.2f} | "
                  f"{r[f'speedup_vs_{names[0]}']:.2f}x |")
    atomic_write_text(out / "nonexpert_decode.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
