"""Loading the engines, each in a process of its own, and telling a missing peer apart.

    load_engines(kind, model_dir, engines, threads, isolate)
        -> [(name, engine or None, why it was skipped)]
    EngineProcess   an engine loaded in a child process that times rounds on request

A peer that is not installed or fails to load is reported with the reason, never fatal.
"""

from __future__ import annotations

from typing import Callable

from .engines import (LlamaCppLLM, RefllmEmbedder, RefllmLLM, SentenceTransformersEmbedder, TransformersLLM,
                      time_task)
from .workloads import LLAMA_CPP, REFLLM, SENTENCE_TRANSFORMERS, TRANSFORMERS, prompt_ids


def load_peer(name: str, factory: Callable[[], object]):
    """(engine, None) or (None, why it is skipped): a peer that is not installed or fails
    to load is reported, never fatal."""
    try:
        return factory(), None
    except ModuleNotFoundError as e:
        return None, f"not installed ({e.name or e})"
    except ImportError as e:
        return None, f"cannot be imported: {str(e)[:200]}"
    except Exception as e:  # a peer's own failure: say what it was
        return None, f"failed to load: {type(e).__name__}: {str(e)[:200]}"


LLM_FACTORIES = {  # name -> (model_dir, threads) -> engine
    REFLLM: lambda model_dir, threads: RefllmLLM(model_dir),
    LLAMA_CPP: lambda model_dir, threads: LlamaCppLLM.from_model_dir(model_dir, threads),
    TRANSFORMERS: lambda model_dir, threads: TransformersLLM(model_dir, threads),
}
EMBED_FACTORIES = {
    REFLLM: lambda model_dir, threads: RefllmEmbedder(model_dir),
    SENTENCE_TRANSFORMERS: lambda model_dir, threads: SentenceTransformersEmbedder(model_dir, threads),
}
FACTORIES = {"llm": LLM_FACTORIES, "embed": EMBED_FACTORIES}  # kind -> its engines' factories


def load_engines(kind: str, model_dir, engines, threads: int, isolate: bool = False):
    """[(name, engine or None, skip reason)] for the engines of `kind` ("llm" or
    "embed") asked for; with `isolate`, each is an `EngineProcess` (loaded and timed in
    a process of its own)."""
    factories = FACTORIES[kind]
    if isolate:
        return [(name, *EngineProcess.start(kind, name, model_dir, threads)) for name in engines if name in factories]
    return [(name, *load_peer(name, lambda f=factories[name]: f(model_dir, threads)))
            for name in engines if name in factories]


def close_engines(loaded) -> None:
    for _, engine, _ in loaded:
        if engine is not None and hasattr(engine, "close"):
            engine.close()


# ------------------------------------------------------------------ one process per engine
#
# Engines in one process disturb each other: refllm tunes glibc's malloc for the whole
# process (refllm/malloc.py), torch starts its own thread pools and allocator, and
# llama.cpp its own threads. A user runs one engine per process, so `refllm bench` does
# the same: each engine is loaded in a child process of its own, which times the
# parent's requests one round at a time (the rounds still alternate A B C A B C, and
# only one process works at a time).

class EngineProcess:
    """An engine loaded in a child process (multiprocessing "spawn": a fresh
    interpreter, none of the parent's imports). `time(task)` asks it for one timed
    round and returns the child's own perf_counter seconds; `close()` ends it."""

    def __init__(self, process, conn):
        self.process, self.conn = process, conn

    @classmethod
    def start(cls, kind: str, name: str, model_dir, threads: int):
        """(EngineProcess, None), or (None, why the engine is skipped), as `load_peer`."""
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_engine_process_main, args=(child, kind, name, str(model_dir), threads),
                              name=f"refllm bench: {name}", daemon=True)
        process.start()
        child.close()
        try:
            skipped = parent.recv()  # None once the engine is loaded
        except EOFError:  # it died before it could say why (a crash in native code)
            skipped = ""  # no reason given: its exit code is the reason, below
        if skipped is not None:
            process.join(5)
            return None, skipped or f"failed to load: its process exited with code {process.exitcode}"
        return cls(process, parent), None

    def time(self, task: str) -> float:
        try:
            self.conn.send(task)
            ok, value = self.conn.recv()
        except (EOFError, OSError):  # it died (the pipe is closed or reset)
            self.process.join(5)
            raise RuntimeError(f"{self.process.name}: its process exited with code {self.process.exitcode}") from None
        if not ok:
            raise RuntimeError(f"{self.process.name}: {value}")
        return value

    def close(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(30)
        if self.process.is_alive():
            self.process.terminate()
        self.conn.close()


def _engine_process_main(conn, kind: str, name: str, model_dir: str, threads: int) -> None:
    """The child's loop: load the engine, say so (None, or the reason it is skipped),
    then answer each task name with (True, seconds) or (False, the error) until None."""
    engine, skipped = load_peer(name, lambda: FACTORIES[kind][name](model_dir, threads))
    conn.send(skipped)
    if engine is None:
        return
    ids = prompt_ids(model_dir) if kind == "llm" else None
    try:
        while (task := conn.recv()) is not None:
            try:
                conn.send((True, time_task(engine, task, ids)))
            except Exception as e:
                conn.send((False, f"{type(e).__name__}: {str(e)[:300]}"))
    except EOFError:  # the parent went away
        pass
    finally:
        if hasattr(engine, "close"):
            engine.close()
