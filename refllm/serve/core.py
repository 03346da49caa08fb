"""The one engine under the three HTTP dialects: models, the scheduler, requests' work.

    request --read_json_object (size and time limits, UTF-8, JSON)--> dict --dialect parses-->
            params --Engine.resolve(name, task)--> ModelEntry --load_llm / load_embedder-->
            model --Engine.generation(...)--> Generation --Engine.pieces / token_events--> text

Everything that computes runs off the event loop. Loading a model, tokenizing and
building a `Generation` run in a small loader pool; all model compute runs in the
scheduler's one compute thread (`scheduler.py`: continuous batching, generations
decoded together a step at a time, embeddings a chunk at a time in between). A request
whose client goes away leaves the queue at once and the batch before the next step
(`watch_disconnect`). The event loop itself only parses, routes and writes, so
`GET /health` answers while the model is busy.

The rest of the package: `config.py` (ServerConfig), `errors.py` (ServeError and its
kinds), `bodies.py` (reading and writing bodies), `cache.py` (x-use-cache),
`scheduler.py`, `limits.py` (auth, allow-lists, quotas), one module per dialect, and
`app.py`. The names that used to live here are re-exported.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

import numpy as np

from .. import engine as model_cache
from .. import logprobs, registry
from ..errors import LLMError
from ..generate import Generation
from ..types import EmbeddingsResult, InferencingParams
from .bodies import (SSE_DONE, SSE_HEADERS, dumps, dumps_object_rows, dumps_rows, get_bool,  # noqa: F401
                     get_float, get_int, get_str, get_str_list, json_object, parse_json, read_body, sse, type_name)
from .cache import ResponseCache, header_true  # noqa: F401
from .config import DEFAULT_EMBEDDING_MODEL, DEFAULT_LLM, ServerConfig  # noqa: F401
from .errors import STATUS, ServeError, from_llm_error, invalid  # noqa: F401
from .scheduler import Scheduler

PLACEHOLDER_MODELS = ("dummy", "tgi")  # what huggingface_hub sends as `model` when given a URL
NO_TOP_K = 2**32 - 1  # top_k that keeps every candidate (the WIT's top-k is a u32)
GENERATE, EMBED = "generate", "embed"  # the two tasks
LARGE_BODY = 256 * 1024  # bytes: a body this large is parsed in the loader pool


async def read_json_object(request, limit: int) -> dict:
    """The body as a JSON object (a large one parsed off the event loop)."""
    engine = request.app.state.engine
    body = await read_body(request, limit, engine.config.body_timeout_s)
    if len(body) >= LARGE_BODY:
        return json_object(await engine.off_loop(lambda: parse_json(body)))
    return json_object(parse_json(body))


# ----------------------------------------------------------------------------- token events

@dataclass
class TokenEvent:
    """One sampled token of a generation, with the text it added to the visible output."""

    index: int  # 0-based position among the generated tokens
    token: int
    text: str  # concatenated over all events = the generation's text
    logits: np.ndarray  # [V] float32, what the token was sampled from
    last: bool  # the final event: the generation has finished


log_softmax_at = logprobs.log_softmax_at


def top_logprobs(logits: np.ndarray, k: int) -> list[tuple[int, float]]:  # [V], () -> k (id, logprob)
    """The k most likely tokens (equal logits: lower id first) and their log-probabilities."""
    ids = [i for i, _ in logprobs.top_n(logits, k)]  # [k]
    return list(zip(ids, log_softmax_at(logits, ids).tolist()))


# ----------------------------------------------------------------------------- the engine

class Engine:
    """Models on disk, loaded once, computed on by one scheduler."""

    def __init__(self, config: ServerConfig):
        from .limits import Limits

        self.config = config
        self.limits = Limits(config)
        self.cache = ResponseCache(config.cache_size)
        self.scheduler = Scheduler(config.max_batch, config.max_queue, config.batch_mode)
        self.stats = self.scheduler.stats
        self.loader_pool = ThreadPoolExecutor(4, thread_name_prefix="refllm-load")
        self.load_started: dict[str, float] = {}  # model name -> when its load began
        self.loading: set[str] = set()  # names this server is loading right now
        self._lock = threading.Lock()

    def close(self) -> None:
        self.scheduler.close()
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
            raise invalid(f"`model` must be a string, got {type_name(name)}", "model")
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

    # -- work ------------------------------------------------------------------

    async def off_loop(self, fn: Callable[[], Any]) -> Any:
        """Light work (tokenizing, templating, validating, encoding) in the loader pool."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.loader_pool, fn)
        except LLMError as e:
            raise from_llm_error(e) from e

    async def generation(self, llm, prompt: str, params: InferencingParams, *, seed: int | None = None,
                         stop: Sequence[str] = (), prompt_ids: Sequence[int] | None = None) -> Generation:
        """A `Generation` exactly as `refllm.infer_stream` makes it (tokenized off the
        loop, unless the queue is full: then "overloaded" at once)."""
        self.scheduler.check_room()
        return await self.off_loop(lambda: Generation(llm, prompt, params, seed=seed, stop=stop, prompt_ids=prompt_ids))

    async def pieces(self, gen: Generation, request=None) -> AsyncIterator[tuple[str, int]]:
        """The generation's text pieces, each with the number of tokens sampled so far,
        computed by the scheduler. Ends early, the generation unfinished, when
        `request`'s client has gone (and then its work stops)."""
        ticket = self.scheduler.submit_generation(gen)
        async for event in self._events(ticket, request):
            yield event[1], event[2]

    async def run(self, gen: Generation, request=None) -> bool:
        """Run a generation to its end; False if its client went away first."""
        async for _ in self.pieces(gen, request):
            pass
        return finished(gen)

    async def run_all(self, gens: Sequence[Generation], request=None) -> bool:
        """Run several generations together (one request's prompts, admitted as one);
        False if the client went away first."""
        tickets = self.scheduler.submit_generations(gens)

        async def drain(ticket):
            async for _ in self._events(ticket, request):
                pass

        await asyncio.gather(*(drain(t) for t in tickets))
        return all(finished(g) for g in gens)

    async def _events(self, ticket, request) -> AsyncIterator[tuple]:
        """The ticket's ("piece", ...) events until it is done; cancelled when the
        client goes away or the awaiting handler is cancelled. Errors are raised."""
        watcher = asyncio.create_task(watch_disconnect(request, ticket)) if request is not None else None
        try:
            while True:
                event = await ticket.events.get()
                if event[0] == "piece":
                    yield event
                elif event[0] == "error":
                    e = event[1]
                    if isinstance(e, LLMError):
                        raise from_llm_error(e) from e
                    raise e
                else:  # "done" or "cancelled"
                    return
        finally:
            ticket.cancel()  # a no-op once finished
            if watcher is not None:
                watcher.cancel()

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
        for i in range(seen, len(gen.steps)):  # tokens after the last piece
            if pending is not None:
                yield pending
            step = gen.steps[i]
            pending = TokenEvent(i, step.token, "", step.logits, False)
        if pending is not None:
            pending.last = True
            yield pending

    async def embed(self, embedder, texts: list[str], profile: str = "spec", request=None) -> EmbeddingsResult | None:
        """`generate_embeddings`' result, a chunk at a time between decode steps; None
        if the client went away first (its remaining chunks are not computed)."""
        self.scheduler.check_room()
        lengths = None
        if profile == "spec":
            lengths = await self.off_loop(lambda: [len(ids) for ids in embedder.tokenize(texts)])
        else:
            await self.off_loop(lambda: embedder.validate(texts))
        ticket = self.scheduler.submit_embedding(embedder, texts, profile, lengths)
        async for _ in self._events(ticket, request):
            pass
        return ticket.result if ticket.finished and not ticket.cancelled else None

    async def encode_rows(self, rows: Sequence[Any]) -> bytes:
        """`dumps(rows)` in the loader pool, a row at a time (a big response does not stall the loop)."""
        return await self.off_loop(lambda: dumps_rows(rows))


async def watch_disconnect(request, ticket) -> None:
    """Cancel `ticket` as soon as `request`'s client disconnects.

    Reads the ASGI receive channel, which after the body yields only
    `http.disconnect` (uvicorn sends it when the connection closes, and again to
    every later reader, so Starlette's own streaming listener still sees it)."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                ticket.cancel()
                return
    except (asyncio.CancelledError, RuntimeError):  # RuntimeError: the channel was closed
        return


def finished(gen: Generation) -> bool:
    try:
        gen.result
    except RuntimeError:
        return False
    return True
