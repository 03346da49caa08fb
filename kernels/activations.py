"""Elementwise activations: SiLU / SwiGLU (Llama's MLP) and GELU, erf and tanh (BERT's).

    silu(x)      = x * sigmoid(x) = x / (1 + exp(-x))                  Elfwing et al. 2017
    swiglu(g, u) = silu(g) * u                                         Shazeer 2020
    gelu(x)      = 0.5 x (1 + erf(x / sqrt 2))                         Hendrycks & Gimpel 2016
    gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))   BERT's TF code, `gelu_new`

The three functions `silu`, `gelu_erf` and `gelu_tanh` are `@triton.jit` helpers that
other kernels inline: the matmul applies them in its epilogue, on the accumulator
still in registers (`matmul(x, w, act="gelu" | "gelu_tanh" | "swiglu")`), which is
where the models use them; the activation then costs no pass over memory. The two
standalone kernels below apply them to tensors that already exist, one pass each
(SwiGLU reads gate and up once and writes their product: the unfused form is three
passes, silu, then the product).

Every helper computes in float32, whatever the storage dtype. Triton has no `tanh`
that runs in both the interpreter and CUDA, so it is written with `exp`:
tanh(y) = sign(y) (1 - e) / (1 + e), e = exp(-2|y|), which never overflows and
saturates to +-1. The reference is `refllm.ops` (silu, gelu, gelu_tanh).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, check_same, check_tensor


@triton.jit
def silu(x):
    """x / (1 + exp(-x)), the form of `refllm.ops.silu`: finite for every finite x."""
    return x / (1.0 + tl.exp(-x))


@triton.jit
def gelu_erf(x):
    """The exact GELU, x * Phi(x)."""
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def gelu_tanh(x):
    """The tanh approximation of GELU."""
    y = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi) (x + 0.044715 x^3)
    e = tl.exp(-2.0 * tl.abs(y))  # in (0, 1]: no overflow
    t = (1.0 - e) / (1.0 + e)  # tanh(|y|)
    return 0.5 * x * (1.0 + tl.where(y < 0, -t, t))


# ---------------------------------------------------------------------------- kernels
#
# Both are the plain 1-D elementwise pattern of Triton's tutorial 01: the tensors are
# contiguous and seen as flat arrays of n elements; program p handles elements
# p * BLOCK .. p * BLOCK + BLOCK - 1, masked past n.


@triton.jit
def _swiglu_kernel(
    gate_ptr, up_ptr, out_ptr,  # pointers: [n] each, contiguous
    n,  # size
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (silu(g) * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_kernel(
    x_ptr, out_ptr,  # pointers: [n] each, contiguous
    n,  # size
    APPROXIMATE: tl.constexpr,  # 0: erf, 1: tanh
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if APPROXIMATE:
        y = gelu_tanh(x)
    else:
        y = gelu_erf(x)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _block(n: int) -> int:
    # Interpreted, one program per 64K elements; compiled, 1024 elements (4 warps x 8 each).
    return min(65536, triton.next_power_of_2(n)) if INTERPRET else 1024


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # [..., F] x2 -> [..., F]
    """silu(gate) * up, in one pass."""
    check_tensor("gate", gate, gate.ndim, last_contiguous=False)
    check_tensor("up", up, up.ndim, last_contiguous=False)
    check_same("gate, up", gate, up)
    if gate.shape != up.shape:
        raise ValueError(f"gate {list(gate.shape)} and up {list(up.shape)} must have one shape")
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _swiglu_kernel[(triton.cdiv(n, _block(n)),)](gate, up, out, n, BLOCK=_block(n))
    return out


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:  # [...] -> [...]
    """GELU, `approximate` as in torch.nn.functional.gelu: "none" (erf) or "tanh"."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate={approximate!r}: expected 'none' or 'tanh'")
    check_tensor("x", x, x.ndim, last_contiguous=False)
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        _gelu_kernel[(triton.cdiv(n, _block(n)),)](x, out, n, APPROXIMATE=int(approximate == "tanh"), BLOCK=_block(n))
    return out
