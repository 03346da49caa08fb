"""Loaded models, kept for reuse: one instance per (directory, dtype, backend).

The first call for a model loads it (under a per-model lock, so two threads asking at
once load it once); later calls get the same object. `loading()` tells a server which
models are being loaded right now (for Hugging Face's 503 "currently loading").
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from .backend import resolve_backend

_models: dict[tuple, object] = {}
_locks: dict[tuple, threading.Lock] = {}
_loading: set[str] = set()
_guard = threading.Lock()


def _dtype_of(precision) -> np.dtype:
    if precision in (None, "float32", np.float32):
        return np.dtype(np.float32)
    if precision in ("float64", np.float64):
        return np.dtype(np.float64)
    raise ValueError(f"precision={precision!r} is not one of float32, float64")


def _get(kind: str, path: Path, precision, backend, factory):
    dtype, backend = _dtype_of(precision), resolve_backend(backend)
    key = (kind, str(Path(path).resolve()), dtype.str, backend)
    if key in _models:
        return _models[key]
    with _guard:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:
        if key not in _models:
            _loading.add(path.name)
            try:
                _models[key] = factory(path, dtype=dtype, backend=backend, name=path.name)
            finally:
                _loading.discard(path.name)
        return _models[key]


def get_llm(path: Path, precision=None, backend: str | None = None):
    """A `LoadedLLM` for the decoder directory `path`, loaded once."""
    from .generate import LoadedLLM

    return _get("llm", Path(path), precision, backend, LoadedLLM.from_dir)


def get_embedder(path: Path, precision=None, backend: str | None = None):
    """An `Embedder` for the encoder directory `path`, loaded once."""
    from .embeddings import Embedder

    def factory(p, dtype, backend, name):
        return Embedder.from_dir(p, dtype=dtype, backend=backend)

    return _get("embed", Path(path), precision, backend, factory)


def is_loaded(path: Path) -> bool:
    p = str(Path(path).resolve())
    return any(k[1] == p for k in _models)


def loading() -> set[str]:
    """Names of the models being loaded at this moment."""
    return set(_loading)


def clear() -> None:
    """Forget every loaded model (tests use this)."""
    with _guard:
        _models.clear()
