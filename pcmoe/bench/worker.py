"""One benchmark measurement in a fresh process (honest peak RSS, cold page cache).

    python -m pcmoe.bench.worker '<json spec>'      # the last stdout line is the JSON result

spec: {"kind": "pcmoe" | "transformers" | "accelerate", "model": DIR, "budget": ..., "policy": ...,
       "plan": ..., "options": {...load options...}, "data": FILE, "eval_tokens": N,
       "prompts": [[ids...], ...], "decode_tokens": N, "trials": N, "warmup": N, "threads": N,
       "vision": bool, "frames": N, "budget_bytes": N (accelerate), "offload_folder": DIR}

LM measurements, in this order: perplexity over a stream of held-out documents (the committee
warms up and adapts), then decode speed: `warmup` greedy generations that are not timed, then
`trials` rounds over all prompts, the median round reported: pcmoe.protocol for both. The runner
that starts this process (pcmoe.bench.runner) evicts the checkpoint from the page cache first.
Every result carries the CPU share other processes used while it was measured (common.CpuMeter).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings

from pcmoe import protocol
from pcmoe.bench.common import CpuMeter, ReadMeter, read_figures
from pcmoe.bench.runner import emit
from pcmoe.protocol import decode_trials


def _hf_perplexity(model, config, streams, eval_tokens, window=protocol.WINDOW, chunk=protocol.CHUNK):
    """The pcmoe.evaluate protocol (pcmoe.protocol) for a plain transformers model."""
    import torch
    from transformers import DynamicCache

    def forward(ids, cache):
        return model(input_ids=ids, cache=cache, use_cache=True).logits[0]

    window = protocol.fit_window(window, getattr(config, "max_position_embeddings", None))
    t0 = time.perf_counter()
    with torch.inference_mode():
        nll, count = protocol.stream_nll(forward, lambda: DynamicCache(config=config), streams, window, chunk,
                                         eval_tokens)
    dt = time.perf_counter() - t0
    return {"ppl": math.exp(nll / count), "tokens": count, "eval_tokens_per_s": count / dt}


def _trials(spec) -> dict:
    return {"decode_tokens": spec.get("decode_tokens", 64), "trials": spec.get("trials", 3),
            "warmup": spec.get("warmup", 1)}


def run_pcmoe(spec):
    import torch

    import pcmoe
    from pcmoe.system import peak_rss_bytes

    t0 = time.perf_counter()
    engine = pcmoe.load(spec["model"], budget=spec.get("budget"), policy=spec.get("policy", "committee"),
                        plan=spec.get("plan"), progress=False, threads=spec.get("threads"), **spec.get("options", {}))
    out = {"load_s": time.perf_counter() - t0, "kernel": engine.load_info.get("kernel"),
           "model_class": type(engine.model).__name__}
    try:
        if spec.get("vision"):
            out.update(_vision(engine, spec))
            return out
        from pcmoe.evaluate import perplexity

        series = []
        if spec.get("eval_tokens"):
            docs = protocol.read_documents(spec["data"])
            # Committee changes over the stream: stats after each document.
            done = 0
            for i, doc in enumerate(docs):
                before = engine.stats()
                r = perplexity(engine, [doc], max_tokens=spec["eval_tokens"] - done, progress=False)
                done += r["tokens"]
                after = engine.stats()
                series.append({"doc": i, "tokens": r["tokens"], "nll": r["nll_per_token"] * r["tokens"],
                               "hits": after["hits"] - before["hits"],
                               "choices": after["choices"] - before["choices"],
                               "swaps": after["swaps"] - before["swaps"], "seconds": r["seconds"]})
                if done >= spec["eval_tokens"]:
                    break
            tokens = sum(s["tokens"] for s in series)
            out["ppl"] = math.exp(sum(s["nll"] for s in series) / tokens)
            out["tokens"] = tokens
            out["eval_tokens_per_s"] = tokens / sum(s["seconds"] for s in series)
            out["eval_stats"] = _engine_stats(engine)
        if spec.get("prompts"):
            t = _trials(spec)

            def prefill(ids):
                engine.begin_input()
                logits, state = engine.prefill(ids)
                return state, logits

            meter = ReadMeter()

            def after_warmup():
                engine.reset_stats()
                meter.reset()

            with torch.inference_mode():  # statistics reset after the warm-up: they cover the trials
                d = decode_trials(meter.wrap(prefill), engine.decode_step, spec["prompts"], t["decode_tokens"],
                                  trials=t["trials"], warmup=t["warmup"], after_warmup=after_warmup,
                                  continuations=spec.get("continuations"))
            reads = read_figures(meter, d, spec["prompts"], t["decode_tokens"],  # before anything else reads
                                 cold=not spec.get("eval_tokens"))
            engine.end_input()
            st = _engine_stats(engine)
            out.update(d)
            out.update(reads)
            out.update({"decode_stats": st, "bytes_per_token": st["bytes_read"] / d["timed_tokens"]})
        out.update(_engine_stats(engine))
        out["series"] = series
    finally:
        engine.close()
        out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def _vision(engine, spec) -> dict:
    """Accuracy and speed on the frame stream (vit_moe.evaluate_stream), with the committee's
    statistics sampled every `series_every` frames: evaluate_stream marks each frame with
    engine.begin_input(), which is where the samples are taken."""
    from pcmoe.models.vit_moe import evaluate_stream

    frames = spec.get("frames", 1000)
    every = spec.get("series_every") or max(1, frames // 40)
    series, seen, last = [], [0], {"hits": 0, "choices": 0, "swaps": 0, "bytes_read": 0}
    begin = engine.begin_input

    def sample():
        st = engine.stats()
        series.append({"frame": seen[0], **{k: st[k] - last[k] for k in last}})
        last.update({k: st[k] for k in last})

    def begin_input():
        if seen[0] and seen[0] % every == 0:
            sample()
        seen[0] += 1
        begin()

    engine.reset_stats()
    engine.begin_input = begin_input
    try:
        out = evaluate_stream(engine, spec.get("data"), frames=frames, seed=spec.get("seed", 0), progress=False)
    finally:
        engine.begin_input = begin
    sample()
    out.update(_engine_stats(engine))
    out["bytes_per_frame"] = out["bytes_read"] / max(out["frames"], 1)
    out["series"] = series
    return out


def _engine_stats(engine):
    st = engine.stats()
    keep = ("policy", "routing", "budget_bytes", "resident_bytes", "resident_expert_bytes", "nonexpert_bytes",
            "full_model_bytes", "committee_sizes", "hit_rate", "router_mass_outside", "exchanged", "skipped",
            "swaps", "swap_failures", "bytes_read", "reads", "read_s", "stall_s", "peak_rss_bytes", "choices", "hits")
    out = {k: st[k] for k in keep}
    out["per_layer_swaps"] = [layer["swaps"] for layer in st["per_layer"]]
    return out


def _held_bytes(model) -> int:
    """Parameter and buffer bytes of a transformers model held in RAM (accelerate leaves the
    offloaded ones on the meta device)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cpu")


def run_transformers(spec, offload: bool):
    """transformers fully resident, or with accelerate disk offload under a CPU memory budget."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from pcmoe.system import peak_rss_bytes

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    kwargs = {"dtype": "auto"}
    tmp = None
    if offload:
        tmp = tempfile.mkdtemp(prefix="pcmoe-offload-", dir=spec.get("offload_folder"))
        kwargs.update(device_map="auto", max_memory={"cpu": int(spec["budget_bytes"])}, offload_folder=tmp)
    try:
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(spec["model"], **kwargs).eval()
        tok = AutoTokenizer.from_pretrained(spec["model"])
        out = {"load_s": time.perf_counter() - t0, "policy": "accelerate-offload" if offload else "transformers",
               "held_bytes": _held_bytes(model), "dtype": str(model.dtype).replace("torch.", "")}
        if offload:
            out["budget_bytes"] = int(spec["budget_bytes"])
        if spec.get("eval_tokens"):
            streams = protocol.token_streams(protocol.read_documents(spec["data"]),
                                             lambda text: tok(text, add_special_tokens=False)["input_ids"],
                                             tok.eos_token_id, spec["eval_tokens"])
            out.update(_hf_perplexity(model, model.config, streams, spec["eval_tokens"]))

        def prefill(ids):
            cache = DynamicCache(config=model.config)
            logits = model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1).logits
            return cache, logits[0, -1]

        def step(cache, token):
            return model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits[0, -1]

        if spec.get("prompts"):
            t = _trials(spec)
            meter = ReadMeter()
            with torch.inference_mode():
                d = decode_trials(meter.wrap(prefill), step, spec["prompts"], t["decode_tokens"], trials=t["trials"],
                                  warmup=t["warmup"], after_warmup=meter.reset, continuations=spec.get("continuations"))
            out.update(d)
            out.update(read_figures(meter, d, spec["prompts"], t["decode_tokens"], cold=not spec.get("eval_tokens")))
        out["peak_rss_bytes"] = peak_rss_bytes()
    finally:
        if tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> int:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    spec = json.loads(sys.argv[1])
    kind = spec.get("kind", "pcmoe")
    cpu = CpuMeter()
    if kind == "pcmoe":
        result = run_pcmoe(spec)
    elif kind in ("transformers", "accelerate"):
        result = run_transformers(spec, offload=kind == "accelerate")
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    result.update(cpu.stop())
    return emit(result, spec)


if __name__ == "__main__":
    sys.exit(main())
