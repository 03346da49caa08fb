"""Triton kernels for refllm's two models; `refllm.ops` is the reference for each.

    kernel                       reference (refllm.ops)        file
    matmul(x, w, bias, act)      x @ w.T + b, then gelu /      matmul.py
                                 gelu_tanh / silu(g) * u
    rms_norm(x, w, eps, res)     rms_norm (+ residual add)     rms_norm.py
    layer_norm(x, w, b, eps, res) layer_norm (+ residual add)  layer_norm.py
    rope(x, cos, sin, out)       rope (rotate-half)            rope.py
    causal_attention(q, k, v, p) causal_attention              flash_attention.py
    masked_attention(q, k, v, m) masked_attention              flash_attention.py
    decode_attention(q, k, v)    causal_attention, T = 1       decode_attention.py
    swiglu(g, u), gelu(x, a)     silu(g) * u, gelu, gelu_tanh  activations.py

Each file is one literate unit in the manner of Triton's tutorials: the blocked
algorithm in its docstring, the kernel's arguments grouped (pointers, sizes, strides,
meta-parameters), and a wrapper that checks shapes and dtypes, allocates the output
and launches. Tensors are torch tensors; kernels load float32, float16 or bfloat16
and compute in float32.

Where they run: on a CUDA device, compiled; without one, under Triton's interpreter
on CPU tensors. Importing this package without CUDA sets `TRITON_INTERPRET=1` (unless
it is already set) before the kernels are defined, since the mode is fixed when a
kernel is decorated; `INTERPRET` says which mode is on. See `common.py`.
"""

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
