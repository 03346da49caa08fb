"""Request bodies in, response bodies out: size and time limits, strict JSON, typed getters.

    read_body          the body, refusing more than `limit` bytes (413) and a body that
                       takes longer than `timeout_s` to arrive (408, issue 14 D8)
    parse_json         strict JSON (UTF-8, no NaN/Infinity, no lone surrogates): 400
    get_bool, get_int, get_float, get_str, get_str_list
                       a field of the dialect's body, or a "validation" error naming it
    dumps, dumps_rows  compact JSON; dumps_rows encodes a long list a row at a time, so
                       a thread encoding 24 MB of embeddings lets the event loop run
                       between rows (json's C encoder holds the GIL for a whole call)
    sse                one server-sent event
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any, Mapping, Sequence

from .errors import ServeError, invalid


async def read_body(request, limit: int, timeout_s: float | None = None) -> bytes:
    """The request body, refusing more than `limit` bytes (413) before reading it all,
    and a body not received in full within `timeout_s` seconds (408)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ServeError("bad_request", "invalid Content-Length header")
        if int(length) > limit:
            raise ServeError("too_large", f"request body of {int(length)} bytes exceeds the limit of {limit} bytes")
    chunks, n = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                n += len(chunk)
                if n > limit:
                    raise ServeError("too_large", f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise ServeError("timeout", f"the request body did not arrive within {timeout_s:g} s "
                                    f"({n} bytes received)", headers={"connection": "close"}) from None
    return b"".join(chunks)


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity literals; any failure is a 400 "bad_request"."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ServeError("bad_request", f"request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ServeError("bad_request", "request body is empty; expected a JSON object")
    try:
        obj = json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, huge ints (str->int limit), nesting
        raise ServeError("bad_request", f"request body is not valid JSON: {str(e)[:200]}") from None
    _check_strings(obj)
    return obj


def _check_strings(obj: Any) -> None:
    """JSON's \\uXXXX escapes can spell a lone UTF-16 surrogate, which is no Unicode text."""
    stack = [obj]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ServeError("bad_request", "request body has a string with a lone UTF-16 surrogate") from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def json_object(obj: Any) -> dict:
    if not isinstance(obj, dict):
        raise ServeError("bad_request", f"request body must be a JSON object, got {type_name(obj)}")
    return obj


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def dumps_rows(rows: Sequence[Any]) -> bytes:
    """`dumps(list(rows))`, byte for byte, encoded one row at a time."""
    return b"[" + b",".join(dumps(r) for r in rows) + b"]"


def type_name(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


# Typed getters: `None` (absent or null) gives the default; a wrong type or range is a
# "validation" error naming the field. `name` is how the dialect spells the field.

def get_bool(obj: Mapping, key: str, default=None, name: str | None = None):
    v = obj.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid(f"`{name or key}` must be a boolean, got {type_name(v)}", name or key)
    return v


def get_int(obj: Mapping, key: str, default=None, *, lo: int | None = None, hi: int | None = None,
            name: str | None = None, message: str | None = None):
    v = obj.get(key)
    if v is None:
        return default
    name = name or key
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
            v = int(v)  # 4.0 is 4 (JSON has one number type; serde_json would refuse it, OpenAI accepts)
        else:
            raise invalid(f"`{name}` must be an integer, got {type_name(v)}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise invalid(message or f"`{name}` must be in [{lo}, {hi}], got {v}", name)
    return v


def get_float(obj: Mapping, key: str, default=None, *, name: str | None = None):
    v = obj.get(key)
    if v is None:
        return default
    name = name or key
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise invalid(f"`{name}` must be a number, got {type_name(v)}", name)
    try:
        v = float(v)
    except OverflowError:  # an integer too large for a float
        raise invalid(f"`{name}` is too large", name) from None
    if not math.isfinite(v):
        raise invalid(f"`{name}` must be finite", name)
    return v


def get_str(obj: Mapping, key: str, default=None, *, name: str | None = None):
    v = obj.get(key)
    if v is None:
        return default
    if not isinstance(v, str):
        raise invalid(f"`{name or key}` must be a string, got {type_name(v)}", name or key)
    return v


def get_str_list(obj: Mapping, key: str, *, name: str | None = None, allow_str: bool = False,
                 max_items: int | None = None) -> list[str]:
    """A list of non-empty strings (or one string, with allow_str); [] when absent."""
    v = obj.get(key)
    name = name or key
    if v is None:
        return []
    if isinstance(v, str) and allow_str:
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise invalid(f"`{name}` must be a list of non-empty strings", name)
    if max_items is not None and len(v) > max_items:
        raise invalid(f"`{name}` supports up to {max_items} stop sequences. Given: {len(v)}", name)
    return v


def sse(obj: Any) -> bytes:
    """One server-sent event: `data: {json}` and a blank line."""
    return b"data: " + dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def dumps_object_rows(obj: dict, key: str) -> bytes:
    """`dumps(obj)`, byte for byte, with the long list `obj[key]` encoded a row at a time."""
    return b"{" + b",".join(dumps(k) + b":" + (dumps_rows(v) if k == key else dumps(v)) for k, v in obj.items()) + b"}"
