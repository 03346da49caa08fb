"""Loaded models, kept for reuse: one instance per (directory, dtype, backend).

The first call for a model loads it (under a per-model lock, so two threads asking at
once load it once); later calls get the same object. `loading()` tells a server which
models are being loaded right now (for Hugging Face's 503 "currently loading").
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path

import numpy as np

from .backend import BACKENDS, resolve_backend
from .errors import InvalidInputError, LLMRuntimeError

_models: dict[tuple, object] = {}
_locks: dict[tuple, threading.Lock] = {}
_loading: set[str] = set()
_guard = threading.Lock()


def _dtype_of(precision) -> np.dtype:
    if precision in (None, "float32", np.float32):
        return np.dtype(np.float32)
    if precision in ("float64", np.float64):
        return np.dtype(np.float64)
    raise InvalidInputError(f"precision={precision!r} is not one of float32, float64")


def _backend_of(backend) -> str:
    """The backend to run on (`resolve_backend`), as an `LLMError` when it cannot be used."""
    if backend is not None and backend not in BACKENDS:
        raise InvalidInputError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    try:
        backend = resolve_backend(backend)
    except ValueError as e:  # from $REFLLM_BACKEND
        raise InvalidInputError(f"$REFLLM_BACKEND: {e}") from None
    if backend == "triton":
        missing = [name for name in ("torch", "triton") if not _installed(name)]
        if missing:
            raise LLMRuntimeError(f"backend 'triton' needs {' and '.join(missing)}, which cannot be imported: "
                                  f"install refllm's 'gpu' extra (torch first), or use backend 'numpy'")
    return backend


def _installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (importing triton before
    `refllm.kernels` would fix its interpreter mode too early)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _get(kind: str, path: Path, precision, backend, factory):
    dtype, backend = _dtype_of(precision), _backend_of(backend)
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
