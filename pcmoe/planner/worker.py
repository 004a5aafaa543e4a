"""One planner measurement in a fresh process (honest peak RSS, cold page cache):

    python -m pcmoe.planner.worker '<json spec>'        # the last stdout line is the JSON result

spec: {"model": DIR, "plan": {plan JSON} | null (everything resident), "policy": "committee",
       "options": {load options}, "threads": 1,
       "stream": {"kind": "text", "data": FILE, "documents": "even" | "odd" | "all", "doc_tokens": 512,
                  "window": 256, "chunk": 32}
               | {"kind": "frames", "data": DIR | null, "frames": 1500, "seed": 0},
       "decode": {"prompts": 3, "prompt_tokens": 64, "tokens": 64, "trials": 2, "warmup": 1},   (text only)
       "heldout": {stream},                  optional: a second stream scored after the first (loss only)
       "load_timing": {"experts": 8},        optional: cold expert reads and quantisation, per precision
       "imports": ["pcmoe.server"]}          optional: RSS added by importing these (a front end's cost)

Measured: the loss on the stream (mean NLL per token, or the error rate on frames), the latency
(seconds per decoded token, median round; or per frame), the time inside each MoE block and in the
committee's step boundary per decoded token / frame, a speed probe around the timing (probe_s, see
speed_probe), and the process's peak RSS (VmHWM) with the
engine's resident weight bytes. The profiling stream is the same for every configuration, so
measured differences between configurations are paired (no sampling noise between them).
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch

import pcmoe
from pcmoe import protocol
from pcmoe.bench.common import CpuMeter
from pcmoe.bench.runner import emit
from pcmoe.system import evict_file, peak_rss_bytes, rss_bytes


def select_documents(documents: list[str], which: str) -> list[str]:
    """The profiling split ("even": documents 0, 2, 4, ...) or the held-out one ("odd"), or all."""
    if which == "all":
        return list(documents)
    if which not in ("even", "odd"):
        raise ValueError(f"documents must be even, odd or all, not {which!r}")
    return list(documents[0 if which == "even" else 1::2])


def text_streams(engine, stream: dict) -> list[list[int]]:
    """[eos] + ids + [eos] per selected document, each cut to doc_tokens predicted tokens."""
    docs = select_documents(protocol.read_documents(stream["data"]), stream.get("documents", "all"))
    streams = protocol.token_streams(docs, engine.encode, engine.tokenizer.eos_token_id)
    cap = stream.get("doc_tokens")
    return [s[:cap + 1] for s in streams] if cap else streams


class BlockTimer:
    """Wall time inside each MoE block and inside the scheduler's step boundary (committee update,
    switching staged swaps in), counted only while `on` (decode steps, frames)."""

    def __init__(self, engine):
        self.engine, self.on = engine, False
        self.layer_s = [0.0] * len(engine.layers)
        self.step_s = 0.0
        for i, layer in enumerate(engine.layers):
            layer.block.forward = self._timed(i, layer.block.forward)
        if engine.scheduler is not None:
            engine.scheduler.begin_step = self._timed_step(engine.scheduler.begin_step)

    def _timed(self, i, forward):
        def timed(*args, **kwargs):
            if not self.on:
                return forward(*args, **kwargs)
            step0, t0 = self.step_s, time.perf_counter()
            out = forward(*args, **kwargs)
            self.layer_s[i] += time.perf_counter() - t0 - (self.step_s - step0)   # the boundary is counted apart
            return out
        return timed

    def _timed_step(self, begin_step):
        def timed(*args, **kwargs):
            if not self.on:
                return begin_step(*args, **kwargs)
            t0 = time.perf_counter()
            out = begin_step(*args, **kwargs)
            self.step_s += time.perf_counter() - t0
            return out
        return timed

    def reset(self) -> None:
        self.layer_s = [0.0] * len(self.layer_s)
        self.step_s = 0.0


def score_text(engine, stream: dict) -> dict:
    """Mean NLL per token over the stream's documents (committee state carried across them)."""
    streams = text_streams(engine, stream)
    window = protocol.fit_window(stream.get("window", protocol.WINDOW), engine.context)
    t0 = time.perf_counter()
    with torch.inference_mode():
        nll, count = protocol.stream_nll(engine.forward, engine.new_state, streams, window,
                                         stream.get("chunk", protocol.CHUNK), begin=engine.begin_input)
    engine.end_input()
    return {"loss": nll / count, "ppl": math.exp(nll / count), "tokens": count, "eval_s": time.perf_counter() - t0,
            "window": window}


def speed_probe(blocks: int = 5, iterations: int = 40) -> list[float]:
    """Seconds of a fixed reference work (one-token fp32 matrix-vector products, about the decode's
    size), per block: how fast this machine runs right now, whatever the configuration. Timed around
    the decode trials; calibration divides decode times by it (the machine's speed drifts between
    runs by more than the configurations differ, unseen by cpu_other_share)."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(1024, 1024, generator=g), torch.randn(1, 1024, generator=g)   # [D, D], [1, D]
    times = []
    with torch.inference_mode():
        for _ in range(blocks):
            t0 = time.perf_counter()
            for _ in range(iterations):
                x = torch.tanh(x @ w)
            times.append(time.perf_counter() - t0)
    return times


def _probe_result(before: list[float], after: list[float]) -> dict:
    both = sorted(before + after)
    return {"probe_s": both[len(both) // 2], "probe_before_s": min(before), "probe_after_s": min(after)}


def measure_text(engine, spec: dict, out: dict) -> None:
    stream = spec["stream"]
    out.update(score_text(engine, stream))
    out["eval_stats"] = _stats(engine)
    d = spec.get("decode")
    if not d:
        return
    docs = select_documents(protocol.read_documents(stream["data"]), stream.get("documents", "all"))
    prompts = protocol.prompts(docs, engine.encode, d.get("prompts", 3), d.get("prompt_tokens", 64))
    timer = BlockTimer(engine)

    def prefill(ids):
        engine.begin_input()
        logits, state = engine.prefill(ids)
        return state, logits

    def step(state, token):
        timer.on = True
        try:
            return engine.decode_step(state, token)
        finally:
            timer.on = False

    def after_warmup():
        timer.reset()
        engine.reset_stats()

    meter = CpuMeter()   # other processes' CPU share while timed: contention makes latencies longer
    before = speed_probe()
    with torch.inference_mode():
        r = protocol.decode_trials(prefill, step, prompts, d.get("tokens", 64), trials=d.get("trials", 2),
                                   warmup=d.get("warmup", 1), after_warmup=after_warmup)
    out.update(_probe_result(before, speed_probe()))
    out.update(meter.stop())
    engine.end_input()
    steps = r["trials"] * len(prompts) * (d.get("tokens", 64) - 1)    # decode steps timed (prefills excluded)
    out.update(latency_s=1.0 / r["decode_tokens_per_s"], decode_trials_tokens_per_s=r["decode_trials"],
               prefill_tokens_per_s=r["prefill_tokens_per_s"], decode_steps=steps,
               layer_s=[t / steps for t in timer.layer_s], step_s=timer.step_s / steps)
    out["decode_stats"] = _stats(engine)


def score_frames(engine, stream: dict, timer: BlockTimer | None = None) -> dict:
    """Error rate (the loss), accuracy and mean NLL over a seeded frame stream, one frame per input."""
    from pcmoe.models.vit_moe import frame_stream, load_fashion_mnist

    images, labels = load_fashion_mnist("test", stream.get("data"))
    nll = correct = count = 0
    t0 = time.perf_counter()
    if timer is not None:
        timer.on = True
    with torch.inference_mode():
        for frame, label in frame_stream(images, labels, stream.get("frames", 1000), stream.get("seed", 0)):
            engine.begin_input()
            logits = engine.model(pixel_values=frame).logits[0].float()            # [classes]
            nll += float(torch.logsumexp(logits, 0) - logits[label])
            correct += int(logits.argmax()) == label
            count += 1
    if timer is not None:
        timer.on = False
    engine.end_input()
    seconds = time.perf_counter() - t0
    return {"loss": 1.0 - correct / count, "accuracy": correct / count, "nll": nll / count, "frames": count,
            "eval_s": seconds, "latency_s": seconds / count}


def measure_frames(engine, spec: dict, out: dict) -> None:
    timer = BlockTimer(engine)
    meter = CpuMeter()
    before = speed_probe()
    out.update(score_frames(engine, spec["stream"], timer))
    out.update(_probe_result(before, speed_probe()))
    out.update(meter.stop())
    frames = out["frames"]
    out.update(layer_s=[t / frames for t in timer.layer_s], step_s=timer.step_s / frames)
    out["eval_stats"] = _stats(engine)


def measure_loads(engine, spec: dict, out: dict) -> None:
    """Seconds to read one expert from disk with the page cache evicted, and to quantise it into a slot."""
    from pcmoe.moe import SlotExperts, expert_buffer

    count = spec["load_timing"].get("experts", 8)
    kernel, dtype = engine.layers[0].block.experts.kernel, engine.layers[0].block.experts.dtype
    buffer = expert_buffer(kernel, dtype)
    from pcmoe.bench.common import weight_files

    for path in weight_files(spec["model"]):
        evict_file(path)
    L, N = len(engine.layers), engine.layers[0].committee.num_experts
    pairs = [(i % L, (i * 7) % N) for i in range(count)]
    read = []
    for layer, e in pairs:
        t0 = time.perf_counter()
        if not engine.store.load(layer, e, buffer):
            raise RuntimeError(f"cannot read expert {e} of MoE layer {layer}")
        read.append(time.perf_counter() - t0)
    nbytes = sum(t.numel() * t.element_size() for t in buffer.values())
    commit = {}
    for quant in (None, "int8", "int4"):
        try:
            bank = SlotExperts(kernel, 1, dtype, quant)
        except ValueError:
            continue
        t0 = time.perf_counter()
        for _ in range(count):
            bank.write(0, buffer)
        commit[quant or "full"] = (time.perf_counter() - t0) / count
    out["expert_load"] = {"read_s": sorted(read)[len(read) // 2], "read_s_all": read, "bytes": nbytes,
                          "read_mb_per_s": nbytes / 1e6 / (sorted(read)[len(read) // 2] or 1e-9),
                          "commit_s": commit}


def measure_imports(spec: dict, out: dict) -> None:
    import importlib

    before = rss_bytes()
    for name in spec["imports"]:
        importlib.import_module(name)
    out["import_rss_bytes"] = rss_bytes() - before


def _stats(engine) -> dict:
    st = engine.stats()
    keep = ("resident_bytes", "hit_rate", "router_mass_outside", "swaps", "swap_failures", "updates", "bytes_read",
            "stall_s", "committee_sizes")
    return {k: st[k] for k in keep}


def run(spec: dict) -> dict:
    out = {"baseline_rss_bytes": rss_bytes()}
    if spec.get("imports"):
        measure_imports(spec, out)
        out["peak_rss_bytes"] = peak_rss_bytes()
        return out
    t0 = time.perf_counter()
    engine = pcmoe.load(spec["model"], policy=spec.get("policy", "committee"), plan=spec.get("plan"),
                        progress=False, threads=spec.get("threads", 1), **spec.get("options", {}))
    out["load_s"] = time.perf_counter() - t0
    try:
        st = engine.stats()
        out.update(rss_after_load_bytes=rss_bytes(), resident_bytes=st["resident_bytes"],
                   committee_sizes=st["committee_sizes"], precisions=[r["precision"] for r in st["per_layer"]],
                   kernel=engine.load_info.get("kernel"))
        if spec.get("load_timing"):
            measure_loads(engine, spec, out)
        if spec.get("stream"):
            (measure_frames if spec["stream"]["kind"] == "frames" else measure_text)(engine, spec, out)
        if spec.get("heldout"):  # a second stream, after the first (the committee carries on)
            held = spec["heldout"]
            out["heldout"] = (score_frames if held["kind"] == "frames" else score_text)(engine, held)
    finally:
        engine.close()
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def main(argv: list[str]) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    spec = json.loads(argv[1])
    return emit(run(spec), spec, hide=("plan",))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
