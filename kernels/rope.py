"""Rotary position embedding (Su et al. 2021, RoFormer), rotate-half layout.

Hugging Face's Llama checkpoints pair dim i with dim i + HD/2 (GPT-NeoX style, not the
interleaved pairs 2i, 2i+1 of Meta's original code): with x = [x1, x2] split in halves,

    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin          i.e.  y = x * cos + rotate_half(x) * sin

where cos, sin are the tables of `refllm.ops.rope_tables` ([T, HD], each half a copy of
the other), computed on the host in float64 and rounded once, so the angles
position * inv_freq carry no float32 error (at position 8000 that error would be
~1e-3 rad).

The kernel reads x once and writes y once, and `out` may be x itself (in place) or
any strided [T, N, HD] view: the decoder rotates q in place inside the fused q/k/v
projection's output, and writes rotated k straight into its slot of the KV cache,
so the cache write costs no extra pass.

Blocked algorithm: program (i, j) owns BLOCK_T tokens x BLOCK_N heads, a
[BLOCK_T, BLOCK_N, BLOCK_H] block of each half (BLOCK_H = next_power_of_2(HD / 2),
masked past HD / 2); the cos/sin rows of its tokens are loaded once and broadcast
over the heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, check_same, check_tensor


@triton.jit
def _rope_kernel(
    # pointers
    x_ptr, cos_ptr, sin_ptr, y_ptr,  # x [T, N, HD], cos [T, HD], sin [T, HD], y [T, N, HD]
    # sizes
    T, N, HALF,  # HALF = HD / 2
    # strides (the last dim of each is contiguous)
    stride_xt, stride_xn, stride_yt, stride_yn, stride_ct, stride_st,
    # meta-parameters
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    d = tl.arange(0, BLOCK_H)  # [BH], a dim of the first half
    t3, n3, d3 = t[:, None, None], n[None, :, None], d[None, None, :]
    mask = (t3 < T) & (n3 < N) & (d3 < HALF)  # [BT, BN, BH]
    tab_mask = (t[:, None] < T) & (d[None, :] < HALF)  # [BT, BH]

    c1 = tl.load(cos_ptr + t[:, None] * stride_ct + d[None, :], mask=tab_mask, other=0.0).to(tl.float32)[:, None, :]
    c2 = tl.load(cos_ptr + t[:, None] * stride_ct + HALF + d[None, :], mask=tab_mask, other=0.0).to(tl.float32)[:, None, :]
    s1 = tl.load(sin_ptr + t[:, None] * stride_st + d[None, :], mask=tab_mask, other=0.0).to(tl.float32)[:, None, :]
    s2 = tl.load(sin_ptr + t[:, None] * stride_st + HALF + d[None, :], mask=tab_mask, other=0.0).to(tl.float32)[:, None, :]

    x_ptrs = x_ptr + t3 * stride_xt + n3 * stride_xn + d3  # [BT, BN, BH], the first half
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2
    y_ptrs = y_ptr + t3 * stride_yt + n3 * stride_yn + d3
    tl.store(y_ptrs, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptrs + HALF, y2.to(y_ptr.dtype.element_ty), mask=mask)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         out: torch.Tensor | None = None) -> torch.Tensor:  # [T, N, HD], [T, HD], [T, HD] -> [T, N, HD]
    """x rotated by the angles of cos/sin (rotate-half). `out` (x's shape, any strides
    with a contiguous last dim) receives the result and may be x itself."""
    check_tensor("x", x, 3)
    check_tensor("cos", cos, 2)
    check_tensor("sin", sin, 2)
    T, N, HD = x.shape
    if HD % 2:
        raise ValueError(f"rotate-half RoPE needs an even head dim, got {HD}")
    if cos.shape != (T, HD) or sin.shape != (T, HD):
        raise ValueError(f"cos {list(cos.shape)} and sin {list(sin.shape)} must be [{T}, {HD}] for x {list(x.shape)}")
    if out is None:
        out = torch.empty_like(x)
    else:
        check_tensor("out", out, 3)
        check_same("x, out", x, out)
        if out.shape != x.shape:
            raise ValueError(f"out {list(out.shape)} must have x's shape {list(x.shape)}")
    if T == 0 or N == 0:
        return out
    block_h = triton.next_power_of_2(HD // 2)
    block_n = triton.next_power_of_2(N) if INTERPRET else min(triton.next_power_of_2(N), max(1, 2048 // block_h))
    block_t = max(1, min(triton.next_power_of_2(T), 32768 // (block_n * block_h))) if INTERPRET else 1
    _rope_kernel[(triton.cdiv(T, block_t), triton.cdiv(N, block_n))](
        x, cos, sin, out,
        T, N, HD // 2,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0), sin.stride(0),
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_H=block_h,
    )
    return out
