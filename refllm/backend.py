"""The one place that chooses the compute backend.

"numpy" is the reference and the CPU path; "triton" runs the same forward passes with
torch tensors through the kernels of `refllm.kernels` on a CUDA device. The default is
"triton" where CUDA is available and "numpy" elsewhere; `$REFLLM_BACKEND` overrides it.
Sampling always runs on the host on float32 logits, so both backends pick the same
tokens for the same draws.
"""

from __future__ import annotations

import os

BACKENDS = ("numpy", "triton")


def cuda_available() -> bool:
    """Whether torch sees a CUDA device. Without an NVIDIA driver on the machine the
    answer is no without importing torch (which alone costs ~190 MB of memory)."""
    if not (os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0") or os.path.exists("/dev/dxg")):
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve_backend(backend: str | None = None) -> str:
    """The backend to use: the argument, else $REFLLM_BACKEND, else by the hardware."""
    choice = backend or os.environ.get("REFLLM_BACKEND") or ("triton" if cuda_available() else "numpy")
    if choice not in BACKENDS:
        raise ValueError(f"backend={choice!r} is not one of {', '.join(BACKENDS)}")
    return choice
