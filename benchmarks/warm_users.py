"""Per-user warm committees vs one shared committee, for users with different topics.

Simulated users each read documents of their own topic, and their requests interleave: u0 d0, u1 d0,
u2 d0, u0 d1, ... Two conditions, each on a freshly loaded engine:

  shared    one committee serves the interleaved stream: every user inherits the previous user's experts
  per-user  before each document the user's saved committee state is restored (engine.load_state), and
            saved after it (engine.save_state), as `pcmoe serve` does for requests with a `user` field

plus the all-resident model as a reference (--no-reference skips it). Reported per condition: perplexity
(token-weighted over all documents), hit rate and router mass outside the committee; per user: perplexity
and hit rate. Writes warm_users.json and warm_users.md under --out; the last stdout line is the JSON.

    python benchmarks/warm_users.py --model models/pcmoe-lm --budget 50%experts \\
        --data data/corpus/val_pydoc.txt data/corpus/val_linuxdoc.txt data/corpus/val_stdlib.txt

With one --data file, its documents are split into --users contiguous blocks (one topic each, if the
file is ordered by topic); with several, each file is one user's topic.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from pcmoe.args import add_load_options, engine_from_args
from pcmoe.evaluate import perplexity, read_documents
from pcmoe.system import atomic_write_text

DEFAULT_DATA = [f"data/corpus/val_{d}.txt" for d in ("pydoc", "linuxdoc", "stdlib")]


def user_documents(files: list[str], users: int | None, per_user: int) -> dict[str, list[str]]:
    """{user name: documents}, one topic per user."""
    if len(files) > 1:
        if users is not None and users != len(files):
            raise SystemExit(f"error: --users {users} with {len(files)} --data files (one file per user)")
        out = {}
        for f in files:
            name = Path(f).stem
            out[name if name not in out else f"{name}-{len(out)}"] = read_documents(f)[:per_user]
        return out
    docs = read_documents(files[0])
    users = users or 3
    block = len(docs) // users
    if block < 1:
        raise SystemExit(f"error: {files[0]} has {len(docs)} documents, fewer than --users {users}")
    return {f"user{u}": docs[u * block:(u + 1) * block][:per_user] for u in range(users)}


def interleave(docs: dict[str, list[str]]) -> list[tuple[str, str]]:
    rounds = max(len(d) for d in docs.values())
    return [(user, d[i]) for i in range(rounds) for user, d in docs.items() if i < len(d)]


def run(args, condition: str, stream: list[tuple[str, str]]) -> dict:
    """Score the interleaved stream on a fresh engine; condition: shared | per-user | reference."""
    if condition == "reference":
        args = argparse.Namespace(**{**vars(args), "policy": "full", "budget": None})
    engine = engine_from_args(args)
    states: dict[str, dict] = {}
    per_user: dict[str, dict] = {}
    t0 = time.perf_counter()
    try:
        engine.reset_stats()
        for user, doc in stream:
            if condition == "per-user" and user in states:
                engine.load_state(states[user])
            before = engine.stats()
            # the characters of about max_tokens tokens (and more): no need to tokenise a whole book
            result = perplexity(engine, [doc[:args.max_tokens_per_doc * 16]], window=args.window,
                                max_tokens=args.max_tokens_per_doc, progress=False)
            after = engine.stats()
            if condition == "per-user":  # through JSON, as the server stores it
                states[user] = json.loads(json.dumps(engine.save_state()))
            u = per_user.setdefault(user, {"nll": 0.0, "tokens": 0, "hits": 0, "choices": 0, "documents": 0})
            u["nll"] += result["nll_per_token"] * result["tokens"]
            u["tokens"] += result["tokens"]
            u["hits"] += after["hits"] - before["hits"]
            u["choices"] += after["choices"] - before["choices"]
            u["documents"] += 1
        stats = engine.stats()
    finally:
        engine.close()
    nll = sum(u["nll"] for u in per_user.values())
    tokens = sum(u["tokens"] for u in per_user.values())
    return {
        "condition": condition,
        "ppl": math.exp(nll / tokens) if tokens else float("nan"),
        "tokens": tokens,
        "documents": len(stream),
        "hit_rate": stats["hit_rate"],
        "router_mass_outside": stats["router_mass_outside"],
        "swaps": stats["swaps"],
        "bytes_read": stats["bytes_read"],
        "stall_s": stats["stall_s"],
        "resident_bytes": stats["resident_bytes"],
        "committee_sizes": stats["committee_sizes"],
        "seconds": time.perf_counter() - t0,
        "users": {name: {"ppl": math.exp(u["nll"] / u["tokens"]) if u["tokens"] else float("nan"),
                         "hit_rate": u["hits"] / u["choices"] if u["choices"] else 1.0,
                         "tokens": u["tokens"], "documents": u["documents"]} for name, u in per_user.items()},
    }


def markdown(summary: dict) -> str:
    runs = summary["results"]
    lines = [f"# Warm committees per user: {summary['model']}, budget {summary['budget']}",
             "",
             f"{len(summary['users'])} users ({', '.join(summary['users'])}), {summary['documents_per_user']} "
             f"documents each, interleaved; up to {summary['max_tokens_per_doc']} scored tokens per document; "
             f"policy {summary['policy']}, commit {summary['commit']}.",
             "",
             "| condition | perplexity | hit rate | router mass outside | swaps | bytes read | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['condition']} | {r['ppl']:.3f} | {r['hit_rate']:.3f} | {r['router_mass_outside']:.3f} | "
                     f"{r['swaps']} | {r['bytes_read']} | {r['seconds']:.1f} |")
    lines += ["", "Per user (perplexity / hit rate):", "",
              "| user | " + " | ".join(r["condition"] for r in runs) + " |",
              "|---|" + "---:|" * len(runs)]
    for user in summary["users"]:
        cells = [f"{r['users'][user]['ppl']:.3f} / {r['users'][user]['hit_rate']:.3f}" for r in runs]
        lines.append(f"| {user} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_options(ap)
    ap.set_defaults(budget="50%experts")
    ap.add_argument("--data", nargs="+", help="one file per user (or one file split into --users blocks); default: "
                    "the val corpora under data/corpus if present, else <model>/eval/heldout.txt split")
    ap.add_argument("--users", type=int, help="users when --data is one file (default 3)")
    ap.add_argument("--docs-per-user", type=int, default=4, help="documents per user (default 4)")
    ap.add_argument("--max-tokens-per-doc", type=int, default=512, help="scored tokens per document (default 512)")
    ap.add_argument("--window", type=int, default=256, help="tokens per forward pass (default 256)")
    ap.add_argument("--no-reference", action="store_true", help="skip the all-resident reference run")
    ap.add_argument("--out", default="results/warm_users", help="output folder (default results/warm_users)")
    args = ap.parse_args(argv)
    args.quiet = True

    if not args.data:  # a clean clone has no data/: the model's shipped eval text, split into users
        shipped = Path(args.model) / "eval" / "heldout.txt"
        args.data = DEFAULT_DATA if all(Path(f).exists() for f in DEFAULT_DATA) else [str(shipped)]
    missing = [f for f in args.data if not Path(f).exists()]
    if missing:
        raise SystemExit(f"error: {missing[0]} does not exist; pass --data FILE.txt [FILE.txt ...]")
    docs = user_documents(args.data, args.users, args.docs_per_user)
    stream = interleave(docs)
    conditions = ["shared", "per-user"] + ([] if args.no_reference else ["reference"])
    results = []
    for condition in conditions:
        r = run(args, condition, stream)
        print(f"{condition:>9}: ppl {r['ppl']:.3f}, hit rate {r['hit_rate']:.3f}, router mass outside "
              f"{r['router_mass_outside']:.3f}, {r['swaps']} swaps ({r['seconds']:.1f} s)", file=sys.stderr)
        results.append(r)
    summary = {"model": str(args.model), "budget": args.budget, "policy": args.policy, "users": list(docs),
               "documents_per_user": args.docs_per_user, "max_tokens_per_doc": args.max_tokens_per_doc,
               "window": args.window, "update_every": args.update_every, "update_unit": args.update_unit,
               "data": args.data, "commit": _commit(), "results": results}
    out = Path(args.out)
    atomic_write_text(out / "warm_users.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "warm_users.md", markdown(summary))
    print(markdown(summary))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
