"""The engine thread: one generation at a time, a bounded FIFO, cancellation and deadlines.

The engine computes one request at a time (batch 1, as on an edge device): generations run on a
single engine thread and other requests wait in a FIFO of at most `queue_size`; beyond it submit()
raises QueueFull. A job whose client disconnects is cancelled at the next token (queued: it leaves
the queue). A job still generating at its deadline stops there with finish_reason "length" and
`timed_out`, so a client always keeps the text it paid for; the deadline of a queued job is the
API's to enforce (drop_if_queued).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pcmoe.options import PcmoeError
from pcmoe.server.errors import APIError

log = logging.getLogger("pcmoe.server")

_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
# what a reply's "pcmoe" object takes from the engine's statistics of its request
REQUEST_STATS = ("choices", "hits", "hit_rate", "router_mass_outside", "exchanged", "skipped", "swaps", "bytes_read",
                 "stall_s")


@dataclass
class Outcome:
    finish_reason: str            # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    pcmoe: dict                   # this request's committee statistics and timings


@dataclass
class Job:
    """One generation. The engine thread reports through `events`: ("token", text)..., then
    ("done", Outcome) or ("error", APIError), always; ("cancelled", None) when it was cancelled."""

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


class EngineWorker:
    """Runs generations one at a time on a single thread; the others wait in a bounded FIFO.
    `stats` is the engine's latest statistics snapshot (engine.stats() runs on the engine thread only)."""

    def __init__(self, engine, queue_size: int, states, metrics):
        self.engine = engine
        self.queue_size = queue_size
        self.states = states          # UserStates, or None: no per-user states
        self.metrics = metrics
        self.stats = engine.stats()
        self.waiting = 0
        self.running = 0
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pcmoe-engine")
        self._current: Job | None = None
        self._last_user: str | None = None
        self._mean_s = 1.0            # running mean of generation time, for Retry-After

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.waiting + self.running > self.queue_size:
                raise QueueFull(self.retry_after())
            self.waiting += 1
        job.future = self._executor.submit(self._run, job)
        job.future.add_done_callback(lambda future: self._left_queue(future, job))

    def retry_after(self) -> int:
        return max(1, min(60, math.ceil(self._mean_s * (self.waiting + 1))))

    def _left_queue(self, future: Future, job: Job) -> None:
        if future.cancelled():  # dropped before it ran: by its client, its deadline or a shutdown
            with self._lock:
                self.waiting -= 1
            job.emit("error", APIError(503, "the server is shutting down", type="server_error", code="shutdown"))

    def set_budget(self, budget) -> tuple[dict, Future | None]:
        """Give the engine a new budget (PcmoeError, nothing changed, when it cannot be served).
        A running generation applies it at its next token; an idle engine applies it now on the
        engine thread (the future, done once applied and the statistics refreshed)."""
        from pcmoe.server.live import planned_sizes

        sizes, order = planned_sizes(self.engine, budget)
        summary = {**self.engine.set_budget(budget, now=False, sizes=sizes), "order": order}
        with self._lock:
            idle = self.waiting + self.running == 0
        log.info("budget change to %s: committee sizes %s", summary["budget"], summary["committee_sizes"])
        return summary, self._executor.submit(self._apply_budget) if idle else None

    def _apply_budget(self) -> None:  # engine thread
        self.engine.apply_budget()
        self.stats = self.engine.stats()

    def close(self) -> None:
        job = self._current
        if job is not None:
            job.cancelled.set()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _run(self, job: Job) -> None:  # engine thread
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

    def _generate(self, job: Job, queue_s: float) -> tuple[str, Any]:
        engine = self.engine
        user_state = None
        if self.states is not None and job.user is not None:
            # the same user again: the committee is already theirs
            restored = job.user == self._last_user or self.states.restore(engine, job.user)
            user_state = "restored" if restored else "new"
        self._last_user = job.user
        mark = engine.counters()  # for a generation stopped here, before the engine ends it
        ids, sent, finish, timed_out, last = [], 0, None, False, None
        steps = engine.generate(job.ids, max_new_tokens=job.max_tokens, temperature=job.temperature,
                                top_p=job.top_p, seed=job.seed, stop=job.stop, stop_token_ids=job.stop_ids)
        try:
            for step in steps:
                ids.append(step.token_id)
                last, sent = step, sent + len(step.text)
                job.emit("token", step.text)
                if step.finish_reason is not None:
                    finish = _FINISH[step.finish_reason]
                    break
                if job.cancelled.is_set():
                    finish = "cancelled"
                    break
                if time.monotonic() >= job.deadline:
                    finish, timed_out = "length", True
                    break
        except PcmoeError as e:  # the engine refused the prompt
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
            self.metrics.completion_tokens.inc(len(ids))
        if timed_out and engine.tokenizer is not None:
            # the text generate() held back because it might begin a stop string: no stop string came
            if rest := engine.decode(ids)[sent:]:
                job.emit("token", rest)
        # the engine's statistics of this request; when we stopped it first, the same from its counters
        stats = last.stats if last is not None and last.stats else engine.stats(since=mark)
        n, decode_s = len(ids), last.decode_s if last else 0.0
        speed = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0
        if speed:
            self.metrics.tokens_per_s.set(speed)
        info = {key: stats[key] for key in REQUEST_STATS}
        info.update(queue_s=queue_s, prefill_s=last.prefill_s if last else 0.0, decode_s=decode_s,
                    decode_tokens_per_s=speed, timed_out=timed_out, user_state=user_state)
        return "done", Outcome(finish, len(job.ids), n, info)
