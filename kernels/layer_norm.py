"""LayerNorm (Ba et al. 2016), BERT's norm, with the residual add fused in.

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias,   var biased (1/H)
                                                              (refllm.ops.layer_norm)

BERT is post-norm: every sublayer ends in `layer_norm(sublayer(x) + x)`. Given
`residual`, the kernel adds it while the row is in registers, so the sum is never
written to memory:

    y = layer_norm(x + residual)

The blocked algorithm is Triton's tutorial 05 forward pass with the row held whole:
program p owns BLOCK_R rows of BLOCK_H = next_power_of_2(H) columns, masked past H.
Per row, in float32: mean = sum(x) / H; xc = x - mean, forced to 0 in the masked
columns (where x was loaded as 0, xc would be -mean); var = sum(xc^2) / H; then
y = xc / sqrt(var + eps) * weight + bias, rounded once to the output dtype. The
two-pass form (mean first, then the centred squares) is the reference's, and is
accurate where E[x^2] - E[x]^2 would cancel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, check_same, check_tensor


@triton.jit
def _layer_norm_kernel(
    # pointers
    x_ptr, res_ptr, w_ptr, b_ptr, y_ptr,  # x [R, H], residual [R, H], weight [H], bias [H], y [R, H]
    # sizes
    R, H,
    # strides
    stride_x, stride_res, stride_y,  # between rows; columns are contiguous
    # scalars
    eps,
    # meta-parameters
    HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    cols = tl.arange(0, BLOCK_H)  # [BH]
    mask = (rows[:, None] < R) & (cols[None, :] < H)  # [BR, BH]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / H  # [BR]
    xc = tl.where(mask, x - mean[:, None], 0.0)  # [BR, BH]
    var = tl.sum(xc * xc, axis=1) / H  # [BR]
    std = tl.sqrt_rn(var + eps)  # [BR]
    w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)  # [BH]
    b = tl.load(b_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)  # [BH]
    y = tl.math.div_rn(xc, std[:, None]) * w[None, :] + b[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               residual: torch.Tensor | None = None) -> torch.Tensor:  # [..., H], [H], [H] -> [..., H]
    """LayerNorm over the last dim, of x, or of x + residual when a residual is given."""
    check_tensor("x", x, x.ndim)
    check_tensor("weight", weight, 1)
    check_tensor("bias", bias, 1)
    H = x.shape[-1]
    if weight.shape[0] != H or bias.shape[0] != H:
        raise ValueError(f"weight {list(weight.shape)} and bias {list(bias.shape)} must be [{H}] for x {list(x.shape)}")
    x2 = x.reshape(-1, H)  # [R, H]
    R = x2.shape[0]
    res2 = x2
    if residual is not None:
        check_tensor("residual", residual, x.ndim)
        check_same("x, residual", x, residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual {list(residual.shape)} must have x's shape {list(x.shape)}")
        res2 = residual.reshape(-1, H)
    y = torch.empty((R, H), dtype=x.dtype, device=x.device)
    if R == 0:
        return y.view(x.shape)
    block_h = triton.next_power_of_2(H)
    block_r = max(1, min(triton.next_power_of_2(R), 32768 // block_h)) if INTERPRET else 1
    meta = {} if INTERPRET else dict(num_warps=4 if block_h <= 2048 else 8)
    _layer_norm_kernel[(triton.cdiv(R, block_r),)](
        x2, res2, weight, bias, y,
        R, H,
        x2.stride(0), res2.stride(0), y.stride(0),
        eps,
        HAS_RESIDUAL=residual is not None, BLOCK_R=block_r, BLOCK_H=block_h, **meta,
    )
    return y.view(x.shape)
