"""Where the committee's decode time goes: greedy decoding of one prompt with policy full and
with the committee (async and sync swaps) at one budget, interleaved rounds, the fastest round of
each kept, and a per-part breakdown (full's rows for reference) of the committee's own work (masked routing, importance
tracking, the scheduler's step boundary, waits for in-flight swaps). Part times come from wrapping
the methods with perf_counter (a few hundred ns each); the totals come from unwrapped rounds.
Writes <out>/committee_decode.json and .md; the last stdout line is the JSON summary.

    python benchmarks/committee_decode.py --model models/pcmoe-lm --budget 50%experts \\
        --tokens 200 --rounds 5 --out docs/results/committee_decode
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import pcmoe  # noqa: E402
from pcmoe import policies, scheduler  # noqa: E402
from pcmoe.generation import generate  # noqa: E402
from pcmoe.system import atomic_write_text  # noqa: E402

PROMPT = "The history of the city begins"
# part name -> (owner, method): the committee's own work per step
PARTS = {
    "controller forward (one token)": (policies.MaskedGatingController, "_forward_one"),
    "  masked routing (gate_one)": (policies, "gate_one"),
    "  importance tracking": (policies.LayerController, "_track_one"),
    "scheduler begin_step": (scheduler.SwapScheduler, "begin_step"),
    "  wait + switch in-flight swaps": (scheduler.SwapScheduler, "_apply_inflight"),
    "  update (close windows, plan)": (scheduler.SwapScheduler, "update"),
    "  issue loads": (scheduler.SwapScheduler, "_issue"),
}


def decode(engine, tokens: int) -> tuple[float, list[int], dict]:
    out, stats = [], {}
    t0 = time.perf_counter()
    for step in generate(engine, PROMPT, max_new_tokens=tokens, stop_on_eos=False):
        out.append(step.token_id)
        stats = step.stats or stats
    return time.perf_counter() - t0, out, stats


class Timers:
    """Wraps the PARTS methods while active; seconds per part."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self._saved = []

    def __enter__(self):
        for name, (owner, attr) in PARTS.items():
            original = getattr(owner, attr)
            self._saved.append((owner, attr, original))
            setattr(owner, attr, self._timed(name, original))
        return self

    def _timed(self, name, original):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
        return timed

    def __exit__(self, *exc):
        for owner, attr, original in reversed(self._saved):
            setattr(owner, attr, original)
        self._saved = []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/pcmoe-lm")
    ap.add_argument("--budget", default="50%experts")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/results/committee_decode")
    args = ap.parse_args(argv)
    if args.tokens < 2 or args.rounds < 1:
        sys.exit("error: --tokens must be at least 2 and --rounds at least 1")
    torch.set_num_threads(args.threads)
    configs = {"full": ("full", None, {}),
               "committee": ("committee", args.budget, {}),
               "committee sync": ("committee", args.budget, {"synchronous": True})}
    try:
        engines = {name: pcmoe.load(args.model, budget=budget, policy=policy, **opts)
                   for name, (policy, budget, opts) in configs.items()}
    except pcmoe.PcmoeError as e:
        sys.exit(f"error: {e}")
    best: dict[str, float] = {}
    tokens: dict[str, list[int]] = {}
    counters: dict[str, dict] = {}
    for engine in engines.values():   # warm-up
        decode(engine, min(20, args.tokens))
    for _ in range(args.rounds):
        for name, engine in engines.items():
            seconds, out, stats = decode(engine, args.tokens)
            best[name] = min(best.get(name, seconds), seconds)
            tokens.setdefault(name, out)
            counters[name] = {k: v for k, v in stats.items() if isinstance(v, (int, float)) and "_s" not in k}
    parts: dict[str, dict[str, float]] = {}
    for name in ("full", "committee", "committee sync"):
        fastest = None
        for _ in range(args.rounds):
            with Timers() as timers:
                seconds, _, _ = decode(engines[name], args.tokens)
            if fastest is None or seconds < fastest[0]:
                fastest = (seconds, dict(timers.seconds))
        parts[name] = {k: v / args.tokens * 1e3 for k, v in fastest[1].items()}
    ms = {k: v / args.tokens * 1e3 for k, v in best.items()}
    summary = {
        "command": "python benchmarks/committee_decode.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "model": args.model, "budget": args.budget, "tokens": args.tokens, "rounds": args.rounds,
        "threads": args.threads,
        "ms_per_token": ms,
        "speed_vs_full": {k: ms["full"] / v for k, v in ms.items()},
        "parts_ms_per_token": parts,
        "committee_sync_equals_async": tokens["committee"] == tokens["committee sync"],
        "committee_tokens_head": tokens["committee"][:16],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "committee_decode.json", json.dumps(summary, indent=1))
    lines = [f"# Committee decode breakdown ({args.model}, budget {args.budget})", "",
             f"`{summary['command']}`: {args.tokens} tokens greedy, fastest of {args.rounds} interleaved rounds,"
             f" {args.threads} thread(s).", "",
             "| configuration | ms/token | speed vs full |", "|---|---|---|"]
    lines += [f"| {k} | {v:.3f} | {summary['speed_vs_full'][k]:.2f}x |" for k, v in ms.items()]
    lines += ["", "Committee parts (ms/token, from the fastest timed round; indented rows are inside the row above):",
              "", "| part | full | committee | committee sync |", "|---|---|---|---|"]
    for name in PARTS:
        cells = " | ".join(f"{parts[c].get(name, 0.0):.4f}" for c in ("full", "committee", "committee sync"))
        lines.append(f"| {name.replace(' ', '&nbsp;', 2) if name.startswith('  ') else name} | {cells} |")
    lines += ["", f"committee sync == async tokens: {summary['committee_sync_equals_async']}", ""]
    atomic_write_text(out / "committee_decode.md", "\n".join(lines))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
