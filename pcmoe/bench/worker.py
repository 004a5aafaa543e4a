"""One benchmark measurement in a fresh process (honest peak RSS, cold page cache).

    python -m pcmoe.bench.worker '<json spec>'      # the last stdout line is the JSON result

spec: {"kind": "pcmoe" | "transformers" | "accelerate", "model": DIR, "budget": ..., "policy": ...,
       "plan": ..., "options": {...load options...}, "data": FILE, "eval_tokens": N,
       "prompts": [[ids...], ...], "decode_tokens": N, "threads": N, "vision": bool, "frames": N,
       "evict": bool, "offload_folder": DIR (accelerate)}

LM measurements, in this order: perplexity over a stream of held-out documents (the committee
warms up and adapts), then decode speed (greedy, one prompt after another), with the page cache
of the checkpoint evicted before loading.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
import warnings


def _decode_runs(step_fn, prefill_fn, prompts, decode_tokens):
    """Median prefill and decode tokens/s over prompts. prefill_fn(ids) -> state, logits;
    step_fn(state, token) -> logits."""
    import torch

    prefill, decode = [], []
    for ids in prompts:
        t0 = time.perf_counter()
        state, logits = prefill_fn(ids)
        t1 = time.perf_counter()
        token = int(torch.argmax(logits))
        for _ in range(decode_tokens - 1):
            logits = step_fn(state, token)
            token = int(torch.argmax(logits))
        t2 = time.perf_counter()
        prefill.append(len(ids) / (t1 - t0))
        decode.append((decode_tokens - 1) / (t2 - t1))
    return statistics.median(prefill), statistics.median(decode), decode


def _hf_perplexity(model, config, streams, eval_tokens, window=256, chunk=32):
    """The pcmoe.evaluate protocol for a plain transformers model (same windows and chunks)."""
    import torch
    from transformers import DynamicCache

    nll, count = 0.0, 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for stream in streams:
            if count >= eval_tokens:
                break
            for start in range(0, len(stream) - 1, window):
                piece = torch.tensor([stream[start:start + window + 1]])
                n = min(piece.shape[1] - 1, eval_tokens - count)
                if n <= 0:
                    break
                cache = DynamicCache(config=config)
                for c in range(0, n, chunk):
                    ids = piece[:, c:min(c + chunk, n)]
                    logits = model(input_ids=ids, cache=cache, use_cache=True).logits[0].float()
                    nll += torch.nn.functional.cross_entropy(logits, piece[0, c + 1:c + 1 + ids.shape[1]],
                                                             reduction="sum").item()
                count += n
    dt = time.perf_counter() - t0
    return {"ppl": math.exp(nll / count), "tokens": count, "eval_tokens_per_s": count / dt}


def _streams(tokenizer, data, eos):
    from pcmoe.evaluate import read_documents

    return [[eos] + tokenizer(d, add_special_tokens=False)["input_ids"] + [eos] for d in read_documents(data)]


def run_pcmoe(spec):
    import torch

    import pcmoe
    from pcmoe.budget import peak_rss_bytes

    if spec.get("evict", True):
        from pcmoe.checkpoint import Checkpoint

        Checkpoint(spec["model"]).evict_page_cache()
    t0 = time.perf_counter()
    engine = pcmoe.load(spec["model"], budget=spec.get("budget"), policy=spec.get("policy", "committee"),
                        plan=spec.get("plan"), progress=False, threads=spec.get("threads"), **spec.get("options", {}))
    out = {"load_s": time.perf_counter() - t0}
    try:
        if spec.get("vision"):
            from pcmoe.models.vit_moe import evaluate_stream

            engine.reset_stats()
            out.update(evaluate_stream(engine, spec.get("data"), frames=spec.get("frames", 1000),
                                       seed=spec.get("seed", 0), progress=False))
            out.update(_engine_stats(engine))
            return out
        from pcmoe.evaluate import perplexity, read_documents

        series = []
        if spec.get("eval_tokens"):
            docs = read_documents(spec["data"])
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
            engine.reset_stats()

            def prefill(ids):
                engine.begin_input()
                logits, state = engine.prefill(ids)
                return state, logits

            with torch.inference_mode():
                pre, dec, all_dec = _decode_runs(engine.decode_step, prefill, spec["prompts"],
                                                 spec.get("decode_tokens", 64))
            engine.end_input()
            st = _engine_stats(engine)
            generated = len(spec["prompts"]) * spec.get("decode_tokens", 64)
            out.update({"prefill_tokens_per_s": pre, "decode_tokens_per_s": dec, "decode_runs": all_dec,
                        "decode_stats": st, "bytes_per_token": st["bytes_read"] / generated})
        out.update(_engine_stats(engine))
        out["series"] = series
    finally:
        engine.close()
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def _engine_stats(engine):
    st = engine.stats()
    keep = ("policy", "budget_bytes", "resident_bytes", "resident_expert_bytes", "nonexpert_bytes",
            "full_model_bytes", "committee_sizes", "hit_rate", "router_mass_outside", "exchanged", "skipped",
            "swaps", "swap_failures", "bytes_read", "reads", "read_s", "stall_s", "peak_rss_bytes")
    out = {k: st[k] for k in keep}
    out["per_layer_swaps"] = [layer["swaps"] for layer in st["per_layer"]]
    return out


def run_transformers(spec, offload: bool):
    """transformers fully resident, or with accelerate disk offload under a CPU memory budget."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from pcmoe.budget import peak_rss_bytes
    from pcmoe.checkpoint import Checkpoint

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    Checkpoint(spec["model"]).evict_page_cache()
    kwargs = {"dtype": "auto"}
    tmp = None
    if offload:
        tmp = tempfile.mkdtemp(prefix="pcmoe-offload-", dir=spec.get("offload_folder"))
        kwargs.update(device_map="auto", max_memory={"cpu": int(spec["budget_bytes"])}, offload_folder=tmp)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], **kwargs).eval()
    tok = AutoTokenizer.from_pretrained(spec["model"])
    out = {"load_s": time.perf_counter() - t0, "policy": "accelerate-offload" if offload else "transformers"}
    if spec.get("eval_tokens"):
        out.update(_hf_perplexity(model, model.config, _streams(tok, spec["data"], tok.eos_token_id),
                                  spec["eval_tokens"]))

    def prefill(ids):
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1).logits
        return cache, logits[0, -1]

    def step(cache, token):
        return model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits[0, -1]

    if spec.get("prompts"):
        with torch.inference_mode():
            pre, dec, all_dec = _decode_runs(step, prefill, spec["prompts"], spec.get("decode_tokens", 64))
        out.update({"prefill_tokens_per_s": pre, "decode_tokens_per_s": dec, "decode_runs": all_dec})
    out["peak_rss_bytes"] = peak_rss_bytes()
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
    if kind == "pcmoe":
        result = run_pcmoe(spec)
    elif kind in ("transformers", "accelerate"):
        result = run_transformers(spec, offload=kind == "accelerate")
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    result["spec"] = {k: v for k, v in spec.items() if k != "prompts"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
