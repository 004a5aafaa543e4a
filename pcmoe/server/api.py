"""The HTTP API: routes, request handling, replies and server-sent event streams.

Endpoints: POST /v1/completions and /v1/chat/completions (JSON, or SSE with `stream: true`), GET
/v1/models, /health, /metrics (Prometheus) and /v1/pcmoe/stats (the engine's statistics as JSON);
with an admin token, POST /admin/budget {"budget": "300MB"} changes the weight budget while serving
(in-flight requests go on; a budget that cannot be served is a 400 that changes nothing).

A request: gate (gate.py: auth, body limit) → request model (schema.py) → Service.completions /
chat: checks, prompt → ids on the tokenizer thread (prompts.py), token limit → EngineWorker.submit
(worker.py) → events from the engine thread → JSON reply or SSE stream.

`request_timeout_s` counts from a request's arrival: still queued at the deadline -> 503;
generating -> the generation stops there with finish_reason "length" (and `"pcmoe": {"timed_out":
true}`). An engine that gives no token for Service.grace_s past the deadline is stuck: the request
gets 503 anyway. (A queued request rarely times out: each one ahead of it stops at its own,
earlier, deadline.)

Usage. A reply has `usage`; a stream has it only with `stream_options: {"include_usage": true}`, as
in OpenAI's API: then every chunk has `"usage": null` and one last chunk, with `"choices": []`, comes
before `data: [DONE]` with the usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pcmoe.generation import turn_end_ids
from pcmoe.options import PcmoeError
from pcmoe.server.errors import APIError, check_sampling_fields, install_handlers
from pcmoe.server.gate import Gate, bearer_matches
from pcmoe.server.metrics import Metrics
from pcmoe.server.prompts import Prompts, text
from pcmoe.server.schema import UNSUPPORTED, ChatRequest, CompletionRequest, Sampling
from pcmoe.server.states import UserStates
from pcmoe.server.worker import EngineWorker, Job, Outcome, QueueFull

log = logging.getLogger("pcmoe.server")


class _ClientGone(Exception):
    """The client disconnected; nobody reads the reply."""


class Service:
    """Request handling: checks here, tokenising on a tokenizer thread, generation on the engine thread."""

    # How long past its deadline a request waits for the engine, which stops at its next token there:
    # a step (a prefill included) that takes longer means the engine is stuck.
    grace_s = 30.0

    def __init__(self, engine, worker: EngineWorker, metrics: Metrics, model_name: str, request_timeout_s: float):
        self.engine = engine
        self.worker = worker
        self.metrics = metrics
        self.model_name = model_name
        self.request_timeout_s = request_timeout_s
        self.prompts = Prompts(engine, engine.context)
        self.chat_stop_ids = turn_end_ids(engine.tokenizer)
        self.created = int(time.time())

    def close(self) -> None:
        self.prompts.close()

    async def set_budget(self, budget, wait_s: float = 30.0) -> dict:
        """A live budget change (the admin call and the signal): applied at once on an idle engine
        (this waits for it, up to wait_s), else at the running generation's next token."""
        if isinstance(budget, bool) or not isinstance(budget, (str, int, float)):
            raise APIError(400, "'budget' must be a string (300MB, 40%experts) or a number of bytes", param="budget",
                           code="invalid_value")
        try:
            summary, applying = await asyncio.to_thread(self.worker.set_budget, budget)  # the planner: ~0.5 s
        except PcmoeError as e:
            raise APIError(400, str(e), param="budget", code="invalid_budget") from None
        applied = False
        if applying is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.wrap_future(applying), wait_s)
                applied = True
        stats = self.worker.stats
        return {"object": "pcmoe.budget", "applied": applied, **summary,
                "resident_bytes": stats["resident_bytes"], "rss_bytes": stats["rss_bytes"]}

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "pcmoe"}

    def _check_common(self, req: Sampling) -> None:
        for name in ("model", "user"):
            if getattr(req, name) is not None:
                text(getattr(req, name), name)
        # what pydantic let through meets the CLI's rules too (lone surrogates in stop strings, say)
        check_sampling_fields({"temperature": req.temperature, "top_p": req.top_p, "max_tokens": req.max_tokens,
                               "seed": req.seed, "stop": req.stop})
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")
        if req.n not in (None, 1):
            raise APIError(400, "only n=1 is supported", param="n", code="invalid_value")
        for name in UNSUPPORTED:
            if (req.model_extra or {}).get(name) not in (None, False, 0, [], {}):
                raise APIError(400, f"'{name}' is not supported by this server", param=name,
                               code="unsupported_parameter")

    # -- endpoints

    async def completions(self, req: CompletionRequest, request: Request):
        self._check_common(req)
        ids = await self.prompts.completion(req.prompt)
        max_tokens = self.prompts.max_tokens(ids, req.max_tokens, 16, "prompt")
        return await self._run("completion", req, request, ids, max_tokens, [], frozenset())

    async def chat(self, req: ChatRequest, request: Request):
        self._check_common(req)
        check_sampling_fields({"max_completion_tokens": req.max_completion_tokens})
        ids, stop = await self.prompts.chat(req.messages)
        if req.max_completion_tokens is not None:
            requested, param = req.max_completion_tokens, "max_completion_tokens"
        else:
            requested, param = req.max_tokens, "max_tokens"
        max_tokens = self.prompts.max_tokens(ids, requested, None, "messages", param)
        return await self._run("chat", req, request, ids, max_tokens, stop, self.chat_stop_ids)

    async def _run(self, kind: str, req: Sampling, request: Request, ids, max_tokens, stop, stop_ids):
        t0 = time.monotonic()
        endpoint = request.url.path
        job = Job(ids=ids, max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                  top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=req.stops() + stop,
                  stop_ids=stop_ids, user=req.user or None, deadline=t0 + self.request_timeout_s,
                  loop=asyncio.get_running_loop())
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
            reply, outcome = await self._collect(job, first)
        except _ClientGone:
            finish()
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        except BaseException:
            finish()
            raise
        finish()
        return JSONResponse(self._reply(kind, head, reply, outcome))

    async def _first_event(self, job: Job) -> tuple[str, Any]:
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

    async def _next_event(self, job: Job) -> tuple[str, Any]:
        try:
            return await _get(job.events, job.deadline + self.grace_s - time.monotonic())
        except asyncio.TimeoutError:
            log.error("the engine gave no token for %g s past a request's deadline", self.grace_s)
            raise APIError(503, "the engine did not answer in time; retry later", type="server_error",
                           code="timeout", headers={"Retry-After": str(self.worker.retry_after())}) from None

    async def _collect(self, job: Job, event) -> tuple[str, Outcome]:
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
    def _usage(outcome: Outcome) -> dict:
        return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
                "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}

    def _reply(self, kind: str, head: dict, reply: str, outcome: Outcome) -> dict:
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": reply}, "logprobs": None,
                      "finish_reason": outcome.finish_reason}
        else:
            choice = {"index": 0, "text": reply, "logprobs": None, "finish_reason": outcome.finish_reason}
        return {**head, "choices": [choice], "usage": self._usage(outcome), "pcmoe": outcome.pcmoe}

    async def _stream(self, kind: str, head: dict, job: Job, event, include_usage: bool):
        head = {**head, "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}

        def chunk(delta_text: str | None, finish: str | None = None, delta: dict | None = None, **extra) -> str:
            if kind == "chat":
                delta = delta or ({} if delta_text is None else {"content": delta_text})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
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


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


async def _get(queue: asyncio.Queue, timeout: float):
    """queue.get() within `timeout` seconds. An event already there is returned even when the time is up
    (wait_for with a timeout <= 0 gives up at once before Python 3.12)."""
    if not queue.empty():
        return queue.get_nowait()
    return await asyncio.wait_for(queue.get(), timeout=max(0.0, timeout))


def create_app(engine, *, model_name: str, api_key: str | None = None, queue_size: int = 8,
               request_timeout_s: float = 300.0, state_dir: str | os.PathLike | None = None,
               max_users: int = 1000, max_body_bytes: int = 1 << 20, admin_token: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (which the caller closes). `state_dir` None: no per-user states
    (one that cannot be created raises OSError; `pcmoe serve` checks it first and serves without);
    `api_key` None: no authentication (an empty key is an error, not a way to say none);
    `admin_token` None: no admin endpoint (POST /admin/budget answers 404)."""
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key is empty: pass None to serve without authentication")
    if admin_token is not None and not admin_token.strip():
        raise ValueError("admin_token is empty: pass None to serve without the admin endpoint")
    metrics = Metrics()
    states = UserStates(state_dir, max_users) if state_dir else None
    worker = EngineWorker(engine, queue_size, states, metrics)
    metrics.attach(worker, engine)
    service = Service(engine, worker, metrics, model_name, request_timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(worker.close)
        await asyncio.to_thread(service.close)

    app = FastAPI(title="pcmoe", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    install_handlers(app)

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

    @app.post("/admin/budget")
    async def admin_budget(request: Request):
        if admin_token is None:
            raise APIError(404, "the admin endpoint is off: start the server with --admin-token", code="not_found")
        if not bearer_matches(request.headers.get("authorization", ""), admin_token):
            raise APIError(401, "missing or invalid admin token: send Authorization: Bearer <admin token>",
                           code="invalid_admin_token", headers={"WWW-Authenticate": "Bearer"})
        try:
            body = await request.json()
        except ValueError:
            raise APIError(400, 'the body must be JSON: {"budget": "300MB"}', code="invalid_json") from None
        if not isinstance(body, dict) or "budget" not in body:
            raise APIError(400, 'the body must be {"budget": "300MB"} (or a number of bytes)', param="budget",
                           code="missing_field")
        return await service.set_budget(body["budget"])

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "busy": bool(worker.running), "queue_depth": worker.waiting}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    app.add_middleware(Gate, metrics=metrics, api_key=api_key, max_body_bytes=max_body_bytes)
    return app
