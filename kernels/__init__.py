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

if __name__ != "refllm.kernels":
    # This folder is only ever `refllm.kernels`. From a checkout, the repository root is
    # on sys.path and a probe for a top-level `kernels` package (transformers looks for
    # Hugging Face's `kernels`) finds it; look like the stray namespace folder it is
    # under that name (no __file__, no version), so such probes see no package.
    __file__ = None
else:
    from ._load import *  # noqa: F401,F403
    from ._load import __all__  # noqa: F401
