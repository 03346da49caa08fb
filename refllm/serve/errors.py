"""Errors of the HTTP server: one `ServeError(kind, message)`, rendered by each dialect.

Each dialect module has a `render_error(err, status)` that gives the kind its own status
and body shape; `STATUS` is the default status of each kind. `refllm`'s own `LLMError`s
map by their WIT variant: invalid-input -> "validation", model-not-supported ->
"model_not_supported", runtime-error -> "runtime".
"""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import InvalidInputError, LLMError, LLMRuntimeError, ModelNotSupportedError

STATUS = {  # kind -> HTTP status; "validation" is 422 in the Hugging Face dialect
    "bad_request": 400, "validation": 400, "model_not_supported": 400, "unauthorized": 401,
    "forbidden": 403, "not_found": 404, "timeout": 408, "too_large": 413, "rate_limited": 429,
    "runtime": 500, "loading": 503, "overloaded": 503,  # "overloaded": 429 in TGI's dialect
}
RETRY_AFTER_OVERLOADED = "1"  # seconds; what an overloaded answer's Retry-After says


class ServeError(Exception):
    """A request that cannot be served, of a `kind` in `STATUS`."""

    def __init__(self, kind: str, message: str, *, param: str | None = None,
                 headers: Mapping[str, str] | None = None, extra: Mapping[str, Any] | None = None):
        assert kind in STATUS, kind
        super().__init__(message)
        self.kind, self.message, self.param = kind, message, param
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})  # dialect-specific fields, e.g. estimated_time


def from_llm_error(e: LLMError, param: str | None = None) -> ServeError:
    kind = {InvalidInputError: "validation", ModelNotSupportedError: "model_not_supported",
            LLMRuntimeError: "runtime"}.get(type(e), "runtime")
    err = ServeError(kind, e.message or str(e), param=param)
    err.variant = e.variant
    return err


def invalid(message: str, param: str | None = None) -> ServeError:
    return ServeError("validation", message, param=param)


def overloaded(waiting: int) -> ServeError:
    """The queue is full (`--max-queue`): try again shortly."""
    return ServeError("overloaded", f"Model is overloaded: {waiting} requests are already waiting; retry shortly",
                      headers={"retry-after": RETRY_AFTER_OVERLOADED})
