"""Prometheus metrics: request counters and timings, and the engine's committee and memory counters.

The engine's numbers come from the snapshot the worker takes after each request (engine.stats() is
called on the engine thread only); a scrape never touches the engine.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pcmoe.system import rss_bytes


class EngineCollector:
    """Committee and memory metrics from `snapshot()` (the latest engine.stats()), read at scrape time."""

    def __init__(self, snapshot, engine=None):
        self.snapshot = snapshot
        self.engine = engine      # read for the budget target only (an attribute, safe from any thread)

    def collect(self):
        s = self.snapshot()
        layers = s["per_layer"]

        def family(kind, name, doc, value=None, per_layer=None):
            m = kind(name, doc, labels=["layer"] if per_layer else None)
            if per_layer:
                for layer in layers:
                    m.add_metric([str(layer["layer"])], layer[per_layer])
            else:
                m.add_metric([], value)
            return m

        def counter(name, doc, value=None, per_layer=None):
            return family(CounterMetricFamily, name, doc, value, per_layer)

        def gauge(name, doc, value=None, per_layer=None):
            return family(GaugeMetricFamily, name, doc, value, per_layer)

        yield counter("pcmoe_expert_hits", "Router choices served by a resident expert", per_layer="hits")
        yield counter("pcmoe_expert_misses", "Router choices whose expert was not resident", per_layer="misses")
        yield counter("pcmoe_layer_swaps", "Expert swaps into the committee", per_layer="swaps")
        yield gauge("pcmoe_layer_router_mass_outside", "Share of router weight on absent experts",
                    per_layer="router_mass_outside")
        answers = CounterMetricFamily("pcmoe_miss_answers", "Router choices outside the committee, by how they were "
                                      "answered (exchange, skip, shadow expert, wait for an exact load)",
                                      labels=["layer", "action"])
        for layer in layers:
            for action, key in (("exchange", "exchanged"), ("skip", "skipped"), ("shadow", "shadowed"),
                                ("wait", "waited")):
                answers.add_metric([str(layer["layer"]), action], layer.get(key, 0))
        yield answers
        yield gauge("pcmoe_shadow_bytes", "Bytes of shadow experts resident", s.get("shadow_bytes", 0))
        yield gauge("pcmoe_committee_size", "Committee members per layer", per_layer="committee_size")
        yield gauge("pcmoe_layer_slots", "Expert slots per layer", per_layer="slots")
        yield gauge("pcmoe_hit_rate", "Share of router choices served by resident experts", s["hit_rate"])
        yield gauge("pcmoe_router_mass_outside", "Share of router weight on absent experts",
                    s["router_mass_outside"])
        yield counter("pcmoe_swaps", "Expert swaps", s["swaps"])
        yield counter("pcmoe_swap_failures", "Expert swaps that failed", s["swap_failures"])
        yield counter("pcmoe_expert_bytes_read", "Expert bytes read from storage", s["bytes_read"])
        yield counter("pcmoe_stall_seconds", "Time computation waited for expert reads", s["stall_s"])
        yield gauge("pcmoe_resident_bytes", "Weights resident in memory", s["resident_bytes"])
        yield gauge("pcmoe_budget_bytes", "Weight memory budget", s["budget_bytes"])
        target = self.engine.budget_target if self.engine is not None else s["budget_bytes"]
        yield gauge("pcmoe_budget_target_bytes", "Weight memory budget asked for (applied at the next token)", target)
        yield counter("pcmoe_budget_changes", "Live budget changes applied", s.get("budget_changes", 0))
        yield gauge("pcmoe_full_model_bytes", "Weights of the whole model", s["full_model_bytes"])
        yield gauge("pcmoe_process_rss_bytes", "Resident set size of the server process", rss_bytes())
        yield gauge("pcmoe_process_peak_rss_bytes", "Peak resident set size of the server process",
                    s["peak_rss_bytes"])


class Metrics:
    """A registry per app (tests start several)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("pcmoe_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("pcmoe_request_seconds", "Request time, arrival to last byte", ["endpoint"],
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r)
        self.ttft = Histogram("pcmoe_time_to_first_token_seconds", "Arrival to first generated token (queue "
                              "included)", ["endpoint"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                                                                  30, 60), registry=r)
        self.prompt_tokens = Counter("pcmoe_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("pcmoe_completion_tokens", "Tokens generated", registry=r)
        self.tokens_per_s = Gauge("pcmoe_decode_tokens_per_second", "Decode speed of the latest request",
                                  registry=r)
        self.queue_depth = Gauge("pcmoe_queue_depth", "Requests waiting for the engine", registry=r)
        self.busy = Gauge("pcmoe_engine_busy", "1 while a generation runs", registry=r)

    def attach(self, worker, engine=None) -> None:
        """Read the queue and the engine through `worker` (an EngineWorker) at scrape time."""
        self.queue_depth.set_function(lambda: worker.waiting)
        self.busy.set_function(lambda: worker.running)
        self.registry.register(EngineCollector(lambda: worker.stats, engine))

    content_type = CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        return generate_latest(self.registry)
