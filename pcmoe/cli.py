"""Command line: pcmoe <command> --help for each.

  info      what a checkpoint holds and the smallest budget it can be served in
  generate  stream text under a budget, then a statistics table
  eval      perplexity of a document stream (or accuracy of a frame stream) under a budget
  profile   record which experts a text uses (for static-frequency and warm starts)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from pcmoe.args import add_load_options, add_model, engine_from_args, print_stats
from pcmoe.budget import format_bytes as _fmt_bytes

# -- commands ---------------------------------------------------------------------------------


def cmd_info(args) -> int:
    import torch

    from pcmoe.engine import inspect

    info = inspect(args.model)  # headers and a meta skeleton: works for models larger than RAM
    info["torch"] = torch.__version__
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['model']}: {info['model_type']}, {info['moe_layers']} MoE layers x {info['experts_per_layer']} "
          f"experts (top-{info['experts_per_token']}), weights {info['dtype']}")
    print(f"  non-expert weights   {_fmt_bytes(info['nonexpert_bytes'])}")
    print(f"  one expert           {_fmt_bytes(info['expert_bytes'])}")
    print(f"  all experts          {_fmt_bytes(info['all_expert_bytes'])} "
          f"({info['all_expert_bytes'] / info['full_model_bytes']:.1%} of the weights)")
    print(f"  full model           {_fmt_bytes(info['full_model_bytes'])}")
    print(f"  minimum budget       {_fmt_bytes(info['minimum_budget_static'])} (one expert per MoE layer); "
          f"{_fmt_bytes(info['minimum_budget_committee'])} for a committee with a spare slot per layer")
    return 0


def cmd_generate(args) -> int:
    engine = engine_from_args(args)
    try:
        prompt = args.prompt
        if args.chat:
            if engine.tokenizer is None or not getattr(engine.tokenizer, "chat_template", None):
                raise SystemExit("error: --chat needs a tokenizer with a chat template")
            prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                          tokenize=False, add_generation_prompt=True)
        last = None
        print(args.prompt if not args.chat else "", end="", flush=True)
        for step in engine.generate(prompt, max_new_tokens=args.max_tokens, temperature=args.temperature,
                                    top_p=args.top_p, seed=args.seed_sample, stop=args.stop):
            print(step.text, end="", flush=True)
            last = step
        print()
        if last is not None:
            n = last.index + 1
            decode_tps = (n - 1) / last.decode_s if n > 1 and last.decode_s > 0 else 0.0
            print(f"\n{last.prompt_tokens} prompt tokens in {last.prefill_s:.3f} s, {n} generated at "
                  f"{decode_tps:.1f} tok/s (finish: {last.finish_reason})")
            print_stats(last.stats)
            if args.json:
                print(json.dumps({k: v for k, v in last.stats.items() if k != "per_layer"}))
    finally:
        engine.close()
    return 0


def cmd_eval(args) -> int:
    from pcmoe.system import peak_rss_bytes, rss_bytes

    baseline_rss = rss_bytes()
    engine = engine_from_args(args)
    try:
        if engine.family.seq2seq:
            raise SystemExit("error: eval supports decoder-only LMs and the pcmoe vision MoE")
        if engine.config.model_type == "pcmoe_vit_moe":
            from pcmoe.models.vit_moe import evaluate_stream

            result = evaluate_stream(engine, args.data, frames=args.frames, seed=args.stream_seed,
                                     progress=not args.quiet and sys.stderr.isatty())
        else:
            from pcmoe.evaluate import perplexity, read_documents

            if not args.data:
                raise SystemExit("error: eval of a language model needs --data FILE.txt")
            result = perplexity(engine, read_documents(args.data), window=args.window, max_tokens=args.max_tokens,
                                progress=not args.quiet and sys.stderr.isatty(), chunk=args.chunk)
        stats = engine.stats()
    finally:
        engine.close()
    summary = dict(result)
    for k in ("budget_bytes", "resident_bytes", "resident_expert_bytes", "nonexpert_bytes", "full_model_bytes",
              "hit_rate", "router_mass_outside", "bytes_read", "stall_s", "swaps", "swap_failures", "exchanged",
              "skipped", "committee_sizes", "policy"):
        summary[k] = stats[k]
    summary["peak_rss_bytes"] = peak_rss_bytes()
    summary["runtime_rss_before_load_bytes"] = baseline_rss
    summary["model"] = str(args.model)
    if "ppl" in result:
        print(f"perplexity {result['ppl']:.3f} over {result['tokens']} tokens of {result['documents']} documents, "
              f"{result['tokens_per_s']:.1f} tok/s")
    else:
        print(f"accuracy {result['accuracy']:.4f} over {result['frames']} frames, "
              f"{result['frames_per_s']:.1f} frames/s")
    print_stats(stats)
    print(json.dumps(summary))
    return 0


def cmd_profile(args) -> int:
    from pathlib import Path

    from pcmoe.evaluate import perplexity, read_documents
    from pcmoe.system import atomic_write_text

    args.policy = "on-demand" if args.budget else "full"  # exact routing either way
    args.track_importance = True
    engine = engine_from_args(args)
    try:
        result = perplexity(engine, read_documents(args.data), window=args.window, max_tokens=args.max_tokens,
                            progress=not args.quiet and sys.stderr.isatty())
        profile = engine.importance_profile()
    finally:
        engine.close()
    profile["tokens"] = result["tokens"]
    profile["source"] = os.path.basename(args.data)
    atomic_write_text(Path(args.out), json.dumps(profile))
    print(f"wrote {args.out}: routing of {result['tokens']} tokens (ppl {result['ppl']:.2f})")
    return 0


# -- entry point ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pcmoe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("info", help="describe a checkpoint and its minimum budget")
    add_model(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate text under a memory budget")
    add_load_options(p)
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed-sample", type=int, help="sampling seed")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--json", action="store_true", help="also print the statistics as one JSON line")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="perplexity (LM) or frame-stream accuracy (vision) under a budget")
    add_load_options(p)
    p.add_argument("--data", help="text file of documents (separated by a blank line + '=====' or form feeds); "
                                  "vision: omit for the Fashion-MNIST test frame stream")
    p.add_argument("--window", type=int, default=256, help="context window per scored piece (default 256)")
    p.add_argument("--chunk", type=int, default=32, help="tokens per forward step within a window (default 32)")
    p.add_argument("--max-tokens", type=int, help="stop after this many scored tokens")
    p.add_argument("--frames", type=int, default=2000, help="vision: frames in the stream (default 2000)")
    p.add_argument("--stream-seed", type=int, default=0, help="vision: frame-stream seed")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("profile", help="record expert usage on a text (static-frequency, warm starts)")
    add_load_options(p)
    p.add_argument("--data", required=True, help="profiling text (same format as eval)")
    p.add_argument("--out", required=True, help="output profile JSON")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--max-tokens", type=int)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("bench", help="the memory/quality/speed benchmark suite (writes JSON, Markdown, PNG)",
                       description=_bench_doc(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _bench_arguments(p)
    p.set_defaults(func=lambda args: __import__("pcmoe.bench.suite", fromlist=["cmd_bench"]).cmd_bench(args))

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the [server] extra)")
    add_load_options(p)
    p.set_defaults(func=lambda args: _optional("pcmoe.server", "server").cmd_serve(args))
    _optional_arguments("pcmoe.server", "add_serve_arguments", p)

    p = sub.add_parser("chat", help="interactive terminal chat against the engine or a running server")
    add_load_options(p)
    p.set_defaults(func=lambda args: _optional("pcmoe.chat", "server").cmd_chat(args))
    _optional_arguments("pcmoe.chat", "add_chat_arguments", p)
    return ap


def _bench_doc() -> str:
    from pcmoe.bench import suite

    return suite.__doc__


def _bench_arguments(p) -> None:
    from pcmoe.bench import suite

    suite.add_arguments(p)


def _optional(module: str, extra: str):
    """Import a module that needs an optional extra, or exit with the install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SystemExit(f"error: {e.name} is not installed; pip install 'pcmoe[{extra}]'") from None


def _optional_arguments(module: str, function: str, parser: argparse.ArgumentParser) -> None:
    """Let an optional module add its own command-line arguments (if it imports)."""
    import importlib

    try:
        getattr(importlib.import_module(module), function)(parser)
    except (ImportError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    args = build_parser().parse_args(argv)
    from pcmoe.options import PcmoeError

    try:
        return args.func(args)
    except PcmoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
