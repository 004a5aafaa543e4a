"""OpenAI-compatible HTTP server for one engine (needs the [server] extra). See docs/SERVER.md.

    pcmoe serve --model models/pcmoe-lm --budget 50%experts      # http://127.0.0.1:8000/v1

Endpoints: POST /v1/completions and /v1/chat/completions (JSON or SSE with `stream: true`), GET
/v1/models, /health, /metrics (Prometheus) and /v1/pcmoe/stats (the engine's statistics as JSON).
With an API key, /v1/... needs `Authorization: Bearer KEY`; /health and /metrics stay open for
probes and scrapers (they show the model name and counts, never a request's text).

Scheduling. The engine computes one request at a time (batch 1, as on an edge device): generations
run on a single engine thread and other requests wait in a FIFO of at most `queue_size`; beyond it a
request gets 429 with Retry-After. A client that disconnects cancels its generation at the next token
(queued: it leaves the queue). `request_timeout_s` counts from a request's arrival: still queued at
the deadline -> 503; generating -> the generation stops there and the reply ends with finish_reason
"length" (and `"pcmoe": {"timed_out": true}`), so a client always keeps the text it paid for. (A
queued request rarely times out: each one ahead of it stops at its own, earlier, deadline.) An engine
that gives no token for Service.grace_s past the deadline is stuck: the request gets 503 anyway.
Tokenising and chat templating run on one tokenizer thread, off the event loop.

Usage. A reply has `usage`; a stream has it only with `stream_options: {"include_usage": true}`, as
in OpenAI's API: then every chunk has `"usage": null` and one last chunk, with `"choices": []`, comes
before `data: [DONE]` with the usage.

Stop strings are matched here rather than in the engine, holding back text that may begin one, so a
stop string split across tokens is never streamed in part; chat also stops at the special token that
ends a turn (<|im_end|> and the like), which the engine decodes as "".

Warm committees per user. With `state_dir`, a request with the OpenAI `user` field restores that
user's committee state before it runs (engine.load_state) and saves it afterwards, atomically, to
`state_dir/<sha256(user)[:32]>.json`: a returning user, also after a restart, finds the experts its
topics need. The file name is a hash, so nothing in a request names a path. At most `max_users`
files are kept: a save beyond that deletes the least recently used. A state that cannot be used
(corrupt, another model's) is ignored with a warning: the user starts fresh. `pcmoe serve` keeps them
in ~/.cache/pcmoe/users/<hash of the model path> unless given --state-dir or --no-user-state.

Errors are OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`, and a client's mistake
is always a 4xx: 400 for invalid JSON, fields and values (FastAPI's 422 included; a `seed` outside
[-2**63, 2**64), the range torch takes; text with a lone UTF-16 surrogate; a prompt over the
context), 401 without the API key, 404 for an unknown model or path, 413 for a body over
`max_body_bytes`, 415 for a non-JSON body. Anything failing on the engine thread is a 500 for that
request only; the next one is served.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import re
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from pcmoe.chat import chat_prompt, turn_end_ids
from pcmoe.options import PcmoeError
from pcmoe.system import atomic_write_text, rss_bytes

log = logging.getLogger("pcmoe.server")

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/pcmoe/stats", "/health", "/metrics")
# OpenAI parameters this server does not implement: a request that sets one gets a 400, not a silent no-op.
UNSUPPORTED = ("best_of", "echo", "suffix", "logprobs", "top_logprobs", "logit_bias", "presence_penalty",
               "frequency_penalty", "tools", "tool_choice", "functions", "function_call", "response_format",
               "audio", "modalities", "prediction", "n_probs")
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


# -- errors -----------------------------------------------------------------------------------


class APIError(Exception):
    """An error the client gets as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class _ClientGone(Exception):
    """The client disconnected; nobody reads the reply."""


def _is_json(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _param(loc: tuple) -> str | None:
    """`messages[0].role` from a pydantic error location (skipping the union-member tags it adds)."""
    out = ""
    for part in loc[1:]:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool", "list", "dict", "none"):
            out += f".{part}" if out else part
        else:
            break
    return out or None


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    content_type = request.headers.get("content-type", "")
    if request.method == "POST" and not _is_json(content_type):  # FastAPI validates a non-JSON body as bytes
        return APIError(415, f"expected a JSON body (Content-Type: application/json), got {content_type or 'none'!r}",
                        code="unsupported_media_type").response()
    e = exc.errors()[0]
    param = _param(tuple(e.get("loc", ())))
    if e["type"] == "json_invalid":
        error = e.get("ctx", {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON ({error})", code="invalid_json").response()
    if e["type"] == "missing":
        message = f"missing required parameter '{param}'" if param else "the request body is empty"
        return APIError(400, message, param=param, code="missing_required_parameter").response()
    if param is None:
        return APIError(400, "the request body must be a JSON object", code="invalid_type").response()
    return APIError(400, f"invalid value for '{param}': {e['msg']}", param=param, code="invalid_value").response()


# -- request bodies ---------------------------------------------------------------------------
# strict: "5" is not a number and 1 is not a boolean; unknown fields are accepted and ignored.


class _StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed takes
    n: int | None = None
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    user: str | None = Field(None, max_length=256)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]


class _ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_ContentPart] | None = None


class ChatRequest(_Sampling):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# -- the engine thread ------------------------------------------------------------------------


@dataclass
class _Outcome:
    finish_reason: str            # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    pcmoe: dict                   # this request's committee statistics


@dataclass
class _Job:
    """One generation. The engine thread reports through `events`: ("token", text)..., then
    ("done", _Outcome) or ("error", APIError), always; ("cancelled", None) when it was cancelled."""

    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stop_ids: frozenset[int]
    user: str | None
    deadline: float               # time.monotonic()
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: Future | None = None
    queued_at: float = field(default_factory=time.monotonic)

    def emit(self, kind: str, value: Any = None) -> None:  # engine thread
        with contextlib.suppress(RuntimeError):  # the event loop is gone (shutting down)
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def drop_if_queued(self) -> bool:
        """Take the job out of the queue; False when it already runs."""
        if self.future is not None and self.future.cancel():
            self.cancelled.set()
            return True
        return False

    def cancel(self) -> None:
        """Stop at the next token (or leave the queue), and wake whoever waits on the events."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            if self.future is not None:
                self.future.cancel()
            self.events.put_nowait(("cancelled", None))


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        self.retry_after = retry_after


_STATE_FILE = re.compile(r"[0-9a-f]{32}\.json")


def _one_line(e: BaseException) -> str:
    message = (str(e).splitlines() or [""])[0]
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


def _check_state(state, shape: list[int]) -> None:
    """Reject what engine.load_state would take and fail on later, inside a generation (a score of
    the wrong length, a member id out of range)."""
    if not isinstance(state, dict) or state.get("format") != "pcmoe-state/1" or state.get("num_experts") != shape:
        raise ValueError("not a committee state of this model")
    rows = {key: state.get(key) for key in ("score", "window", "members")}
    for key, value in rows.items():
        if not isinstance(value, list) or len(value) != len(shape) or not all(isinstance(r, list) for r in value):
            raise ValueError(f"'{key}' is not one list per MoE layer")
    for layer, n in enumerate(shape):
        for key in ("score", "window"):
            row = rows[key][layer]
            if len(row) != n or not all(type(x) in (int, float) and math.isfinite(x) for x in row):
                raise ValueError(f"'{key}' of MoE layer {layer} is not {n} finite numbers")
        if not all(type(m) is int and 0 <= m < n for m in rows["members"][layer]):
            raise ValueError(f"'members' of MoE layer {layer} are not expert ids in 0..{n - 1}")


class _UserStates:
    """Committee state files of users, <folder>/<sha256(user)[:32]>.json, at most `max_users` of them:
    a save beyond that deletes the least recently used (the order survives restarts as file mtimes).
    Used on the engine thread only."""

    def __init__(self, folder: str | os.PathLike, max_users: int = 1000):
        if max_users < 1:
            raise ValueError("max_users must be at least 1")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_users = max_users

        def last_use(path: Path):
            with contextlib.suppress(OSError):
                return path.stat().st_mtime_ns, path.name
            return 0, path.name

        files = sorted((p for p in self.folder.iterdir() if _STATE_FILE.fullmatch(p.name)), key=last_use)
        self._used = dict.fromkeys(p.name for p in files)  # least recently used first
        self._prune()

    def path(self, user: str) -> Path:
        return self.folder / f"{hashlib.sha256(user.encode()).hexdigest()[:32]}.json"

    def restore(self, engine, user: str) -> bool:
        """Load the user's state into the engine; False (start fresh) when there is none or it cannot be
        used, whatever the reason: corrupt, another model's, too deeply nested to parse."""
        path = self.path(user)
        try:
            state = json.loads(path.read_text())
            _check_state(state, [c.num_experts for c in engine.committees])
            engine.load_state(state)
            return True
        except FileNotFoundError:
            return False
        except Exception as e:
            log.warning("ignoring committee state %s: %s", path.name, _one_line(e))
            return False

    def save(self, engine, user: str) -> None:
        path = self.path(user)
        try:
            atomic_write_text(path, json.dumps(engine.save_state()))
        except Exception as e:  # best effort: the reply matters more than the state
            log.warning("cannot save committee state %s: %s", path.name, _one_line(e))
            return
        self._used.pop(path.name, None)
        self._used[path.name] = None
        self._prune()

    def _prune(self) -> None:
        while len(self._used) > self.max_users:
            name = next(iter(self._used))
            del self._used[name]
            try:
                (self.folder / name).unlink(missing_ok=True)
            except OSError as e:
                log.warning("cannot delete committee state %s: %s", name, _one_line(e))


class _StopStrings:
    """Stop-string matching that holds back text which may begin a stop string: one split across
    tokens is never streamed in part (the engine's matching has already emitted such a prefix)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text, self.sent = "", 0

    def feed(self, delta: str) -> tuple[str, bool]:
        """The text that may go out now, and whether a stop string ended the output."""
        self.text += delta
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        end = min(hits) if hits else len(self.text) - self._held()
        out, self.sent = self.text[self.sent:end], end
        return out, bool(hits)

    def _held(self) -> int:
        """Length of the longest unsent tail of the text that begins a stop string."""
        unsent = len(self.text) - self.sent
        return max((k for s in self.stops for k in range(1, min(len(s), unsent + 1)) if self.text.endswith(s[:k])),
                   default=0)

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


def _request_stats(before: dict, after: dict) -> dict:
    """Committee statistics of one request from two cumulative snapshots. Router mass outside is
    weighted by router choices per layer (the engine reports only each layer's ratio)."""
    choices = after["choices"] - before["choices"]
    hits = after["hits"] - before["hits"]
    outside = sum(a["router_mass_outside"] * a["choices"] - b["router_mass_outside"] * b["choices"]
                  for a, b in zip(after["per_layer"], before["per_layer"]))
    return {
        "hit_rate": hits / choices if choices else 1.0,
        "router_mass_outside": max(0.0, outside / choices) if choices else 0.0,
        "swaps": after["swaps"] - before["swaps"],
        "bytes_read": after["bytes_read"] - before["bytes_read"],
        "stall_s": after["stall_s"] - before["stall_s"],
    }


class EngineWorker:
    """Runs generations one at a time on a single thread; the others wait in a bounded FIFO."""

    def __init__(self, engine, queue_size: int, states: _UserStates | None, metrics: _Metrics):
        self.engine = engine
        self.queue_size = queue_size
        self.states = states
        self.metrics = metrics
        self.stats = engine.stats()   # latest snapshot; engine.stats() runs on the engine thread only
        self.waiting = 0
        self.running = 0
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pcmoe-engine")
        self._current: _Job | None = None
        self._last_user: str | None = None
        self._mean_s = 1.0            # running mean of generation time, for Retry-After

    def submit(self, job: _Job) -> None:
        with self._lock:
            if self.waiting + self.running > self.queue_size:
                raise QueueFull(self.retry_after())
            self.waiting += 1
        job.future = self._executor.submit(self._run, job)
        job.future.add_done_callback(lambda future: self._left_queue(future, job))

    def retry_after(self) -> int:
        return max(1, min(60, math.ceil(self._mean_s * (self.waiting + 1))))

    def _left_queue(self, future: Future, job: _Job) -> None:
        if future.cancelled():  # dropped before it ran: by its client, its deadline or a shutdown
            with self._lock:
                self.waiting -= 1
            job.emit("error", APIError(503, "the server is shutting down", type="server_error", code="shutdown"))

    def close(self) -> None:
        job = self._current
        if job is not None:
            job.cancelled.set()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _run(self, job: _Job) -> None:  # engine thread
        with self._lock:
            self.waiting -= 1
            self.running += 1
        self._current = job
        t0 = time.monotonic()
        try:
            if job.cancelled.is_set():
                return
            try:
                event = self._generate(job, queue_s=t0 - job.queued_at)
            except Exception as e:  # whatever it is, the client gets an answer and the next request an engine
                log.exception("request failed on the engine thread")
                event = "error", APIError(500, f"internal server error ({type(e).__name__})", type="server_error")
            job.emit(*event)
            self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - t0)
        finally:
            self._current = None
            with self._lock:
                self.running -= 1

    def _generate(self, job: _Job, queue_s: float) -> tuple[str, Any]:
        engine = self.engine
        user_state = None
        if self.states is not None and job.user is not None:
            # the same user again: the committee is already theirs
            restored = job.user == self._last_user or self.states.restore(engine, job.user)
            user_state = "restored" if restored else "new"
        self._last_user = job.user
        before = self.stats
        n, finish, timed_out, last = 0, None, False, None
        stops = _StopStrings(job.stop)
        steps = engine.generate(job.ids, max_new_tokens=job.max_tokens, temperature=job.temperature,
                                top_p=job.top_p, seed=job.seed)
        try:
            for step in steps:
                n, last = n + 1, step
                if step.token_id in job.stop_ids:
                    finish = "stop"
                    break
                text, stopped = stops.feed(step.text)
                job.emit("token", text)
                if stopped:
                    finish = "stop"
                    break
                if step.finish_reason is not None:
                    finish = _FINISH[step.finish_reason]
                    break
                if job.cancelled.is_set():
                    finish = "cancelled"
                    break
                if time.monotonic() >= job.deadline:
                    finish, timed_out = "length", True
                    break
        except PcmoeError as e:  # validation of the prompt
            return "error", APIError(400, str(e), param="prompt")
        except Exception as e:
            log.exception("generation failed")
            return "error", APIError(500, f"generation failed ({type(e).__name__})", type="server_error")
        finally:
            steps.close()  # frees the engine at once when we stopped early
            self.stats = engine.stats()
            if user_state is not None:
                self.states.save(engine, job.user)
            self.metrics.prompt_tokens.inc(len(job.ids))
            self.metrics.completion_tokens.inc(n)
        if finish != "stop" and (rest := stops.flush()):  # held back for a stop string that never came
            job.emit("token", rest)
        decode_s = last.decode_s if last else 0.0
        if n > 1 and decode_s > 0:
            self.metrics.tokens_per_s.set((n - 1) / decode_s)
        info = _request_stats(before, self.stats)
        info.update(queue_s=queue_s, prefill_s=last.prefill_s if last else 0.0, decode_s=decode_s,
                    decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
                    timed_out=timed_out, user_state=user_state)
        return "done", _Outcome(finish, len(job.ids), n, info)


# -- metrics ----------------------------------------------------------------------------------


class _EngineCollector:
    """Committee and memory metrics from the worker's latest engine snapshot, read at scrape time."""

    def __init__(self, worker: EngineWorker):
        self.worker = worker

    def collect(self):
        s = self.worker.stats
        layers = s["per_layer"]

        def counter(name, doc, value=None, per_layer=None):
            m = CounterMetricFamily(name, doc, labels=["layer"] if per_layer else None)
            if per_layer:
                for layer in layers:
                    m.add_metric([str(layer["layer"])], layer[per_layer])
            else:
                m.add_metric([], value)
            return m

        def gauge(name, doc, value=None, per_layer=None):
            m = GaugeMetricFamily(name, doc, labels=["layer"] if per_layer else None)
            if per_layer:
                for layer in layers:
                    m.add_metric([str(layer["layer"])], layer[per_layer])
            else:
                m.add_metric([], value)
            return m

        yield counter("pcmoe_expert_hits", "Router choices served by a resident expert", per_layer="hits")
        yield counter("pcmoe_expert_misses", "Router choices whose expert was not resident", per_layer="misses")
        yield counter("pcmoe_layer_swaps", "Expert swaps into the committee", per_layer="swaps")
        yield gauge("pcmoe_layer_router_mass_outside", "Share of router weight on absent experts",
                    per_layer="router_mass_outside")
        yield gauge("pcmoe_committee_size", "Committee members per layer", per_layer="committee_size")
        yield gauge("pcmoe_hit_rate", "Share of router choices served by resident experts", s["hit_rate"])
        yield gauge("pcmoe_router_mass_outside", "Share of router weight on absent experts",
                    s["router_mass_outside"])
        yield counter("pcmoe_swaps", "Expert swaps", s["swaps"])
        yield counter("pcmoe_swap_failures", "Expert swaps that failed", s["swap_failures"])
        yield counter("pcmoe_expert_bytes_read", "Expert bytes read from storage", s["bytes_read"])
        yield counter("pcmoe_stall_seconds", "Time computation waited for expert reads", s["stall_s"])
        yield gauge("pcmoe_resident_bytes", "Weights resident in memory", s["resident_bytes"])
        yield gauge("pcmoe_budget_bytes", "Weight memory budget", s["budget_bytes"])
        yield gauge("pcmoe_full_model_bytes", "Weights of the whole model", s["full_model_bytes"])
        yield gauge("pcmoe_process_rss_bytes", "Resident set size of the server process", rss_bytes())
        yield gauge("pcmoe_process_peak_rss_bytes", "Peak resident set size of the server process",
                    s["peak_rss_bytes"])


class _Metrics:
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

    def attach(self, worker: EngineWorker) -> None:
        self.queue_depth.set_function(lambda: worker.waiting)
        self.busy.set_function(lambda: worker.running)
        self.registry.register(_EngineCollector(worker))


# -- HTTP plumbing ----------------------------------------------------------------------------


class _Gate:
    """ASGI middleware in front of the routes: request metrics, API key, body size limit."""

    def __init__(self, app, *, metrics: _Metrics, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.metrics = metrics
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status, t0 = 500, time.perf_counter()

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

    async def _handle(self, scope, receive, send):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"].startswith("/v1") and not self._authorized(headers):
            error = APIError(401, "missing or invalid API key: send Authorization: Bearer <key>",
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return await error.response()(scope, receive, send)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body = await self._read_body(headers, receive)
            if body is None:
                error = APIError(413, f"the request body exceeds {self.max_body_bytes} bytes",
                                 code="request_too_large")
                return await error.response()(scope, receive, send)
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _authorized(self, headers: dict) -> bool:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())

    async def _read_body(self, headers: dict, receive) -> bytes | None:
        """The whole body, or None past the limit (checked before reading when the length is declared)."""
        with contextlib.suppress(ValueError):
            if int(headers.get("content-length", "0")) > self.max_body_bytes:
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected: the app sees an empty body, then the disconnect
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive):
    """An ASGI receive that returns the buffered body, then the client's own messages (the disconnect)."""
    done = False

    async def replay():
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class _EventStream(StreamingResponse):
    """Server-sent events whose end, however it comes (done, client gone, error), cancels the job."""

    def __init__(self, chunks, on_close):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            # the request's disconnect watcher (see Service._run) ends the stream when the client leaves
            await self.stream_response(send)
        except OSError:  # uvicorn's ClientDisconnected: the client left while we wrote
            pass
        finally:
            self._on_close()
            await self.body_iterator.aclose()


async def _cancel_on_disconnect(request: Request, job: _Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


# -- the API ----------------------------------------------------------------------------------

# Canonical composition (NFC, NFKC) merges at most 4 code points into one character (U+1F82 and the like
# have the longest canonical decompositions; Hangul syllables merge 3), and Unicode's stability policy
# keeps it so.
_MAX_COMPOSITION = 4
_SAFE_NORMALIZERS = {"NFC": _MAX_COMPOSITION, "NFKC": _MAX_COMPOSITION, "NFD": 1, "NFKD": 1, "Lowercase": 1}
_SAFE_PRE_TOKENIZERS = ("ByteLevel", "Split", "Digits", "Punctuation")


def _chars_per_token(tokenizer) -> int | None:
    """At most how many characters of raw text one token covers, or None where no bound is known.

    Byte-level BPE turns every character into at least one byte and every byte into one vocabulary
    character, so a token covers at most as many characters as its vocabulary string is long; an added
    token matched in the raw text covers its own length. A canonical-composition normalizer may first
    shrink the text by up to _MAX_COMPOSITION. Any other normalizer or pre-tokenizer may drop text
    (whitespace, control characters), BPE drops bytes missing from its vocabulary, and WordPiece's [UNK]
    covers a whole word: no bound then."""
    from tokenizers.pre_tokenizers import ByteLevel

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except Exception:
        return None

    def parts(node: dict | None, key: str) -> list[dict]:
        return [] if node is None else node[key] if node.get("type") == "Sequence" else [node]

    shrink = 1
    for n in parts(spec.get("normalizer"), "normalizers"):
        if n.get("type") not in _SAFE_NORMALIZERS:
            return None
        shrink *= _SAFE_NORMALIZERS[n["type"]]
    pre = parts(spec.get("pre_tokenizer"), "pretokenizers")
    if (spec.get("model", {}).get("type") != "BPE" or not any(t.get("type") == "ByteLevel" for t in pre)
            or any(t.get("type") not in _SAFE_PRE_TOKENIZERS or t.get("behavior") == "Removed" for t in pre)):
        return None
    vocab = tokenizer.get_vocab()  # added tokens included
    if not set(ByteLevel.alphabet()) <= vocab.keys():
        return None
    return shrink * max(map(len, vocab))


def _check_text(value: str, param: str) -> None:
    """JSON can carry lone UTF-16 surrogates ("\\ud800"); they are not Unicode text and nothing downstream
    (tokenizer, hashing, the JSON encoder of replies) takes them."""
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"'{param}' is not valid Unicode: a lone UTF-16 surrogate (U+{ord(value[e.start]):04X}) "
                            f"at character {e.start}", param=param, code="invalid_value") from None


async def _get(queue: asyncio.Queue, timeout: float):
    """queue.get() within `timeout` seconds. An event already there is returned even when the time is up
    (wait_for with a timeout <= 0 gives up at once before Python 3.12)."""
    if not queue.empty():
        return queue.get_nowait()
    return await asyncio.wait_for(queue.get(), timeout=max(0.0, timeout))


class Service:
    """Request handling: validation here, tokenising on a tokenizer thread, generation on the engine thread."""

    # How long past its deadline a request waits for the engine, which stops at its next token there:
    # a step (a prefill included) that takes longer means the engine is stuck.
    grace_s = 30.0

    def __init__(self, engine, worker: EngineWorker, metrics: _Metrics, model_name: str, request_timeout_s: float):
        self.engine = engine
        self.worker = worker
        self.metrics = metrics
        self.model_name = model_name
        self.request_timeout_s = request_timeout_s
        self.context = getattr(engine.config, "max_position_embeddings", None)
        self.vocab_size = getattr(engine.config, "vocab_size", None)
        self.chat_stop_ids = turn_end_ids(engine.tokenizer)
        self.created = int(time.time())
        per_token = _chars_per_token(engine.tokenizer) if self.context else None
        self.max_chars = self.context * per_token if per_token else None
        self.chars_per_token = per_token
        # one thread: tokenising stays off the event loop and takes one core at most
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pcmoe-tokenize")

    def close(self) -> None:
        self._tokenizer_thread.shutdown(wait=True, cancel_futures=True)

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "pcmoe"}

    # -- validation

    def _check_common(self, req: _Sampling) -> None:
        for name in ("model", "user"):
            if getattr(req, name) is not None:
                _check_text(getattr(req, name), name)
        for s in [req.stop] if isinstance(req.stop, str) else req.stop or []:
            _check_text(s, "stop")
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")
        if req.n not in (None, 1):
            raise APIError(400, "only n=1 is supported", param="n", code="invalid_value")
        for name in UNSUPPORTED:
            if (req.model_extra or {}).get(name) not in (None, False, 0, [], {}):
                raise APIError(400, f"'{name}' is not supported by this server", param=name,
                               code="unsupported_parameter")

    def _check_length(self, text: str, param: str) -> None:
        """Refuse, before tokenising it, text that has more tokens than the context whatever it says."""
        if self.max_chars is not None and len(text) > self.max_chars:
            raise APIError(400, f"the prompt has {len(text)} characters, more than the model's context of "
                                f"{self.context} tokens can hold (a token covers at most {self.chars_per_token} "
                                f"characters)", param=param, code="context_length_exceeded")

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, fn, *args)

    async def _completion_ids(self, prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, "batched prompts are not supported: send one prompt per request",
                               param="prompt", code="invalid_value")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if self.engine.tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
            _check_text(prompt, "prompt")
            self._check_length(prompt, "prompt")
            return await self._off_loop(self.engine.encode, prompt)
        ids = list(prompt)
        if self.vocab_size and any(not 0 <= i < self.vocab_size for i in ids):
            raise APIError(400, f"token ids must lie in [0, {self.vocab_size})", param="prompt",
                           code="invalid_value")
        return ids

    def _conversation(self, messages: list[_Message]) -> list[dict]:
        if self.engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so it cannot chat", param="messages")
        conversation = []
        for i, m in enumerate(messages):
            content = m.content or ""
            if isinstance(content, list):
                if any(p.type != "text" or p.text is None for p in content):
                    raise APIError(400, "only text content parts are supported", param=f"messages[{i}].content",
                                   code="invalid_value")
                for j, p in enumerate(content):
                    _check_text(p.text, f"messages[{i}].content[{j}].text")
                content = "".join(p.text for p in content)
            else:
                _check_text(content, f"messages[{i}].content")
            conversation.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        return conversation

    def _chat_ids(self, conversation: list[dict]) -> tuple[list[int], list[str]]:  # tokenizer thread
        try:
            text, stop = chat_prompt(self.engine.tokenizer, conversation)
        except Exception as e:  # the template rejects the conversation (e.g. roles out of order)
            raise APIError(400, f"the chat template rejects these messages: {_one_line(e)}",
                           param="messages") from None
        self._check_length(text, "messages")  # the templated text: a template may trim or drop content
        return self.engine.encode(text), stop

    def _max_tokens(self, ids: list[int], requested: int | None, default: int | None, param: str) -> int:
        if not ids:
            raise APIError(400, "the prompt is empty", param=param, code="invalid_value")
        if self.context and len(ids) >= self.context:
            raise APIError(400, f"the prompt has {len(ids)} tokens but the model's context is {self.context} "
                                f"tokens", param=param, code="context_length_exceeded")
        room = self.context - len(ids) if self.context else None
        if requested is None:  # the default, or as much as fits
            limits = [x for x in (default, room) if x is not None]
            return min(limits) if limits else 256
        if room is not None and requested > room:
            raise APIError(400, f"the model's context is {self.context} tokens: the prompt has {len(ids)} and "
                                f"max_tokens asks for {requested} more (at most {room})", param="max_tokens",
                           code="context_length_exceeded")
        return requested

    # -- endpoints

    async def completions(self, req: CompletionRequest, request: Request):
        self._check_common(req)
        ids = await self._completion_ids(req.prompt)
        max_tokens = self._max_tokens(ids, req.max_tokens, 16, "prompt")
        return await self._run("completion", req, request, ids, max_tokens, [], frozenset())

    async def chat(self, req: ChatRequest, request: Request):
        self._check_common(req)
        ids, stop = await self._off_loop(self._chat_ids, self._conversation(req.messages))
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = self._max_tokens(ids, requested, None, "messages")
        return await self._run("chat", req, request, ids, max_tokens, stop, self.chat_stop_ids)

    async def _run(self, kind: str, req: _Sampling, request: Request, ids, max_tokens, stop, stop_ids):
        t0 = time.monotonic()
        endpoint = request.url.path
        stop = ([req.stop] if isinstance(req.stop, str) else list(req.stop or [])) + stop
        job = _Job(ids=ids, max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                   top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=stop, stop_ids=stop_ids,
                   user=req.user or None, deadline=t0 + self.request_timeout_s, loop=asyncio.get_running_loop())
        try:
            self.worker.submit(job)
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({self.worker.waiting} requests waiting); retry later",
                           type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))

        def finish():
            watcher.cancel()
            job.cancel()

        try:
            first = await self._first_event(job)
            if first[0] == "token":
                self.metrics.ttft.labels(endpoint).observe(time.monotonic() - t0)
            head = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                    "object": "chat.completion" if kind == "chat" else "text_completion",
                    "created": int(time.time()), "model": self.model_name}
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                return _EventStream(self._stream(kind, head, job, first, include_usage), finish)
            text, outcome = await self._collect(job, first)
        except _ClientGone:
            finish()
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        except BaseException:
            finish()
            raise
        finish()
        return JSONResponse(self._reply(kind, head, text, outcome))

    async def _first_event(self, job: _Job) -> tuple[str, Any]:
        try:
            event = await _get(job.events, job.deadline - time.monotonic())
        except asyncio.TimeoutError:
            if job.drop_if_queued():
                raise APIError(503, f"timed out after {self.request_timeout_s:g} s waiting for the engine; retry "
                                    f"later", type="server_error", code="timeout",
                               headers={"Retry-After": str(self.worker.retry_after())}) from None
            event = await self._next_event(job)  # it runs: it stops after its first token, past the deadline
        if event[0] == "error":
            raise event[1]
        if event[0] == "cancelled":
            raise _ClientGone
        return event

    async def _next_event(self, job: _Job) -> tuple[str, Any]:
        try:
            return await _get(job.events, job.deadline + self.grace_s - time.monotonic())
        except asyncio.TimeoutError:
            log.error("the engine gave no token for %g s past a request's deadline", self.grace_s)
            raise APIError(503, "the engine did not answer in time; retry later", type="server_error",
                           code="timeout", headers={"Retry-After": str(self.worker.retry_after())}) from None

    async def _collect(self, job: _Job, event) -> tuple[str, _Outcome]:
        parts = []
        while True:
            kind, value = event
            if kind == "token":
                parts.append(value)
            elif kind == "done":
                return "".join(parts), value
            elif kind == "error":
                raise value
            else:
                raise _ClientGone
            event = await self._next_event(job)

    @staticmethod
    def _usage(outcome: _Outcome) -> dict:
        return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
                "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}

    def _reply(self, kind: str, head: dict, text: str, outcome: _Outcome) -> dict:
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": outcome.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": outcome.finish_reason}
        return {**head, "choices": [choice], "usage": self._usage(outcome), "pcmoe": outcome.pcmoe}

    async def _stream(self, kind: str, head: dict, job: _Job, event, include_usage: bool):
        head = {**head, "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}

        def chunk(text: str | None, finish: str | None = None, delta: dict | None = None, **extra) -> str:
            if kind == "chat":
                delta = delta or ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            # OpenAI: with include_usage every chunk carries "usage": null, and one more at the end the usage
            return _sse({**head, "choices": [choice], **({"usage": None} if include_usage else {}), **extra})

        if kind == "chat":
            yield chunk(None, delta={"role": "assistant", "content": ""})
        while True:
            name, value = event
            if name == "token":
                if value:
                    yield chunk(value)
            elif name == "done":
                yield chunk(None, value.finish_reason, pcmoe=value.pcmoe)
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": self._usage(value)})
                break
            elif name == "error":
                yield _sse(value.body())
                break
            else:  # cancelled: the client is gone
                return
            try:
                event = await self._next_event(job)
            except APIError as e:
                event = "error", e
        yield _sse("[DONE]")


def create_app(engine, *, model_name: str, api_key: str | None = None, queue_size: int = 8,
               request_timeout_s: float = 300.0, state_dir: str | os.PathLike | None = None,
               max_users: int = 1000, max_body_bytes: int = 1 << 20) -> FastAPI:
    """The FastAPI app serving `engine` (which the caller closes). `state_dir` None: no per-user states;
    `api_key` None: no authentication (an empty key is an error, not a way to say none)."""
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key is empty: pass None to serve without authentication")
    metrics = _Metrics()
    states = _UserStates(state_dir, max_users) if state_dir else None
    worker = EngineWorker(engine, queue_size, states, metrics)
    metrics.attach(worker)
    service = Service(engine, worker, metrics, model_name, request_timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(worker.close)
        await asyncio.to_thread(service.close)

    app = FastAPI(title="pcmoe", version="0.1.0", lifespan=lifespan)
    app.state.service = service

    async def api_error(request, exc: APIError):
        return exc.response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)

    async def http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", code=code,
                        headers=getattr(exc, "headers", None)).response()

    app.add_exception_handler(StarletteHTTPException, http_error)

    async def server_error(request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return APIError(500, "internal server error", type="server_error").response()

    app.add_exception_handler(Exception, server_error)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await service.completions(req, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        return await service.chat(req, request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if model != model_name:
            raise APIError(404, f"the model '{model}' does not exist", param="model", code="model_not_found")
        return service.model_card()

    @app.get("/v1/pcmoe/stats")
    async def stats():
        return worker.stats

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "busy": bool(worker.running), "queue_depth": worker.waiting}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_Gate, metrics=metrics, api_key=api_key, max_body_bytes=max_body_bytes)
    return app


# -- command line -----------------------------------------------------------------------------


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    g.add_argument("--api-key", default=os.environ.get("PCMOE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $PCMOE_API_KEY, else open); "
                        "/health and /metrics stay open")
    g.add_argument("--model-name", help="model id clients send (default: the checkpoint folder's name)")
    g.add_argument("--queue-size", type=int, default=8,
                   help="requests that may wait while one computes; more get 429 (default 8)")
    g.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds per request from arrival: queued -> 503, generating -> stops with "
                        "finish_reason 'length' (default 300)")
    g.add_argument("--state-dir", help="folder of per-user committee states (default: "
                                       "~/.cache/pcmoe/users/<model hash>)")
    g.add_argument("--no-user-state", action="store_true", help="no per-user committee states")
    g.add_argument("--max-users", type=int, default=1000,
                   help="user states kept; beyond it the least recently used is deleted (default 1000)")
    g.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit (default 1 MiB)")
    g.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def default_state_dir(model: str | os.PathLike) -> Path:
    root = Path(os.environ.get("PCMOE_CACHE") or Path.home() / ".cache" / "pcmoe")
    return root / "users" / hashlib.sha1(str(Path(model).resolve()).encode()).hexdigest()[:12]


def cmd_serve(args) -> int:
    import uvicorn

    from pcmoe.args import engine_from_args

    for ok, message in ((0 <= args.port < 65536, "--port must be in 0..65535"),
                        (args.queue_size >= 0, "--queue-size must be >= 0"),
                        (args.request_timeout > 0, "--request-timeout must be positive"),
                        (args.max_users >= 1, "--max-users must be at least 1"),
                        (args.api_key is None or args.api_key.strip() != "",
                         "--api-key (or $PCMOE_API_KEY) is empty: give a key, or unset it to serve without one"),
                        (args.max_body_bytes >= 1024, "--max-body-bytes must be at least 1024")):
        if not ok:
            raise SystemExit(f"error: {message}")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    engine = engine_from_args(args)
    try:
        name = args.model_name or Path(args.model).resolve().name
        state_dir = None if args.no_user_state else (args.state_dir or default_state_dir(args.model))
        app = create_app(engine, model_name=name, api_key=args.api_key, queue_size=args.queue_size,
                         request_timeout_s=args.request_timeout, state_dir=state_dir, max_users=args.max_users,
                         max_body_bytes=args.max_body_bytes)
        print(f"serving {name} at http://{args.host}:{args.port}/v1"
              + (f" (user states in {state_dir})" if state_dir else ""), file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        engine.close()
    return 0
