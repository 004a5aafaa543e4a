"""OpenAI-shaped errors, `{"error": {"message", "type", "param", "code"}}`, and the handlers that turn
FastAPI's and Starlette's own errors into them.

A client's mistake is always a 4xx: 400 for invalid JSON, fields and values (FastAPI's 422
included; the sampling values' messages come from pcmoe.options.check_sampling, the rules the CLI
applies too), 401 without the API key, 404 for an unknown model or path, 405 for a wrong method, 413
for a body over the limit, 415 for a non-JSON body. Anything else is a 500 for that request only.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pcmoe.options import OptionError, check_sampling

log = logging.getLogger("pcmoe.server")

# request fields check_sampling rules on, and the name it knows each by
SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "max_tokens": "max_tokens",
                   "max_completion_tokens": "max_tokens", "seed": "seed", "stop": "stop"}


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


def option_error(e: OptionError, param: str | None = None) -> APIError:
    """A 400 for a value pcmoe.options refused; `param` names the field when the rule's name differs
    (max_completion_tokens is ruled on as max_tokens)."""
    param = param or e.param
    return APIError(400, e.message(f"'{param}'"), param=param, code="invalid_value")


def check_sampling_fields(values: dict) -> None:
    """check_sampling on request fields ({field: value}, None = not given), as APIError."""
    for name, value in values.items():
        try:
            check_sampling(**{SAMPLING_FIELDS[name]: value})
        except OptionError as e:
            raise option_error(e, name) from None


def is_json(content_type: str) -> bool:
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
    if request.method == "POST" and not is_json(content_type):  # FastAPI validates a non-JSON body as bytes
        return APIError(415, f"expected a JSON body (Content-Type: application/json), got {content_type or 'none'!r}",
                        code="unsupported_media_type").response()
    e = exc.errors()[0]
    loc = tuple(e.get("loc", ()))
    param = _param(loc)
    if e["type"] == "json_invalid":
        error = e.get("ctx", {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON ({error})", code="invalid_json").response()
    if e["type"] == "missing":
        message = f"missing required parameter '{param}'" if param else "the request body is empty"
        return APIError(400, message, param=param, code="missing_required_parameter").response()
    if param is None:
        return APIError(400, "the request body must be a JSON object", code="invalid_type").response()
    if param in SAMPLING_FIELDS and loc[1:2] == (param,):
        # the shared rules say what is wrong (pydantic says "Input should be a valid string" of five stop
        # strings: its first error is the union's first member's, whose input is the whole value)
        try:
            check_sampling_fields({param: e.get("input")})
        except APIError as error:
            return error.response()
    return APIError(400, f"invalid value for '{param}': {e['msg']}", param=param, code="invalid_value").response()


def install_handlers(app: FastAPI) -> None:
    """Every error the app raises or meets, as an OpenAI-shaped body."""

    async def api_error(request, exc: APIError):
        return exc.response()

    async def http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", code=code,
                        headers=getattr(exc, "headers", None)).response()

    async def server_error(request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return APIError(500, "internal server error", type="server_error").response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
