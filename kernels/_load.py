"""What `refllm.kernels` exports; `__init__.py` re-exports it (see there)."""

import os as _os
import sys as _sys

if "TRITON_INTERPRET" not in _os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        if "triton.language" in _sys.modules:
            # triton's own library (tl.zeros, tl.sum, ...) was decorated for compilation
            # when something else imported it first (sentence-transformers does): the
            # interpreter cannot run it now.
            raise ImportError(
                "refllm.kernels: no CUDA device, and triton was imported before TRITON_INTERPRET=1 was set; "
                "set TRITON_INTERPRET=1 in the environment (or import refllm.kernels first) to run the "
                "kernels under Triton's interpreter"
            )
        _os.environ["TRITON_INTERPRET"] = "1"

from .common import INTERPRET, device  # noqa: E402
from .activations import gelu, swiglu  # noqa: E402
from .decode_attention import decode_attention  # noqa: E402
from .flash_attention import causal_attention, masked_attention  # noqa: E402
from .layer_norm import layer_norm  # noqa: E402
from .matmul import matmul  # noqa: E402
from .rms_norm import rms_norm  # noqa: E402
from .rope import rope  # noqa: E402

__all__ = [
    "INTERPRET", "device", "matmul", "rms_norm", "layer_norm", "rope", "causal_attention",
    "masked_attention", "decode_attention", "swiglu", "gelu",
]
