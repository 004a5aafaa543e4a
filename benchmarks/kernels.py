"""Micro-benchmark of pcmoe's batch-1 expert projections (y = W x) against the memory floor.

    .venv/bin/python benchmarks/kernels.py --out results/kernels [--threads 1,2] [--quick]

For the expert shapes of the shipped LM (models/pcmoe-lm) and of the scaling study's 1.3 GB
checkpoint (pcmoe/bench/scaling.py "mid": hidden 1024, expert width 768), each weight kind
(gate_up [2I, H], down [H, I]; and that model's LM head [V, H]) at bf16, int8 and int4 (the
VNNI kernels, and the float32 kernels they replace), the native product is timed

  cold: cycling over copies of the weight that together exceed the last-level cache many times,
        as a decode step meets its experts (each read once per token, from memory), and
  hot:  one weight again and again (cache-resident: what the arithmetic alone allows),

and compared with the time a plain 512-bit read of the same bytes takes (the bandwidth floor,
measured here on the same threads). Bytes include the scales. Writes kernels.json and kernels.md
into --out (atomically). Timings on a busy machine are only good as ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pcmoe import native  # noqa: E402
from pcmoe.bench.scaling import SHAPES  # noqa: E402
from pcmoe.native import ops  # noqa: E402
from pcmoe.quant import quantize_into, quantized_shapes  # noqa: E402
from pcmoe.system import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COLD_BYTES = 256 << 20          # working set of the cold runs (8x a 32 MB L3)
KINDS = ("bf16", "int8", "int8-f32", "int4", "int4-f32")


def weight_shapes() -> list[tuple[str, str, tuple[int, int]]]:
    """(model, weight, [out, in]): each model's expert projections, and the 1.3 GB model's LM head
    (a dense weight each token reads in full: what quantising experts alone leaves at bf16)."""
    shapes = []
    cfg = ROOT / "models" / "pcmoe-lm" / "config.json"
    if cfg.exists():
        c = json.loads(cfg.read_text())
        H, I = c["hidden_size"], c["moe_intermediate_size"]
        shapes += [("shipped LM", "gate_up", (2 * I, H)), ("shipped LM", "down", (H, I))]
    mid = SHAPES["mid"]
    H, I = mid["hidden_size"], mid["moe_intermediate_size"]
    shapes += [("1.3 GB scale", "gate_up", (2 * I, H)), ("1.3 GB scale", "down", (H, I)),
               ("1.3 GB scale", "lm_head", (mid["vocab_size"], H))]
    return shapes


def make_weight(kind: str, out_f: int, in_f: int) -> tuple[list[torch.Tensor], int]:
    """The tensors of one [out, in] weight at `kind` and their bytes."""
    g = torch.Generator().manual_seed(out_f * 7 + in_f)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    if kind == "bf16":
        t = [w.bfloat16()]
    else:
        mode = kind.split("-")[0]
        shapes = quantized_shapes((out_f, in_f), mode)
        q = torch.empty(shapes[".q"][0], dtype=shapes[".q"][1])
        s = torch.empty(shapes[".s"][0], dtype=torch.bfloat16)
        quantize_into(w, q, s, mode)
        t = [q, s]
    return t, sum(x.numel() * x.element_size() for x in t)


def caller(k, kind: str, tensors: list[torch.Tensor], out_f: int, in_f: int):
    """A zero-argument call of the native product on these tensors (arguments bound once)."""
    y = torch.empty(out_f)
    if kind == "bf16":
        x = torch.randn(in_f).bfloat16()
        w = tensors[0]
        return lambda: k.gemv_bf16(w.data_ptr(), x.data_ptr(), y.data_ptr(), out_f, in_f)
    x = torch.randn(in_f)
    mode, vnni = kind.split("-")[0], int(not kind.endswith("-f32"))
    q, s = tensors
    group = in_f // s.shape[0] if mode == "int4" else 0
    work = torch.empty(k.act_scratch_floats(in_f))
    args = (ops.QUANT_CODES[mode], vnni, q.data_ptr(), s.data_ptr(), 0, group, x.data_ptr(), y.data_ptr(), out_f,
            in_f, work.data_ptr())
    keep = (q, s, x, y, work)  # the pointers in args live as long as the call

    def call():
        k.gemv_quant(*args)
        return keep
    return call


def time_calls(calls: list, repeats: int, min_s: float) -> float:
    """Seconds per call: the best over `repeats` rounds of at least min_s each through `calls`."""
    best = float("inf")
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            for c in calls:
                c()
            n += len(calls)
            dt = time.perf_counter() - t0
            if dt >= min_s:
                break
        best = min(best, dt / n)
    return best


def bandwidth(k, repeats: int) -> float:
    """Bytes per second of a plain read of COLD_BYTES."""
    buf = torch.ones(COLD_BYTES, dtype=torch.uint8)
    k.stream_read(buf.data_ptr(), COLD_BYTES)
    best = float("inf")
    for _ in range(repeats * 2):
        t0 = time.perf_counter()
        k.stream_read(buf.data_ptr(), COLD_BYTES)
        best = min(best, time.perf_counter() - t0)
    return COLD_BYTES / best


def run(threads: list[int], quick: bool) -> dict:
    k = native.kernels()
    if k is None:
        raise SystemExit(f"error: {native.why()}")
    repeats, min_s = (2, 0.05) if quick else (5, 0.15)
    rows, floors = [], {}
    try:
        for n in threads:
            k.set_threads(n)
            floors[n] = bandwidth(k, repeats)
            for model, weight, (out_f, in_f) in weight_shapes():
                calls, nbytes = {}, {}
                for kind in KINDS:
                    tensors, nbytes[kind] = make_weight(kind, out_f, in_f)
                    copies = [tensors] + [[t.clone() for t in tensors]
                                          for _ in range(max(1, COLD_BYTES // nbytes[kind]) - 1)]
                    calls[kind] = [caller(k, kind, c, out_f, in_f) for c in copies]
                # Kinds take turns in every round, so a busy spell slows them alike: ratios hold.
                cold, hot = {kind: [] for kind in KINDS}, {kind: [] for kind in KINDS}
                for _ in range(repeats):
                    for kind in KINDS:
                        cold[kind].append(time_calls(calls[kind], 1, min_s))
                        hot[kind].append(time_calls(calls[kind][:1], 1, min_s / 2))
                del calls
                base = min(cold["bf16"])
                for kind in KINDS:
                    c, h, b = min(cold[kind]), min(hot[kind]), nbytes[kind]
                    rows.append({"threads": n, "model": model, "weight": weight, "shape": [out_f, in_f],
                                 "kind": kind, "bytes": b, "cold_us": c * 1e6, "hot_us": h * 1e6,
                                 "cold_gbps": b / c / 1e9, "hot_gbps": b / h / 1e9,
                                 "floor_us": b / floors[n] * 1e6, "of_floor": b / floors[n] / c,
                                 "speedup_vs_bf16": base / c})
    finally:
        k.set_threads(1)
    return {"benchmark": "kernels", "vnni": k.vnni, "torch": torch.__version__, "cold_bytes": COLD_BYTES,
            "read_gbps": {str(n): bw / 1e9 for n, bw in floors.items()}, "rows": rows}


def markdown(result: dict) -> str:
    lines = ["# Batch-1 expert projections against the memory floor", "",
             f"Native kernels (VNNI: {'yes' if result['vnni'] else 'no'}); plain read: " +
             ", ".join(f"{n} thread(s) {g:.1f} GB/s" for n, g in result["read_gbps"].items()) +
             ". cold = from memory (working set "
             f"{result['cold_bytes'] >> 20} MB), hot = cache-resident. of floor = read time of the same bytes "
             "/ product time (1.0 = at bandwidth). `-f32` = the float32 kernels the VNNI ones replace.", "",
             "| threads | model | weight [out, in] | kind | KB | cold µs | cold GB/s | of floor | hot GB/s | "
             "vs bf16 (cold) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['threads']} | {r['model']} | {r['weight']} {r['shape']} | {r['kind']} | "
                     f"{r['bytes'] / 1024:.0f} | {r['cold_us']:.1f} | {r['cold_gbps']:.1f} | {r['of_floor']:.2f} | "
                     f"{r['hot_gbps']:.1f} | {r['speedup_vs_bf16']:.2f}× |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/kernels", help="folder for kernels.json and kernels.md")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--quick", action="store_true", help="shorter timings (a smoke test)")
    args = ap.parse_args(argv)
    try:
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        print(f"error: --threads wants numbers like 1,2 (got {args.threads!r})", file=sys.stderr)
        return 2
    result = run(threads, args.quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "kernels.json", json.dumps(result, indent=1))
    atomic_write_text(out / "kernels.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
