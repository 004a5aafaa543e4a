"""The pcmoe command. Only the chosen command's parser is built, and its arguments and paths are
checked before torch is imported: `pcmoe --help` and a mistyped path answer at once, and
`pcmoe info` never imports the server or the benchmarks."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings

from pcmoe.args import (
    add_load_options,
    add_model,
    check_input_file,
    check_load_args,
    engine_from_args,
    has_tokenizer,
    print_stats,
    read_model_config,
)
from pcmoe.budget import format_bytes as _fmt_bytes
from pcmoe.options import OptionError, PcmoeError, PcmoeWarning, check_sampling, check_text

VISION_TYPE = "pcmoe_vit_moe"  # the pcmoe vision MoE's model_type (pcmoe.models.vit_moe.MODEL_TYPE)
# the files vit_moe.load_fashion_mnist reads for the test split (a test keeps the two in step)
VISION_TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
MIN_SCORED_TOKENS = 100        # fewer, and a perplexity says little: warn

# -- checks before any heavy import -------------------------------------------------------------

# CLI flags whose name is not the API's parameter name with dashes.
_FLAGS = {"seed": "--seed-sample"}


def _flag(param: str) -> str:
    return _FLAGS.get(param, "--" + param.replace("_", "-"))


def _check_sampling(args, seed=None) -> None:
    for name in ("prompt", "system", "user"):
        if isinstance(getattr(args, name, None), str):
            check_text(getattr(args, name), name, from_bytes=True)
    for s in getattr(args, "stop", None) or []:
        check_text(s, "stop", from_bytes=True)
    check_sampling(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=seed,
                   stop=getattr(args, "stop", None))


def _check_positive(**values) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise OptionError(name, "must be at least 1", value)


def _check_language_model(args, config: dict, command: str) -> None:
    """The command turns text into tokens: the checkpoint must have a tokenizer."""
    if config.get("model_type") == VISION_TYPE:
        raise PcmoeError(f"{args.model} is an image classifier ({VISION_TYPE}); `pcmoe {command}` needs a "
                         "language model (`pcmoe eval` runs this one on a frame stream)")
    if not has_tokenizer(args.model):
        raise PcmoeError(_no_tokenizer(args.model, command))


def _no_tokenizer(model, command: str) -> str:
    return (f"{model} has no tokenizer, so `pcmoe {command}` cannot turn text into tokens; give token ids "
            "instead through the Python API (pcmoe.load(...).generate([ids])) or `pcmoe serve` (a completion's "
            "prompt may be a list of token ids)")


def _check_data_file(args) -> None:
    check_input_file(args.data, "data file", " of documents (text, UTF-8)")


def check_info(args) -> None:
    read_model_config(args.model)


def check_generate(args) -> None:
    _check_sampling(args, seed=args.seed_sample)
    _check_language_model(args, check_load_args(args), "generate")


def check_eval(args) -> None:
    config = check_load_args(args)
    if config.get("model_type") == VISION_TYPE:
        _check_positive(frames=args.frames)
        where = (f"the vision eval reads the folder that holds Fashion-MNIST's {' and '.join(VISION_TEST_FILES)} "
                 "(omit --data for the installed copy)")
        if args.data is not None and not os.path.isdir(args.data):
            raise PcmoeError(f"--data {args.data} " + ("is a file" if os.path.exists(args.data) else "does not exist")
                             + f"; {where}")
        for name in VISION_TEST_FILES if args.data is not None else ():
            if not os.path.isfile(os.path.join(args.data, name)):
                raise PcmoeError(f"{args.data} has no {name}; {where}")
        return
    if not args.data:
        raise PcmoeError("eval of a language model needs --data FILE.txt (documents separated by a blank line "
                         "and '=====', or by form feeds)")
    _check_data_file(args)
    if args.window < 1 or args.chunk < 1:
        raise PcmoeError(f"window and chunk must be positive integers (got --window {args.window}, "
                         f"--chunk {args.chunk})")
    _check_positive(max_tokens=args.max_tokens)
    _check_language_model(args, config, "eval")


def check_profile(args) -> None:
    from pcmoe.system import check_writable

    if args.policy is not None:
        raise PcmoeError("profile records the model's exact routing (policy full, or on-demand under --budget); "
                         "drop --policy")
    if args.memory is not None:
        raise PcmoeError("profile records the model's exact routing, with every expert resident (or --budget); "
                         "drop --memory")
    args.policy = "on-demand" if args.budget else "full"
    config = check_load_args(args)
    _check_data_file(args)
    problem = check_writable(args.out)
    if problem:
        raise PcmoeError(f"--out: {problem}")
    _check_positive(window=args.window, max_tokens=args.max_tokens)
    _check_language_model(args, config, "profile")


def check_serve(args) -> None:
    check_load_args(args)


def check_chat(args) -> None:
    _check_sampling(args)
    if not args.url:
        _check_language_model(args, check_load_args(args), "chat")


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


def data_warnings(path, documents: list[str]) -> list[str]:
    """What makes a perplexity on this text meaningless, found before the work."""
    chars = sum(len(d) for d in documents)
    control = sum(len(_CONTROL.findall(d)) for d in documents)
    if control > 0.01 * chars:
        return [f"data file {path} does not look like text: {control} of its {chars} characters are control "
                "characters (NUL ...)"]
    return []


def _warn_few_tokens(result: dict, what: str = "a perplexity") -> None:
    if result["tokens"] < MIN_SCORED_TOKENS:
        print(f"warning: only {result['tokens']} token(s) scored; {what} over fewer than {MIN_SCORED_TOKENS} "
              "says little about the model", file=sys.stderr)


def _read_documents(path):
    from pcmoe.evaluate import read_documents

    documents = read_documents(path)
    for message in data_warnings(path, documents):
        print(f"warning: {message}", file=sys.stderr)
    return documents


# -- commands ---------------------------------------------------------------------------------


def cmd_info(args) -> int:
    from importlib.metadata import PackageNotFoundError, version

    from pcmoe.checkpoint import CheckpointError
    from pcmoe.sizes import describe

    try:
        info = describe(args.model)  # config.json and the safetensors headers: torch is never imported
    except CheckpointError as e:
        raise PcmoeError(str(e)) from None
    try:
        info["torch"] = version("torch")
    except PackageNotFoundError:
        info["torch"] = None
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
    for line in minimum_budget_lines(info):
        print(line)
    return 0


def minimum_budget_lines(info: dict) -> list[str]:
    """The headline is the minimum of what `load` does by default (inspect's "minimum_budget"), then
    the minima of the other arrangements."""
    others = []
    if "minimum_budget_static" in info:
        others.append(f"{_fmt_bytes(info['minimum_budget_static'])} for a fixed subset or on-demand "
                      "(one expert per MoE layer)")
    if "minimum_budget_committee" in info:
        others.append(f"{_fmt_bytes(info['minimum_budget_committee'])} for a committee with a spare slot per "
                      "layer (--spare-slots 1)")
    if "minimum_budget" not in info:  # an inspect() without the default load's minimum
        return [f"  minimum budget       {'; '.join(others)}"] if others else []
    lines = [f"  minimum budget       {_fmt_bytes(info['minimum_budget'])} for the default load (policy committee)"]
    lines += [f"                       {o}" for o in others]
    return lines


def cmd_generate(args) -> int:
    engine = engine_from_args(args)
    try:
        if engine.tokenizer is None:
            raise PcmoeError(_no_tokenizer(args.model, "generate"))
        prompt = args.prompt
        if args.chat:
            if not getattr(engine.tokenizer, "chat_template", None):
                raise PcmoeError("--chat needs a tokenizer with a chat template")
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

    vision = read_model_config(args.model).get("model_type") == VISION_TYPE
    if vision:  # read (and check) the frames before the model
        from pcmoe.models.vit_moe import evaluate_stream, load_fashion_mnist

        data = load_fashion_mnist("test", args.data)
    else:
        data = _read_documents(args.data)
    baseline_rss = rss_bytes()
    engine = engine_from_args(args)
    try:
        if engine.family.seq2seq:
            raise PcmoeError("eval supports decoder-only LMs and the pcmoe vision MoE")
        progress = not args.quiet and sys.stderr.isatty()
        if vision:
            result = evaluate_stream(engine, data, frames=args.frames, seed=args.stream_seed, progress=progress)
        else:
            from pcmoe.evaluate import perplexity

            result = perplexity(engine, data, window=args.window, max_tokens=args.max_tokens, progress=progress,
                                chunk=args.chunk)
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
        _warn_few_tokens(result)
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

    from pcmoe.system import atomic_write_text

    documents = _read_documents(args.data)
    args.policy = args.policy or ("on-demand" if args.budget else "full")  # exact routing either way
    args.track_importance = True
    engine = engine_from_args(args)
    try:
        from pcmoe.evaluate import perplexity

        result = perplexity(engine, documents, window=args.window, max_tokens=args.max_tokens,
                            progress=not args.quiet and sys.stderr.isatty())
        profile = engine.importance_profile()
    finally:
        engine.close()
    _warn_few_tokens(result, "a routing profile")
    profile["tokens"] = result["tokens"]
    profile["source"] = os.path.basename(args.data)
    atomic_write_text(Path(args.out), json.dumps(profile))
    print(f"wrote {args.out}: routing of {result['tokens']} tokens (ppl {result['ppl']:.2f})")
    return 0


# -- parsers, built for the chosen command only -------------------------------------------------


def _fill_info(p) -> None:
    add_model(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info, check=check_info)


def _fill_generate(p) -> None:
    add_load_options(p)
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate, at least 1 (default 64)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature from 0 to 2; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: sample from the most likely tokens whose probabilities add up to "
                        "top-p, in (0, 1] (default 1: all); only with --temperature above 0")
    p.add_argument("--seed-sample", type=int, help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", help="stop string (repeatable, at most 4)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--json", action="store_true", help="also print the statistics as one JSON line")
    p.set_defaults(func=cmd_generate, check=check_generate)


def _fill_eval(p) -> None:
    add_load_options(p)
    p.add_argument("--data", help="text file of documents (separated by a blank line + '=====' or form feeds); "
                                  "vision: the folder of the Fashion-MNIST t10k-*.gz files (default: the "
                                  "installed dataset-fashion-mnist)")
    p.add_argument("--window", type=int, default=256, help="context window per scored piece (default 256)")
    p.add_argument("--chunk", type=int, default=32, help="tokens per forward step within a window (default 32)")
    p.add_argument("--max-tokens", type=int, help="stop after this many scored tokens")
    p.add_argument("--frames", type=int, default=2000, help="vision: frames in the stream (default 2000)")
    p.add_argument("--stream-seed", type=int, default=0, help="vision: frame-stream seed")
    p.set_defaults(func=cmd_eval, check=check_eval)


def _fill_profile(p) -> None:
    add_load_options(p)
    p.set_defaults(policy=None)  # the policy is chosen for exact routing; giving one is an error
    p._option_string_actions["--policy"].help = "not for profile: it records exact routing (policy full, or " \
                                                "on-demand under --budget)"
    p.add_argument("--data", required=True, help="profiling text (same format as eval)")
    p.add_argument("--out", required=True, help="output profile JSON")
    p.add_argument("--window", type=int, default=256,
                   help="context window per scored piece, as eval's (default 256)")
    p.add_argument("--max-tokens", type=int, help="stop after this many tokens of the text (default: all of it)")
    p.set_defaults(func=cmd_profile, check=check_profile)


def _fill_trace(p) -> None:
    from pcmoe.trace import fill_trace

    fill_trace(p)


def _fill_calibrate(p) -> None:
    from pcmoe.planner.commands import fill_calibrate

    fill_calibrate(p)


def _fill_plan(p) -> None:
    from pcmoe.planner.commands import fill_plan

    fill_plan(p)


def _fill_bench(p) -> None:
    from pcmoe.bench import suite

    p.description = suite.__doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    suite.add_arguments(p)
    p.set_defaults(func=suite.cmd_bench, check=lambda args: None)


def _fill_serve(p) -> None:
    add_load_options(p)
    p.set_defaults(func=lambda args: _optional("pcmoe.server", "server").cmd_serve(args), check=check_serve)
    _optional_arguments("pcmoe.server", "add_serve_arguments", p)


def _fill_budget(p) -> None:
    from pcmoe.server.admin import fill_budget

    fill_budget(p)


def _fill_chat(p) -> None:
    add_load_options(p)
    p.set_defaults(func=lambda args: _optional("pcmoe.chat", "server").cmd_chat(args), check=check_chat)
    _optional_arguments("pcmoe.chat", "add_chat_arguments", p)


# name -> (one-line summary for `pcmoe --help`, what fills in its parser)
COMMANDS = {
    "info": ("describe a checkpoint and the smallest budget it can be served in", _fill_info),
    "generate": ("generate text from a prompt under a memory budget, then a statistics table", _fill_generate),
    "eval": ("perplexity (LM) or frame-stream accuracy (vision) under a budget; JSON last line", _fill_eval),
    "profile": ("record which experts a text uses (for static-frequency and warm starts)", _fill_profile),
    "trace": ("record a model's per-layer routing on a text (replayed onto larger checkpoints in benchmarks)",
              _fill_trace),
    "calibrate": ("measure this machine and the model for the planner (writes <model>/device_profile.json)",
                  _fill_calibrate),
    "plan": ("choose per-layer committee sizes and precisions for a memory and latency limit", _fill_plan),
    "serve": ("OpenAI-compatible HTTP server (needs the [server] extra)", _fill_serve),
    "budget": ("give a running server a new weight budget without a restart (POST /admin/budget)", _fill_budget),
    "chat": ("interactive terminal chat against the engine or a running server", _fill_chat),
    "bench": ("the memory / quality / speed benchmark suite (writes JSON, Markdown, PNG)", _fill_bench),
}


class _CommandListFormatter(argparse.HelpFormatter):
    """argparse sizes the command column one indent short, wrapping a 9-letter command's summary."""

    def add_argument(self, action):
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):
            longest = max(map(len, action.choices)) + self._current_indent + 2 * self._indent_increment
            self._action_max_length = max(self._action_max_length, longest)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error of the command
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command listed and only `command`'s own arguments filled in."""
    ap = _Parser(prog="pcmoe", description="Serve Mixture-of-Experts models under a memory budget. "
                                           "`pcmoe COMMAND --help` lists a command's options.",
                 formatter_class=_CommandListFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="command")
    for name, (summary, fill) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary)
        if name == command:
            fill(p)
    return ap


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one command, filled in (for tests and tools that check command lines)."""
    ap = build_parser(name)
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _chosen(argv: list[str]) -> str | None:
    # The top level takes no option with a value, so its first non-option word is the command.
    return next((a for a in argv if not a.startswith("-")), None)


def _optional(module: str, extra: str):
    """Import a module that needs an optional extra, or fail with the install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise PcmoeError(f"{e.name} is not installed; pip install 'pcmoe[{extra}]'") from None


def _optional_arguments(module: str, function: str, parser: argparse.ArgumentParser) -> None:
    """Let an optional module add its own command-line arguments (if it imports)."""
    import importlib

    try:
        getattr(importlib.import_module(module), function)(parser)
    except (ImportError, AttributeError):
        pass


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from pcmoe.system import WriteError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")  # torch's and transformers' chatter; pcmoe's own warnings are one line
    warnings.filterwarnings("default", category=PcmoeWarning)
    warnings.showwarning = _show_warning
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(_chosen(argv)).parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 0
    try:
        args.check(args)
        return args.func(args)
    except OptionError as e:
        print(f"error: {e.message(_flag(e.param))}", file=sys.stderr)
        return 2
    except PcmoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WriteError as e:  # already names the file and the reason
        print(f"error: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
