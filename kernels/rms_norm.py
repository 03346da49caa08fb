"""RMSNorm (Zhang & Sennrich 2019), Llama's norm, with the residual add fused in.

    y = x / sqrt(mean(x^2) + eps) * weight              (refllm.ops.rms_norm)

A pre-norm decoder computes, twice per layer, `h = h + sublayer(...)` and then
`rms_norm(h)`: two passes over h. Given `residual`, this kernel does both in one pass,
reading x and the residual once, writing the new residual in place and the normed
rows out:

    residual += x;  y = rms_norm(residual)

The blocked algorithm: the input is seen as R rows of D; program p owns BLOCK_R
rows, each held whole in one block of BLOCK_D = next_power_of_2(D) columns (the
columns past D are masked: loaded as 0, which adds nothing to the sum of squares,
and never stored). Per row: ms = sum(x^2) / D in float32, then
y = x / sqrt(ms + eps) * weight, rounded once to the output dtype. Division and
square root are the correctly rounded ones (`div_rn`, `sqrt_rn`), as NumPy's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, check_same, check_tensor


@triton.jit
def _rms_norm_kernel(
    # pointers
    x_ptr, res_ptr, w_ptr, y_ptr,  # x [R, D], residual [R, D] (updated in place), weight [D], y [R, D]
    # sizes
    R, D,
    # strides
    stride_x, stride_res, stride_y,  # between rows; columns are contiguous
    # scalars
    eps,
    # meta-parameters
    HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    cols = tl.arange(0, BLOCK_D)  # [BD]
    mask = (rows[:, None] < R) & (cols[None, :] < D)  # [BR, BD]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res_ptrs = res_ptr + rows[:, None] * stride_res + cols[None, :]
        x += tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(res_ptrs, x.to(res_ptr.dtype.element_ty), mask=mask)
        x = x.to(res_ptr.dtype.element_ty).to(tl.float32)  # normalise what was stored
    ms = tl.sum(x * x, axis=1) / D  # [BR]
    rms = tl.sqrt_rn(ms + eps)  # [BR]
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)  # [BD]
    y = tl.math.div_rn(x, rms[:, None]) * w[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor:  # [..., D], [D] -> [..., D]
    """RMSNorm over the last dim. With `residual` (x's shape): residual += x in place
    first, and the result is rms_norm(residual)."""
    check_tensor("x", x, x.ndim)
    check_tensor("weight", weight, 1)
    D = x.shape[-1]
    if weight.shape[0] != D:
        raise ValueError(f"weight is {list(weight.shape)}, expected [{D}] for x {list(x.shape)}")
    x2 = x.reshape(-1, D)  # [R, D]; a view whenever the rows are evenly strided
    R = x2.shape[0]
    res2 = x2
    if residual is not None:
        check_tensor("residual", residual, x.ndim)
        check_same("x, residual", x, residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual {list(residual.shape)} must have x's shape {list(x.shape)}")
        res2 = residual.view(-1, D)  # must be a view: it is written in place
    y = torch.empty((R, D), dtype=x.dtype, device=x.device)
    if R == 0:
        return y.view(x.shape)
    block_d = triton.next_power_of_2(D)
    block_r = max(1, min(triton.next_power_of_2(R), 32768 // block_d)) if INTERPRET else 1
    meta = {} if INTERPRET else dict(num_warps=4 if block_d <= 2048 else 8)
    _rms_norm_kernel[(triton.cdiv(R, block_r),)](
        x2, res2, weight, y,
        R, D,
        x2.stride(0), res2.stride(0), y.stride(0),
        eps,
        HAS_RESIDUAL=residual is not None, BLOCK_R=block_r, BLOCK_D=block_d, **meta,
    )
    return y.view(x.shape)
