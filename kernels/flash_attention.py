"""Fused attention for prefill (causal, grouped-query) and for BERT (key padding mask).

    o = softmax(q k^T / sqrt(HD) + mask) v          (refllm.ops.causal_attention,
                                                     refllm.ops.masked_attention)

FlashAttention (Dao et al. 2022; FlashAttention-2, Dao 2023; Triton's tutorial 06):
the [T, S] score matrix is never written to memory. Program (i, b, h) owns BLOCK_M
queries of one head and streams the keys and values past them in blocks of BLOCK_N,
keeping a running ("online") softmax (Milakov & Gimelshein 2018):

    m = -1e30 (running row max), l = 0 (running sum of exp), acc = 0   [BM], [BM], [BM, HD]
    for each key block j:
        s   = q @ k_j^T * scale, masked to -inf where a key is not visible    [BM, BN]
        m'  = max(m, rowmax(s))
        p   = exp(s - m')                    # this block's weights, on the new max
        a   = exp(m - m')                    # rescales what was summed on the old max
        l   = l * a + rowsum(p)
        acc = acc * a + p @ v_j
        m   = m'
    o = acc / l

The running max starts at -1e30, not -inf, so a block whose keys are all masked
gives p = exp(-inf) = 0 and a = 1 instead of exp(-inf + inf) = NaN.

Visibility:
- causal (the decoder): query t sits at absolute position start_pos + t (start_pos =
  positions already in the KV cache) and sees keys 0 .. start_pos + t. Key blocks
  wholly past the block's last query are not visited at all.
- key padding (BERT): key s is visible when mask[b, s] > 0, for every query.

Grouped-query attention (Ainslie et al. 2023): query head h reads key/value head
h // (NH / NKV) through its strides; K and V are never repeated in memory.

Strides are arguments, so q, k, v and o can be views in any [B, T, heads, HD] order
(the decoder's q is a slice of the fused q/k/v projection; k and v are its cache).
Precision: scores, softmax statistics and the accumulator are float32; with half
precision inputs p is rounded to v's dtype for the p @ v product, as FlashAttention
does. `exp` is the natural one (not exp2 with a folded log2 e), as the reference's.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import INTERPRET, check_same, check_tensor, dot_upcast


@triton.jit
def _flash_attention_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr,  # q [B, T, NH, HD], k/v [B, S, NKV, HD], mask [B, S], o [B, T, NH, HD]
    # sizes
    T, S, NH, G, HD, start_pos,  # G = NH / NKV query heads per key/value head
    # strides (batch, position, head; the head dim is contiguous)
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_mb,
    stride_ob, stride_ot, stride_oh,
    # scalars
    sm_scale,
    # meta-parameters
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NH
    h = pid_bh % NH
    kvh = h // G  # the shared key/value head

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] query index t
    offs_d = tl.arange(0, BLOCK_D)  # [BD]
    d_mask = offs_d < HD
    q_ptrs = q_ptr + b * stride_qb + offs_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < T) & d_mask[None, :], other=0.0)  # [BM, BD]
    if DOT_UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh

    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    if CAUSAL:  # the last key this block's last query sees is start_pos + (its t)
        hi = tl.minimum(S, start_pos + (pid_m + 1) * BLOCK_M)
    else:
        hi = S
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # [BN] key index s
        n_mask = offs_n < S
        kt = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None],
                     mask=n_mask[None, :] & d_mask[:, None], other=0.0)  # [BD, BN], k^T
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # [BN, BD]
        if DOT_UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt, input_precision="ieee") * sm_scale  # [BM, BN] float32

        visible = n_mask[None, :]  # [1, BN]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= start_pos + offs_m[:, None])  # [BM, BN]
        if HAS_MASK:
            keep = tl.load(mask_ptr + b * stride_mb + offs_n, mask=n_mask, other=0)  # [BN]
            visible = visible & (keep[None, :] > 0)
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [BM]
        p = tl.exp(s - m_new[:, None])  # [BM, BN]
        alpha = tl.exp(m_i - m_new)  # [BM]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    o = acc / l_i[:, None]
    o_ptrs = o_ptr + b * stride_ob + offs_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=(offs_m[:, None] < T) & d_mask[None, :])


def _launch(q, k, v, mask, o, start_pos: int, causal: bool):
    """q, o: [B, T, NH, HD] views; k, v: [B, S, NKV, HD] views; mask: [B, S] int32 or None."""
    B, T, NH, HD = q.shape
    S, NKV = k.shape[1], k.shape[2]
    block_d = max(16, triton.next_power_of_2(HD))
    if INTERPRET:
        block_m = max(16, min(256, triton.next_power_of_2(T)))
        block_n = max(16, min(256, triton.next_power_of_2(S)))
        meta = {}
    else:
        block_m, block_n = (64, 64) if block_d <= 64 else (64, 32)
        meta = dict(num_warps=4, num_stages=2)
    grid = (triton.cdiv(T, block_m), B * NH)
    _flash_attention_kernel[grid](
        q, k, v, mask if mask is not None else q, o,
        T, S, NH, NH // NKV, HD, start_pos,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        mask.stride(0) if mask is not None else 0,
        o.stride(0), o.stride(1), o.stride(2),
        1.0 / math.sqrt(HD),
        CAUSAL=causal, HAS_MASK=mask is not None, DOT_UPCAST=dot_upcast(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **meta,
    )
    return o


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    # [T, NH, HD], [S, NKV, HD], [S, NKV, HD] -> [T, NH, HD]
    """Causal grouped-query attention of T queries at positions start_pos .. start_pos +
    T - 1 over the S >= start_pos + T keys of a cache (keys past a query are masked)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 3)
    check_same("q, k, v", q, k, v)
    T, NH, HD = q.shape
    S, NKV, HD_k = k.shape
    if v.shape != k.shape or HD_k != HD:
        raise ValueError(f"k {list(k.shape)} and v {list(v.shape)} must be [S, NKV, {HD}] for q {list(q.shape)}")
    if NH % NKV:
        raise ValueError(f"{NH} query heads are not a multiple of {NKV} key/value heads")
    if start_pos < 0 or start_pos + T > S:
        raise ValueError(f"queries at positions {start_pos} .. {start_pos + T - 1} need keys up to there; S = {S}")
    if out is None:
        out = torch.empty((T, NH, HD), dtype=q.dtype, device=q.device)
    if T:
        _launch(q[None], k[None], v[None], None, out[None], start_pos, causal=True)
    return out


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # [B, NH, T, HD] x3, [B, T] -> [B, NH, T, HD]
    """BERT's bidirectional attention; keys where mask == 0 (padding) are ignored. The
    inputs may be any strided views (e.g. [B, T, NH, HD] permuted); the result is a
    [B, NH, T, HD] view of a [B, T, NH, HD] buffer, so merging the heads back is free."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 4)
    check_same("q, k, v", q, k, v)
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} must have one shape")
    B, NH, T, HD = q.shape
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"mask {list(mask.shape)} must be [{B}, {T}]")
    mask = mask.to(device=q.device, dtype=torch.int32).contiguous()
    out = torch.empty((B, T, NH, HD), dtype=q.dtype, device=q.device)
    if B and T:
        _launch(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, out, 0, causal=False)
    return out.transpose(1, 2)
