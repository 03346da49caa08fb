"""Continuous batching: many requests' model work, one step at a time, on one compute thread.

    submit_generation(gen)  -> Ticket      a Generation, to be prefilled then decoded
    submit_embedding(...)   -> Ticket      texts, embedded a chunk at a time
    ticket.events                          an asyncio.Queue of ("piece", text, n_steps),
                                           ("done",), ("error", exc), ("cancelled",)
    ticket.cancel()                        the client has gone: out of the queue at once,
                                           out of the batch before the next step

The loop, on the event loop, between steps (as in Orca, Yu et al. 2022, "iteration-level
scheduling", and TGI's and vLLM's routers):

    retire      drop finished and cancelled sequences from the running batch
    admit       move waiting generations into the batch, oldest first, up to max_batch
    step        in the compute thread, one unit of work:
                  prefill the newly admitted (a budget of prompt tokens per step,
                  at least one sequence), sampling each one's first token;
                  one decode step for every other running sequence, all together
                  (`Llama.decode_batch`, or `decode` per sequence where the model has
                  no batched step), each sampling its next token;
                  one chunk of the oldest embedding request, which then goes to the
                  back of the line (round robin: a short request sent during a
                  10,000-text one is served between its chunks)
    deliver     each sequence's released text to its request's queue

Each sequence samples with its own `refllm.generate.Decoding` (its ids, its seeded
generator) and turns steps into text with its own `Generation.accept`, so a request's
answer is `refllm.infer`'s whenever the batched step gives each row the bits `decode`
gives it alone, which `decode_batch`'s default mode promises. An embedding chunk is
exactly one of the length-sorted chunks `Embedder.embed` would run, so the vectors are
`generate_embeddings`'s bit for bit.

Admission is bounded: more than `max_queue` requests waiting is "overloaded" (each
dialect answers it its own way: TGI 429 "Model is overloaded", OpenAI and Spin 503 with
Retry-After).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..embeddings import Embedder, length_sorted_chunks
from ..generate import Decoding, Generation
from ..types import EmbeddingsResult, EmbeddingsUsage
from .errors import overloaded

EMBED_CHUNK = inspect.signature(Embedder.embed).parameters["chunk_size"].default  # texts a unit, as embed() runs them
log = logging.getLogger("refllm.serve")

PREFILL_BUDGET = 512  # prompt tokens prefilled in one step (beyond the first sequence's)
BATCH_MODES = ("invariant", "throughput")


def decode_batch(model, tokens: Sequence[int], caches: Sequence, mode: str = "invariant"):  # [B] -> [B, V]
    """One decode step for B sequences, each at its own position in its own cache.

    `Llama.decode_batch` where the model has one; otherwise (and for one sequence) the
    model's own `decode`, a row at a time: the same logits by definition."""
    batched = getattr(model, "decode_batch", None)
    if batched is None or len(tokens) == 1 and mode == "invariant":
        return np.stack([model.decode(t, c) for t, c in zip(tokens, caches)])  # [B, V]
    return batched(tokens, caches, mode=mode)  # [B, V]


@dataclass(eq=False)
class Ticket:
    """One request's work in the scheduler, and the queue its handler reads."""

    kind: str  # "generate" | "embed"
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: int = field(default_factory=itertools.count().__next__)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None  # admitted into the batch (or its first chunk run)
    cancelled: bool = False
    finished: bool = False
    scheduler: Any = None

    def cancel(self) -> None:
        """The client has gone: leave the queue now, the batch before the next step."""
        if self.finished or self.cancelled:
            return
        self.cancelled = True
        if self.scheduler is not None:
            self.scheduler._cancelled(self)
        self.events.put_nowait(("cancelled",))


@dataclass(eq=False)
class GenerationTicket(Ticket):
    gen: Generation | None = None
    seq: Decoding | None = None  # made when admitted
    next_token: int | None = None  # the token the next decode step feeds (None: not prefilled yet)
    out: list = field(default_factory=list)  # events of the step just computed (filled in the thread)


@dataclass(eq=False)
class EmbeddingTicket(Ticket):
    embedder: Embedder | None = None
    texts: list[str] = field(default_factory=list)
    profile: str = "spec"
    chunks: list[list[int]] = field(default_factory=list)  # indices of texts, one list a unit
    done_chunks: int = 0
    vectors: np.ndarray | None = None  # [N, H]
    n_tokens: int = 0
    result: EmbeddingsResult | None = None


class Scheduler:
    """The batch and the queues, driven by one task on the server's event loop."""

    def __init__(self, max_batch: int = 8, max_queue: int = 128, mode: str = "invariant"):
        if mode not in BATCH_MODES:
            raise ValueError(f"batch mode must be one of {', '.join(BATCH_MODES)}, got {mode!r}")
        self.max_batch, self.max_queue, self.mode = max_batch, max_queue, mode
        self.waiting: deque[GenerationTicket] = deque()  # not yet admitted, oldest first
        self.running: list[GenerationTicket] = []  # the batch
        self.embed_waiting: deque[EmbeddingTicket] = deque()
        self.embedding: deque[EmbeddingTicket] = deque()  # round robin, one chunk each in turn
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="refllm-compute")
        self.stats = {"generations": 0, "finished": 0, "cancelled": 0, "units": 0, "embeddings": 0, "steps": 0,
                      "overloaded": 0, "batch_rows": 0}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)

    @property
    def queued(self) -> int:
        """Requests waiting for a place in the batch."""
        return len(self.waiting) + len(self.embed_waiting)

    # -- submitting (on the event loop) ----------------------------------------------

    def check_room(self, n: int = 1) -> None:
        """"overloaded" unless `n` more requests fit in the queue (a handler asks before
        tokenizing, so an overloaded server answers at once)."""
        if self.queued + n > self.max_queue:
            self.stats["overloaded"] += 1
            raise overloaded(self.queued)

    def _admit_or_refuse(self, ticket: Ticket) -> None:
        self.check_room()
        ticket.scheduler = self
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="refllm-scheduler")
        self._wake.set()

    def submit_generation(self, gen: Generation) -> GenerationTicket:
        ticket = GenerationTicket("generate", gen=gen)
        self._admit_or_refuse(ticket)
        self.waiting.append(ticket)
        self.stats["generations"] += 1
        return ticket

    def submit_generations(self, gens: Sequence[Generation]) -> list[GenerationTicket]:
        """All or none: an array request is refused whole when the queue has no room."""
        self.check_room(len(gens))
        return [self.submit_generation(g) for g in gens]

    def submit_embedding(self, embedder: Embedder, texts: list[str], profile: str,
                         lengths: Sequence[int] | None) -> EmbeddingTicket:
        """`lengths`: each text's token count (for the spec profile's chunks); the spin
        profile pads every text to the longest, so it is one unit."""
        chunks = length_sorted_chunks(list(lengths), EMBED_CHUNK) if profile == "spec" else [list(range(len(texts)))]
        ticket = EmbeddingTicket("embed", embedder=embedder, texts=texts, profile=profile, chunks=chunks)
        self._admit_or_refuse(ticket)
        self.embed_waiting.append(ticket)
        self.stats["embeddings"] += 1
        return ticket

    def _cancelled(self, ticket: Ticket) -> None:
        for q in (self.waiting, self.embed_waiting):
            try:
                q.remove(ticket)  # out of the queue at once
            except ValueError:
                pass
        if ticket.kind == "generate":
            self.stats["cancelled"] += 1

    # -- the loop ------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._retire()
            self._admit()
            if not self.running and not self.embedding:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._iteration()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a bug here: fail the requests in hand, keep serving
                log.exception("scheduler step failed")
                for t in [*self.running, *self.embedding]:
                    if not (t.finished or t.cancelled):
                        t.finished = True
                        t.events.put_nowait(("error", e))

    async def _iteration(self) -> None:
        prefill = self._prefill_plan()
        decode = [t for t in self.running if t.next_token is not None]
        chunk = self.embedding[0] if self.embedding else None
        await asyncio.get_running_loop().run_in_executor(self.pool, self._step, prefill, decode, chunk)
        self.stats["steps"] += 1
        self.stats["batch_rows"] += len(decode)
        for t in prefill + decode:
            self._deliver(t)
        if chunk is not None:
            self._deliver_embedding(chunk)

    def _retire(self) -> None:
        self.running = [t for t in self.running if not (t.finished or t.cancelled)]
        self.embedding = deque(t for t in self.embedding if not (t.finished or t.cancelled))

    def _admit(self) -> None:
        now = time.monotonic()
        while self.waiting and len(self.running) < self.max_batch:
            t = self.waiting.popleft()
            t.started = now
            t.seq = t.gen.decoding()
            if t.seq.done:  # max_tokens = 0: nothing to compute
                t.gen.finish()
                t.out.append(("done",))
                self._deliver(t)
                continue
            self.running.append(t)
        while self.embed_waiting and len(self.embedding) < self.max_batch:
            t = self.embed_waiting.popleft()
            t.started = now
            self.embedding.append(t)

    def _prefill_plan(self) -> list[GenerationTicket]:
        """The admitted sequences to prefill this step: the oldest, and more while their
        prompts fit in PREFILL_BUDGET tokens (so decoding sequences wait one step, not many)."""
        plan, budget = [], PREFILL_BUDGET
        for t in self.running:
            if t.next_token is None and not t.seq.done:
                n = len(t.gen.prompt_ids)
                if plan and n > budget:
                    break
                plan.append(t)
                budget -= n
        return plan

    # -- the compute thread ----------------------------------------------------------

    def _step(self, prefill: list[GenerationTicket], decode: list[GenerationTicket],
              chunk: EmbeddingTicket | None) -> None:
        """One unit of model work (runs in the compute thread; touches only its tickets)."""
        for t in prefill:
            self._guarded(t, lambda t=t: self._sample(t, t.seq.prefill()))
        by_model: dict[int, list[GenerationTicket]] = {}
        for t in decode:
            by_model.setdefault(id(t.seq.llm.model), []).append(t)
        for group in by_model.values():
            model = group[0].seq.llm.model
            try:
                logits = decode_batch(model, [t.next_token for t in group], [t.seq.cache for t in group],
                                      self.mode)  # [B, V]
            except Exception as e:  # noqa: BLE001 - every sequence of the step fails with it
                for t in group:
                    t.out.append(("error", e))
                continue
            for t, row in zip(group, logits):
                self._guarded(t, lambda t=t, row=row: self._sample(t, np.array(row)))  # a copy: Step keeps it
        if chunk is not None:
            self._guarded(chunk, lambda: self._embed_chunk(chunk))

    @staticmethod
    def _guarded(t: Ticket, work) -> None:
        try:
            work()
        except Exception as e:  # noqa: BLE001 - the request fails with it, the server goes on
            if isinstance(t, GenerationTicket):
                t.out.append(("error", e))
            else:
                t.result = e

    def _sample(self, t: GenerationTicket, logits) -> None:  # [V]
        self.stats["units"] += 1
        step = t.seq.sample(logits)
        piece = t.gen.accept(step)
        if piece:
            t.out.append(("piece", piece, len(t.gen.steps)))
        if t.seq.done or t.gen.finish_reason == "stop":
            tail = t.gen.finish()
            if tail:
                t.out.append(("piece", tail, len(t.gen.steps)))
            t.out.append(("done",))
        else:
            t.next_token = step.token

    def _embed_chunk(self, t: EmbeddingTicket) -> None:
        self.stats["units"] += 1
        rows = t.chunks[t.done_chunks]
        vectors, n = t.embedder.embed_array([t.texts[i] for i in rows], profile=t.profile, chunk_size=EMBED_CHUNK,
                                            return_usage=True)  # [n, H]
        if t.vectors is None:
            t.vectors = np.empty((len(t.texts), vectors.shape[1]), dtype=vectors.dtype)  # [N, H]
        t.vectors[rows] = vectors
        t.n_tokens += n
        t.done_chunks += 1
        if t.done_chunks == len(t.chunks):
            t.result = EmbeddingsResult(embeddings=t.vectors.tolist(), usage=EmbeddingsUsage(t.n_tokens))

    # -- delivering (on the event loop) ------------------------------------------------

    def _deliver(self, t: GenerationTicket) -> None:
        out, t.out = t.out, []
        if t.cancelled:
            return
        for event in out:
            if event[0] in ("done", "error"):
                t.finished = True
                if event[0] == "done":
                    self.stats["finished"] += 1
            t.events.put_nowait(event)

    def _deliver_embedding(self, t: EmbeddingTicket) -> None:
        if t.cancelled:
            return
        if isinstance(t.result, Exception):
            t.finished = True
            t.events.put_nowait(("error", t.result))
        elif t.result is not None:
            t.finished = True
            t.events.put_nowait(("done",))
        elif self.embedding and self.embedding[0] is t:
            self.embedding.rotate(-1)  # to the back of the line
