"""The one engine under the three HTTP dialects: models, a fair compute queue, errors, bodies.

    request --read_json (size limit, UTF-8, JSON)--> dict --dialect parses--> params
            --Engine.resolve(name, task)--> ModelEntry --load_llm / load_embedder--> model
            --Engine.generation(...)--> Generation --Engine.pieces / token_events--> text

Everything that computes runs off the event loop. Loading a model and building a
`Generation` (tokenizing, validating) run in a small loader pool; every unit of model
compute (one `next()` of a Generation, i.e. one or a few decoded tokens, or one embedding
batch) runs in the compute pool behind a FIFO gate, so concurrent requests take turns
token by token in arrival order and none can starve the others. Between units the
request is asked whether its client is still there: a client that went away stops its
generation. The event loop itself only parses, routes and writes, so `GET /health`
answers while the model is busy.

Errors are raised as `ServeError(kind, message)`; each dialect renders the kind with its
own status and body shape (see `STATUS` and the dialect modules). `refllm`'s own
`LLMError`s map by their WIT variant: invalid-input -> "validation", model-not-supported
-> "model_not_supported", runtime-error -> "runtime".
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Mapping, Sequence

import numpy as np

from .. import engine as model_cache
from .. import registry
from ..errors import InvalidInputError, LLMError, LLMRuntimeError, ModelNotSupportedError
from ..generate import Generation
from ..types import InferencingParams

DEFAULT_LLM = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"
PLACEHOLDER_MODELS = ("dummy", "tgi")  # what huggingface_hub sends as `model` when given a URL
NO_TOP_K = 2**32 - 1  # top_k that keeps every candidate (the WIT's top-k is a u32)
GENERATE, EMBED = "generate", "embed"  # the two tasks


@dataclass
class ServerConfig:
    """Everything `create_app` needs. The defaults serve the models on disk with no auth,
    no quotas, Fermyon Cloud's 1,024-token cap and a 4 MiB body limit."""

    models_dir: str | os.PathLike | None = None  # None: refllm.registry's order of roots
    default_llm: str = DEFAULT_LLM  # what no model, "dummy" and "tgi" mean for text generation
    default_embedding_model: str = DEFAULT_EMBEDDING_MODEL  # ... and for embeddings
    tokens: Sequence[str] = ()  # accepted bearer tokens; empty: no auth
    token_models: Mapping[str, Sequence[str]] = field(default_factory=dict)  # per-token allow-lists
    allowed_models: Sequence[str] | None = None  # Spin's `ai_models` for every caller; None: all
    inference_quota: int | None = None  # requests per token per window; Fermyon Cloud: 75
    embedding_quota: int | None = None  # Fermyon Cloud: 200
    quota_window_s: float = 3600.0
    max_tokens_cap: int = 1024  # generated tokens a request may ask for (Fermyon Cloud: 1,024)
    max_body_bytes: int = 4 * 1024 * 1024
    concurrency: int = 1  # units of model compute at once
    cache_size: int = 256  # x-use-cache entries kept (0: no cache)
    profile: str = "spec"  # "spin": Spin 3's engine's text/usage on POST /infer and /embed
    backend: str | None = None
    precision: str | None = None
    preload: bool = False  # load the two default models in the background at startup


# ----------------------------------------------------------------------------- errors

STATUS = {  # kind -> HTTP status; "validation" is 422 in the Hugging Face dialect
    "bad_request": 400, "validation": 400, "model_not_supported": 400, "unauthorized": 401,
    "forbidden": 403, "not_found": 404, "too_large": 413, "rate_limited": 429,
    "runtime": 500, "loading": 503,
}


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


# ----------------------------------------------------------------------------- bodies

async def read_body(request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes (413) before reading it all."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ServeError("bad_request", "invalid Content-Length header")
        if int(length) > limit:
            raise ServeError("too_large", f"request body of {int(length)} bytes exceeds the limit of {limit} bytes")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise ServeError("too_large", f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
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


async def read_json_object(request, limit: int) -> dict:
    obj = parse_json(await read_body(request, limit))
    if not isinstance(obj, dict):
        raise ServeError("bad_request", f"request body must be a JSON object, got {_type_name(obj)}")
    return obj


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


# Typed getters: `None` (absent or null) gives the default; a wrong type or range is a
# "validation" error naming the field. `name` is how the dialect spells the field.

def get_bool(obj: Mapping, key: str, default=None, name: str | None = None):
    v = obj.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid(f"`{name or key}` must be a boolean, got {_type_name(v)}", name or key)
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
            raise invalid(f"`{name}` must be an integer, got {_type_name(v)}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise invalid(message or f"`{name}` must be in [{lo}, {hi}], got {v}", name)
    return v


def get_float(obj: Mapping, key: str, default=None, *, name: str | None = None):
    v = obj.get(key)
    if v is None:
        return default
    name = name or key
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise invalid(f"`{name}` must be a number, got {_type_name(v)}", name)
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
        raise invalid(f"`{name or key}` must be a string, got {_type_name(v)}", name or key)
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


# ----------------------------------------------------------------------------- the queue

class FifoGate:
    """An asyncio semaphore that hands permits out strictly in arrival order."""

    def __init__(self, permits: int):
        self._free = permits
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    async def acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # handed a permit just as it was cancelled: pass it on
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1


class ResponseCache:
    """A small LRU of finished responses, keyed by the canonical request (x-use-cache)."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[str, Any] = OrderedDict()

    @staticmethod
    def key(*parts: Any) -> str:
        return json.dumps(parts, sort_keys=True, ensure_ascii=False)

    def get(self, key: str):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def put(self, key: str, value: Any) -> None:
        if self.size <= 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)


def header_true(value: str | None) -> bool | None:
    """x-wait-for-model / x-use-cache: "1", "true", "yes" -> True; "0", "false", "no" -> False."""
    if value is None:
        return None
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    return None


# ----------------------------------------------------------------------------- token events

@dataclass
class TokenEvent:
    """One sampled token of a generation, with the text it added to the visible output."""

    index: int  # 0-based position among the generated tokens
    token: int
    text: str  # concatenated over all events = the generation's text
    logits: np.ndarray  # [V] float32, what the token was sampled from
    last: bool  # the final event: the generation has finished


def log_softmax_at(logits: np.ndarray, ids: Sequence[int]) -> np.ndarray:  # [V], [n] -> [n] float64
    z = np.asarray(logits, dtype=np.float64)  # [V]
    m = np.max(z)
    lse = m + np.log(np.sum(np.exp(z - m)))  # ()
    return z[np.asarray(ids, dtype=np.int64)] - lse


def top_logprobs(logits: np.ndarray, k: int) -> list[tuple[int, float]]:  # [V], () -> k (id, logprob)
    z = np.asarray(logits, dtype=np.float64)  # [V]
    order = np.argsort(-z, kind="stable")[:k]  # [k]
    return list(zip(order.tolist(), log_softmax_at(z, order).tolist()))


# ----------------------------------------------------------------------------- the engine

class Engine:
    """Models on disk, loaded once, computed on behind one fair queue."""

    def __init__(self, config: ServerConfig):
        from .limits import Limits

        self.config = config
        self.limits = Limits(config)
        self.cache = ResponseCache(config.cache_size)
        self.gate = FifoGate(max(1, config.concurrency))
        self.compute_pool = ThreadPoolExecutor(max(1, config.concurrency), thread_name_prefix="refllm-compute")
        self.loader_pool = ThreadPoolExecutor(4, thread_name_prefix="refllm-load")
        self.load_started: dict[str, float] = {}  # model name -> when its load began
        self.loading: set[str] = set()  # names this server is loading right now
        self._lock = threading.Lock()
        self.stats = {"generations": 0, "finished": 0, "cancelled": 0, "units": 0, "embeddings": 0}

    def close(self) -> None:
        self.compute_pool.shutdown(wait=False, cancel_futures=True)
        self.loader_pool.shutdown(wait=False, cancel_futures=True)

    # -- models --------------------------------------------------------------

    def models(self) -> list[registry.ModelEntry]:
        """The models on disk now (read at each request: a model pulled while serving is served)."""
        return registry.list_models(self.config.models_dir)

    def default_for(self, task: str) -> str:
        return self.config.default_llm if task == GENERATE else self.config.default_embedding_model

    def resolve(self, name: Any, task: str | None) -> registry.ModelEntry:
        """The model a request names. No name, "dummy" and "tgi" mean the default model of
        `task`; an unknown name is "not_found"; a model of the other kind is
        "model_not_supported". With task None, any kind is accepted."""
        if name is not None and not isinstance(name, str):
            raise invalid(f"`model` must be a string, got {_type_name(name)}", "model")
        if name in (None, "", *PLACEHOLDER_MODELS):
            if task is None:
                raise invalid("a model is required", "model")
            name = self.default_for(task)
        found = [e for e in self.models() if e.name == name]  # a name may be both a decoder and an encoder
        if not found:
            raise ServeError("not_found", f"no model directory found in registry for model '{name}'",
                             param="model", extra={"model": name})
        kind = {GENERATE: "llama", EMBED: "embedding", None: found[0].kind}[task]
        for entry in found:
            if entry.kind == kind:
                return entry
        is_, not_ = ("an embedding", "a text-generation") if kind == "llama" else ("a text-generation", "an embedding")
        raise ServeError("model_not_supported", f"model '{name}' is {is_} model, not {not_} model", param="model")

    def loading_eta(self, entry: registry.ModelEntry) -> float | None:
        """Seconds until `entry` is loaded, if it is being loaded right now; else None."""
        if entry.name not in self.loading and entry.name not in model_cache.loading():
            return None
        started = self.load_started.get(entry.name, time.monotonic())
        try:
            size = sum(f.stat().st_size for f in entry.path.iterdir() if f.is_file())
        except OSError:
            size = 0
        expected = 2.0 + size / 100e6  # ~100 MB/s of weights, from measuring the default models here
        return round(max(1.0, expected - (time.monotonic() - started)), 1)

    async def _load(self, entry: registry.ModelEntry, getter):
        return await asyncio.get_running_loop().run_in_executor(self.loader_pool, self._load_sync, entry, getter)

    def _load_sync(self, entry: registry.ModelEntry, getter):
        cold = not model_cache.is_loaded(entry.path)
        if cold:
            with self._lock:
                self.load_started.setdefault(entry.name, time.monotonic())
                self.loading.add(entry.name)
        try:
            return getter(entry.path, precision=self.config.precision, backend=self.config.backend)
        except LLMError as e:
            raise from_llm_error(e) from e
        finally:
            if cold:
                with self._lock:
                    self.loading.discard(entry.name)
                    self.load_started.pop(entry.name, None)

    async def load_llm(self, entry: registry.ModelEntry):
        return await self._load(entry, model_cache.get_llm)

    async def load_embedder(self, entry: registry.ModelEntry):
        return await self._load(entry, model_cache.get_embedder)

    def preload(self) -> None:
        """Start loading the default models in the background (they answer 503 meanwhile)."""
        for task in (GENERATE, EMBED):
            try:
                entry = self.resolve(None, task)
            except ServeError:
                continue
            getter = model_cache.get_llm if task == GENERATE else model_cache.get_embedder
            if model_cache.is_loaded(entry.path):
                continue
            with self._lock:  # visible as loading before the pool thread starts
                self.load_started.setdefault(entry.name, time.monotonic())
                self.loading.add(entry.name)
            self.loader_pool.submit(self._preload_one, entry, getter)

    def _preload_one(self, entry, getter):
        try:
            getter(entry.path, precision=self.config.precision, backend=self.config.backend)
        except Exception:  # noqa: BLE001 - the first request for it reports the error
            pass
        finally:
            with self._lock:
                self.loading.discard(entry.name)
                self.load_started.pop(entry.name, None)

    # -- compute -------------------------------------------------------------

    async def compute(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` in the compute pool when the FIFO gate lets it; LLMErrors become ServeErrors.

        If the awaiting request is cancelled (its client went away), the unit already
        running finishes in its thread and only then releases the gate."""
        await self.gate.acquire()
        loop = asyncio.get_running_loop()
        try:
            fut = loop.run_in_executor(self.compute_pool, fn)
        except BaseException:
            self.gate.release()
            raise
        fut.add_done_callback(lambda _: self.gate.release())
        self.stats["units"] += 1
        try:
            return await asyncio.shield(fut)
        except LLMError as e:
            raise from_llm_error(e) from e

    async def off_loop(self, fn: Callable[[], Any]) -> Any:
        """Light work (tokenizing, templating, validating) in the loader pool."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.loader_pool, fn)
        except LLMError as e:
            raise from_llm_error(e) from e

    async def generation(self, llm, prompt: str, params: InferencingParams, *, seed: int | None = None,
                         stop: Sequence[str] = (), prompt_ids: Sequence[int] | None = None) -> Generation:
        """A `Generation` exactly as `refllm.infer_stream` makes it (tokenized off the loop)."""
        return await self.off_loop(lambda: Generation(llm, prompt, params, seed=seed, stop=stop, prompt_ids=prompt_ids))

    async def pieces(self, gen: Generation, request=None) -> AsyncIterator[tuple[str, int]]:
        """The generation's text pieces, each with the number of tokens sampled so far.

        Stops (and counts the generation as cancelled) when `request`'s client has gone."""
        self.stats["generations"] += 1
        it = iter(gen)
        end = object()
        finished = False
        try:
            while True:
                if request is not None and await request.is_disconnected():
                    return
                piece = await self.compute(lambda: next(it, end))
                if piece is end:
                    finished = True
                    return
                yield piece, len(gen.steps)
        finally:
            self.stats["finished" if finished else "cancelled"] += 1

    async def run(self, gen: Generation, request=None) -> bool:
        """Run a generation to its end; False if its client went away first."""
        async for _ in self.pieces(gen, request):
            pass
        return finished(gen)

    async def token_events(self, gen: Generation, request=None) -> AsyncIterator[TokenEvent]:
        """One event per sampled token, whose texts concatenate to the generation's text.

        A piece of text is attributed to the token that completed it (a token that ends
        inside a UTF-8 character, or that may begin a stop string, gets "" and the next
        one the rest). The newest token is held back until the next arrives, so that
        the final event, marked `last`, can carry the text the generation releases at
        its end."""
        pending: TokenEvent | None = None
        seen = 0
        async for piece, n in self.pieces(gen, request):
            for i in range(seen, n):
                if pending is not None:
                    yield pending
                step = gen.steps[i]
                pending = TokenEvent(i, step.token, "", step.logits, False)
            seen = n
            if pending is not None:
                pending.text += piece
        if not finished(gen):
            return  # cancelled
        for i in range(seen, len(gen.steps)):  # tokens after the last piece (none expected)
            if pending is not None:
                yield pending
            step = gen.steps[i]
            pending = TokenEvent(i, step.token, "", step.logits, False)
        if pending is not None:
            pending.last = True
            yield pending

    async def embed(self, embedder, texts: list[str], profile: str = "spec"):
        self.stats["embeddings"] += 1
        return await self.compute(lambda: embedder.embed(texts, profile=profile))


def finished(gen: Generation) -> bool:
    try:
        gen.result
    except RuntimeError:
        return False
    return True


def sse(obj: Any) -> bytes:
    """One server-sent event: `data: {json}` and a blank line."""
    return b"data: " + dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
