"""Decode attention over the KV cache, split along the sequence (flash-decoding).

One new token attends to all S positions of the cache:

    o[h] = softmax(q[h] k_{h/G}^T / sqrt(HD)) v_{h/G}        (refllm.ops.causal_attention
                                                              with T = 1, start_pos = S - 1)

With one query there is one query block, so the prefill kernel would run only NH
programs, each streaming the whole cache: on a GPU with ~100 SMs and a long context
most of the machine idles. Flash-decoding (Dao, Haziza, Massa & Sizov 2023) also
splits the keys:

1. partial, program (g, j), for key/value head g and split j of SPLIT_LEN positions:
   the online softmax of the prefill kernel over its split only, for the G query
   heads that share head g (stacked as the rows of one [BLOCK_G, HD] block, so each
   K/V tile is read once for all of them: grouped-query attention's saving), leaving
   unnormalised partials

       m[h, j] = max_s score,  l[h, j] = sum_s exp(score - m),  acc[h, j] = sum_s exp(score - m) v_s

2. reduce, program h: merge the splits on their common max M = max_j m[h, j]:

       o[h] = sum_j exp(m_j - M) acc_j / sum_j exp(m_j - M) l_j

Every split holds at least one key (the number of splits is cdiv(S, SPLIT_LEN)), so
every l is positive. Partials are float32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import INTERPRET, check_same, check_tensor, dot_upcast


@triton.jit
def _decode_partial_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, acc_ptr, m_ptr, l_ptr,  # q [NH, HD], k/v [S, NKV, HD]; acc [NH, SPLITS, HD], m/l [NH, SPLITS]
    # sizes
    S, G, HD, SPLIT_LEN,  # G = NH / NKV
    # strides (the head dim is contiguous)
    stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
    stride_ah, stride_as, stride_mh,
    # scalars
    sm_scale,
    # meta-parameters
    DOT_UPCAST: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)  # [BG] the query heads of this key/value head
    heads = kvh * G + offs_g
    g_mask = offs_g < G
    offs_d = tl.arange(0, BLOCK_D)  # [BD]
    d_mask = offs_d < HD
    q = tl.load(q_ptr + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BG, BD]
    if DOT_UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh

    s_start = split * SPLIT_LEN
    s_end = tl.minimum(s_start + SPLIT_LEN, S)
    m_i = tl.full((BLOCK_G,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for n0 in range(s_start, s_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # [BN]
        n_mask = offs_n < s_end
        kt = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None],
                     mask=n_mask[None, :] & d_mask[:, None], other=0.0)  # [BD, BN]
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # [BN, BD]
        if DOT_UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt, input_precision="ieee") * sm_scale  # [BG, BN]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    tl.store(acc_ptr + heads[:, None] * stride_ah + split * stride_as + offs_d[None, :], acc,
             mask=g_mask[:, None] & d_mask[None, :])
    tl.store(m_ptr + heads * stride_mh + split, m_i, mask=g_mask)
    tl.store(l_ptr + heads * stride_mh + split, l_i, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    # pointers
    acc_ptr, m_ptr, l_ptr, o_ptr,  # acc [NH, SPLITS, HD], m/l [NH, SPLITS] float32; o [NH, HD]
    # sizes
    SPLITS, HD,
    # strides
    stride_ah, stride_as, stride_mh, stride_oh,
    # meta-parameters
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    h = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)  # [BS]
    offs_d = tl.arange(0, BLOCK_D)  # [BD]
    s_mask = offs_s < SPLITS
    m_s = tl.load(m_ptr + h * stride_mh + offs_s, mask=s_mask, other=float("-inf"))  # [BS]
    l_s = tl.load(l_ptr + h * stride_mh + offs_s, mask=s_mask, other=0.0)  # [BS]
    acc = tl.load(acc_ptr + h * stride_ah + offs_s[:, None] * stride_as + offs_d[None, :],
                  mask=s_mask[:, None] & (offs_d[None, :] < HD), other=0.0)  # [BS, BD]
    w = tl.exp(m_s - tl.max(m_s, axis=0))  # [BS], 0 for the masked splits
    o = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l_s, axis=0)  # [BD]
    tl.store(o_ptr + h * stride_oh + offs_d, o.to(o_ptr.dtype.element_ty), mask=offs_d < HD)


def _num_splits(S: int, NKV: int, block_n: int) -> int:
    """Enough programs to fill the device (two per SM), no split shorter than a block."""
    if INTERPRET:
        return 1
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, NKV), triton.cdiv(S, block_n)))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_splits: int | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    # [1, NH, HD], [S, NKV, HD], [S, NKV, HD] -> [1, NH, HD]
    """One query (the newest position, S - 1) over all S keys of the cache, the keys
    cut into `num_splits` consecutive splits (default: by the device's SM count)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 3)
    check_same("q, k, v", q, k, v)
    T, NH, HD = q.shape
    S, NKV, HD_k = k.shape
    if T != 1:
        raise ValueError(f"decode attention takes one query, got q {list(q.shape)}; use causal_attention")
    if v.shape != k.shape or HD_k != HD:
        raise ValueError(f"k {list(k.shape)} and v {list(v.shape)} must be [S, NKV, {HD}] for q {list(q.shape)}")
    if NH % NKV:
        raise ValueError(f"{NH} query heads are not a multiple of {NKV} key/value heads")
    if S == 0:
        raise ValueError("decode attention over an empty cache")
    G = NH // NKV
    block_d = max(16, triton.next_power_of_2(HD))
    block_g = max(16, triton.next_power_of_2(G))  # tl.dot wants 16 rows at least
    block_n = 128 if INTERPRET else 64
    splits = num_splits or _num_splits(S, NKV, block_n)
    split_len = triton.cdiv(S, max(1, min(splits, S)))
    splits = triton.cdiv(S, split_len)  # every split non-empty

    acc = torch.empty((NH, splits, HD), dtype=torch.float32, device=q.device)
    m_part = torch.empty((NH, splits), dtype=torch.float32, device=q.device)
    l_part = torch.empty((NH, splits), dtype=torch.float32, device=q.device)
    if out is None:
        out = torch.empty((1, NH, HD), dtype=q.dtype, device=q.device)
    meta = {} if INTERPRET else dict(num_warps=4, num_stages=2)
    _decode_partial_kernel[(NKV, splits)](
        q[0], k, v, acc, m_part, l_part,
        S, G, HD, split_len,
        q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        acc.stride(0), acc.stride(1), m_part.stride(0),
        1.0 / math.sqrt(HD),
        DOT_UPCAST=dot_upcast(q.dtype), BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d, **meta,
    )
    _decode_reduce_kernel[(NH,)](
        acc, m_part, l_part, out[0],
        splits, HD,
        acc.stride(0), acc.stride(1), m_part.stride(0), out.stride(1),
        BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
    )
    return out
