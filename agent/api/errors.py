"""API errors: one exception type inside, rendered in each wire format's own error shape.

Handlers and helpers raise `ApiError`; every other exception (Litestar's validation and HTTP
exceptions, `ModelNotFound`, an engine's `Failed` event) is first turned into one by
`to_api_error`, so each wire format needs exactly one exception handler.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any, Literal

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from agent.engine import ModelNotFound
from agent.generation import Failed

log = logging.getLogger(__name__)

ErrorKind = Literal[
    "invalid_request",
    "authentication",
    "not_found",
    "method_not_allowed",
    "too_large",
    "overloaded",
    "not_supported",
    "internal",
    "unavailable",
]

# Overload is momentary (a full queue or KV budget); clients that honour Retry-After
# (the openai and anthropic SDKs do) come back quickly instead of backing off for long.
RETRY_AFTER_SECONDS = 1


class ApiError(Exception):
    """A request that ends in an error response; `param` names the offending request field."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.message = message
        self.param = param
        self.code = code


class ClientDisconnected(Exception):
    """The client went away before its response was ready; nobody is left to answer."""


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError("invalid_request", message, param=param, code=code)


def unsupported_field(param: str, why: str = "is not supported") -> ApiError:
    """A field flock recognises but does not implement: rejected rather than silently ignored."""
    return invalid(f"'{param}' {why}", param=param)


def model_not_found(name: str) -> ApiError:
    return ApiError(
        "not_found",
        f"The model '{name}' does not exist on this cluster.",
        param="model",
        code="model_not_found",
    )


_FAILED_KINDS: dict[str, ErrorKind] = {
    "bad_request": "invalid_request",
    "not_found": "not_found",
    "overloaded": "overloaded",
    "internal": "internal",
    "unavailable": "unavailable",
}


def from_failed(event: Failed) -> ApiError:
    kind = _FAILED_KINDS.get(event.code, "internal")
    code = "model_not_found" if kind == "not_found" else None
    return ApiError(kind, event.message, code=code)


_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `([^`]*)`")
_MISSING_FIELD = re.compile(r"Object missing required field `([^`]*)`")


def _join(prefix: str | None, name: str) -> str:
    # Litestar reports top-level problems against its own parameter name, "data".
    return name if not prefix or prefix == "data" else f"{prefix}.{name}"


def _from_validation(exc: ValidationException) -> ApiError:
    problems = exc.extra if isinstance(exc.extra, list) else []
    if not problems or not isinstance(problems[0], dict):
        return invalid(str(exc.detail))
    first: dict[str, Any] = problems[0]
    message, key = str(first.get("message", "")), first.get("key")
    if (match := _UNKNOWN_FIELD.fullmatch(message)) is not None:
        param = _join(key, match.group(1))
        return invalid(f"Unrecognized request argument supplied: {param}", param=param)
    if (match := _MISSING_FIELD.fullmatch(message)) is not None:
        param = _join(key, match.group(1))
        return invalid(f"Missing required parameter: '{param}'", param=param)
    if key == "data":
        if message == "'data'":  # no body at all: Litestar's KeyError text for its parameter
            return invalid("The request body is empty; expected a JSON object.")
        return invalid(f"Invalid request body: {message}")
    return invalid(f"Invalid value for '{key}': {message}", param=key)


_HTTP_KINDS: dict[int, ErrorKind] = {
    401: "authentication",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
}


def to_api_error(exc: BaseException) -> ApiError:
    """Whatever went wrong, as an ApiError; only genuine server faults become `internal`."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ValidationException):
        return _from_validation(exc)
    if isinstance(exc, HTTPException):
        status = exc.status_code
        if status in _HTTP_KINDS:
            return ApiError(_HTTP_KINDS[status], str(exc.detail))
        if 400 <= status < 500:
            return invalid(str(exc.detail))
    if isinstance(exc, ModelNotFound):
        return model_not_found(exc.name)
    if isinstance(exc, ClientDisconnected):
        return invalid("The client disconnected.")
    if isinstance(exc, UnicodeDecodeError):
        # Raised while decoding the request body: the only text flock decodes is client input.
        return invalid("The request body is not valid UTF-8.")
    if isinstance(exc, RecursionError):
        # Client JSON is the only thing flock parses that can nest without bound (10,000 nested
        # arrays exhaust msgspec's recursion limit while decoding the body).
        return invalid("The request body is nested too deeply.")
    log.error("internal error while serving a request", exc_info=exc)
    return ApiError("internal", "The server had an internal error while processing the request.")


# --- wire formats ---------------------------------------------------------------------------

_BASE_STATUS: dict[ErrorKind, int] = {
    "invalid_request": 400,
    "authentication": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "too_large": 413,
    "not_supported": 501,
    "internal": 500,
    "unavailable": 503,  # the node is shutting down
}

ApiName = Literal["openai", "anthropic", "ollama"]

# Each API signals overload its own way.
_OVERLOADED_STATUS: dict[ApiName, int] = {"openai": 429, "anthropic": 529, "ollama": 503}


def error_status(api: ApiName, err: ApiError) -> int:
    return _OVERLOADED_STATUS[api] if err.kind == "overloaded" else _BASE_STATUS[err.kind]


def _headers(err: ApiError) -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_SECONDS)} if err.kind == "overloaded" else {}


_OPENAI_TYPES: dict[ErrorKind, str] = {
    "authentication": "invalid_request_error",
    "overloaded": "server_error",
    "internal": "server_error",
    "unavailable": "server_error",
    "not_supported": "invalid_request_error",
}
_OPENAI_CODES: dict[ErrorKind, str] = {
    "authentication": "invalid_api_key",
    "too_large": "request_too_large",
    "overloaded": "overloaded",
    "unavailable": "server_shutting_down",
}


def openai_error_body(err: ApiError) -> dict[str, Any]:
    return {
        "error": {
            "message": err.message,
            "type": _OPENAI_TYPES.get(err.kind, "invalid_request_error"),
            "param": err.param,
            "code": err.code or _OPENAI_CODES.get(err.kind),
        }
    }


_ANTHROPIC_TYPES: dict[ErrorKind, str] = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "not_found": "not_found_error",
    "method_not_allowed": "invalid_request_error",
    "too_large": "request_too_large",
    "overloaded": "overloaded_error",
    "not_supported": "invalid_request_error",
    "internal": "api_error",
    # Anthropic has no 503 type of its own; like overload, this is "retry, elsewhere or later".
    "unavailable": "overloaded_error",
}


def anthropic_error_body(err: ApiError) -> dict[str, Any]:
    # Anthropic has no `param`; naming the field in the message keeps it discoverable.
    message = err.message
    if err.param and err.param not in message:
        message = f"{err.param}: {message}"
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES[err.kind], "message": message}}


def ollama_error_body(err: ApiError) -> dict[str, Any]:
    return {"error": err.message}


def openai_error_response(err: ApiError) -> Response[dict[str, Any]]:
    return Response(openai_error_body(err), status_code=error_status("openai", err),
                    headers=_headers(err))


def anthropic_error_response(err: ApiError) -> Response[dict[str, Any]]:
    return Response(anthropic_error_body(err), status_code=error_status("anthropic", err),
                    headers=_headers(err))


def ollama_error_response(err: ApiError) -> Response[dict[str, Any]]:
    return Response(ollama_error_body(err), status_code=error_status("ollama", err),
                    headers=_headers(err))


ExceptionHandler = Callable[[Request[Any, Any, Any], Exception], Response[Any]]


def _count(request: Request[Any, Any, Any], exc: Exception, err: ApiError) -> None:
    """Rejections and unexpected failures, for the node's metrics (when the app has any)."""
    metrics = request.app.state.get("metrics")
    if metrics is None:
        return
    if err.kind == "invalid_request":
        metrics.rejected("too_long" if err.code == "context_length_exceeded" else "bad_request")
    elif err.kind == "authentication":
        metrics.rejected("unauthorized")
    elif err.kind == "overloaded":
        metrics.rejected("overloaded")
    elif err.kind == "internal" and not isinstance(exc, ApiError):
        metrics.error("api_exception")


def exception_handler(render: Callable[[ApiError], Response[Any]]) -> ExceptionHandler:
    """The one Litestar exception handler of a wire format."""

    def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        err = to_api_error(exc)
        _count(request, exc, err)
        return render(err)

    return handle


openai_exception_handler = exception_handler(openai_error_response)
anthropic_exception_handler = exception_handler(anthropic_error_response)
ollama_exception_handler = exception_handler(ollama_error_response)


def render_for_path(path: str) -> Callable[[ApiError], Response[Any]]:
    """The wire format a path belongs to, for errors raised before any route matched."""
    if path.startswith("/api/") or path == "/api":
        return ollama_error_response
    if path.startswith("/v1/messages"):
        return anthropic_error_response
    return openai_error_response


def unrouted_exception_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """App-level handler: unknown paths and methods, answered in the format the path implies."""
    err = to_api_error(exc)
    if err.kind == "not_found" and err.code is None and isinstance(exc, HTTPException):
        err = ApiError("not_found", f"Unknown request URL: {request.method} {request.url.path}")
    elif err.kind == "method_not_allowed":
        err = ApiError("method_not_allowed",
                       f"Method {request.method} is not allowed for {request.url.path}")
    return render_for_path(request.url.path)(err)
