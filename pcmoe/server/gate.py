"""The ASGI middleware in front of every route: request metrics, the API key, the body size limit.

With an API key, /v1/... needs `Authorization: Bearer KEY`; /health and /metrics stay open for
probes and scrapers (they show the model name and counts, never a request's text). /admin/...
checks its own token (the admin route), never the API key.
"""

from __future__ import annotations

import contextlib
import hmac
import time

from pcmoe.server.errors import APIError

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/pcmoe/stats", "/health", "/metrics",
             "/admin/budget")


class Gate:
    """ASGI middleware: counts and times every request (by endpoint and status), refuses /v1/... without
    the key (401) and bodies over `max_body_bytes` (413), declared or streamed."""

    def __init__(self, app, *, metrics, api_key: str | None, max_body_bytes: int):
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
        return bearer_matches(headers.get("authorization", ""), self.api_key)

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


def bearer_matches(authorization: str, key: str) -> bool:
    """Whether an Authorization header is `Bearer <key>` (compared in constant time)."""
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


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
