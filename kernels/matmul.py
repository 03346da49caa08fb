"""Matrix multiplication `x @ w.T (+ bias)`, with the activation fused in the epilogue.

The weight is in the checkpoint's layout, `w[N, K]` (torch.nn.Linear's `[out, in]`),
and is never transposed in memory: the kernel reads it through its strides. Operands
are float32, float16 or bfloat16 (x and w of one dtype); products accumulate in
float32 and the result is rounded once, to the output dtype, at the store.

Two kernels, chosen by the number of rows M:

1. Tiled (M > 16: prefill, BERT) - Triton's tutorial 03. Program p owns the output
   tile C[m0 : m0 + BM, n0 : n0 + BN]:

       acc = zeros[BM, BN] (float32)
       for k0 in 0, BK, 2 BK, ... < K:              # the reduction, one K-slab at a time
           acc += x[m0 : m0 + BM, k0 : k0 + BK] @ w[n0 : n0 + BN, k0 : k0 + BK].T
       C[tile] = act(acc + bias[n0 : n0 + BN])     # the epilogue, in registers

   Programs are launched in "grouped" order (GROUP_M row-tiles share a column of w
   while it sits in L2). Ragged edges: row and column indices wrap modulo M and N
   (so loads stay in bounds without a mask) and the store is masked; the last K-slab
   is masked with zeros, which add nothing.

2. Split-K (M <= 16: decode's single row) - a GEMV in disguise. With one row there is
   one row-tile, so the tiled kernel would launch only N / BN programs, too few to
   stream the weight at full bandwidth. Split-K also cuts K into SPLITS slices:

       program (j, s):  part[s, :, n0 : n0 + BN] = x[:, K_s] @ w[n0 : n0 + BN, K_s].T
       reduce   (m, j): C[m, n0 : n0 + BN] = act(sum_s part[s, m, n0 : n0 + BN] + bias)

   so there are (N / BN) * SPLITS programs each reading a [BN, K / SPLITS] slab of
   the weight once. The partial sums go through a float32 buffer and a second small
   kernel (deterministic, unlike atomic adds), which also applies the epilogue.

Epilogue activations (`act`): None; "gelu" (erf) and "gelu_tanh" (BERT's
intermediate layer); "swiglu" (Llama's MLP): w is then the gate and up projections
stacked, [2N, K] = cat(gate_proj, up_proj), and C = silu(x @ gate.T) * (x @ up.T) is
[M, N]. The tiled kernel keeps two accumulators that share each x-tile; the gate-up
product is never written to memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activations import gelu_erf, gelu_tanh, silu
from .common import INTERPRET, check_same, check_tensor, dot_upcast

ACTS = {None: 0, "gelu": 1, "gelu_tanh": 2, "swiglu": 3}
SKINNY_M = 16  # at most this many rows: the split-K kernel


@triton.jit
def _epilogue(acc, acc_up, bias_ptr, offs_n, N, HAS_BIAS: tl.constexpr, ACT: tl.constexpr):
    """act(acc + bias) on a [BM, BN] float32 tile; for swiglu, bias is [2N] (gate, up)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if ACT == 3:
            acc_up += tl.load(bias_ptr + N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = gelu_erf(acc)
    elif ACT == 2:
        acc = gelu_tanh(acc)
    elif ACT == 3:
        acc = silu(acc) * acc_up
    return acc


@triton.jit
def _matmul_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, out_ptr,  # x [M, K], w [N, K] ([2N, K] for swiglu), bias [N] ([2N]), out [M, N]
    # sizes
    M, N, K,  # N: output columns
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    # meta-parameters
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ordering (tutorial 03): consecutive programs walk down GROUP_M row-tiles
    # of one column of tiles before moving right, so a w-tile is reused from L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M  # [BM], wrapped: loads in bounds
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # [BN]
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BM, BK]
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # [BK, BN], w.T's tile

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # swiglu's second product (unused otherwise)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)  # [BM, BK]
        b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)  # [BK, BN]
        if DOT_UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee")
        if ACT == 3:
            b_up = tl.load(w_ptrs + N * stride_wn, mask=offs_k[:, None] < k_left, other=0.0)  # up_proj rows
            if DOT_UPCAST:
                b_up = b_up.to(tl.float32)
            acc_up = tl.dot(a, b_up, acc_up, input_precision="ieee")
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # unwrapped again, for the masks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c = _epilogue(acc, acc_up, bias_ptr, offs_n, N, HAS_BIAS, ACT)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, c.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _matmul_splitk_kernel(
    # pointers
    x_ptr, w_ptr, part_ptr,  # x [M, K], w [NW, K], part [SPLITS, M, NW] float32
    # sizes
    M, NW, K, K_PER_SPLIT,  # NW: rows of w (2N for swiglu); K_PER_SPLIT: a multiple of BLOCK_K
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ps, stride_pm,
    # meta-parameters
    DOT_UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)  # [BM], all the rows: M <= BLOCK_M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    offs_k = k_start + tl.arange(0, BLOCK_K)  # [BK]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BM, BK]
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # [BK, BN]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        k_in = (k + tl.arange(0, BLOCK_K)) < k_end  # [BK]
        a = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & k_in[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_in[:, None] & (offs_n[None, :] < NW), other=0.0)
        if DOT_UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee")
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    part_ptrs = part_ptr + pid_s * stride_ps + offs_m[:, None] * stride_pm + offs_n[None, :]
    tl.store(part_ptrs, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < NW))


@triton.jit
def _splitk_reduce_kernel(
    # pointers
    part_ptr, bias_ptr, out_ptr,  # part [SPLITS, M, NW] float32, bias [NW], out [M, N]
    # sizes
    N, SPLITS,  # N: output columns (NW = 2N for swiglu, else N)
    # strides
    stride_ps, stride_pm, stride_om, stride_on,
    # meta-parameters
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask = offs_n < N
    acc = tl.zeros((1, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((1, BLOCK_N), dtype=tl.float32)
    row_ptrs = part_ptr + m * stride_pm + offs_n[None, :]  # [1, BN]
    for s in range(0, SPLITS):
        acc += tl.load(row_ptrs + s * stride_ps, mask=mask[None, :], other=0.0)
        if ACT == 3:
            acc_up += tl.load(row_ptrs + s * stride_ps + N, mask=mask[None, :], other=0.0)
    c = _epilogue(acc, acc_up, bias_ptr, offs_n, N, HAS_BIAS, ACT)
    tl.store(out_ptr + m * stride_om + offs_n[None, :] * stride_on, c.to(out_ptr.dtype.element_ty), mask=mask[None, :])


# ---------------------------------------------------------------------------- launch


def _tiled_config(M: int, N: int, dtype: torch.dtype) -> dict:
    if INTERPRET:  # an interpreted program costs per `tl` operation, not per element: few, large tiles
        return dict(BLOCK_M=min(256, triton.next_power_of_2(M)), BLOCK_N=256, BLOCK_K=256, GROUP_M=8)
    if dtype == torch.float32:  # IEEE float32 runs on the FMA units: moderate tiles
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
    block_m = 64 if M <= 64 else 128
    return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8 if block_m == 128 else 4, num_stages=3)


def _splitk_config(N_w: int, K: int) -> dict:
    """BLOCK_N and BLOCK_K, and how many K-slices: enough programs to fill the device."""
    if INTERPRET:
        block_n, block_k, target = 256, 256, 1
    else:
        block_n, block_k = 64, 128
        target = 2 * torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    n_tiles = triton.cdiv(N_w, block_n)
    splits = max(1, min(triton.cdiv(target, n_tiles), triton.cdiv(K, block_k)))
    if INTERPRET:
        splits = min(4, triton.cdiv(K, block_k))  # still split, so the reduction is exercised
    k_per_split = triton.cdiv(triton.cdiv(K, splits), block_k) * block_k
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLITS=triton.cdiv(K, k_per_split), K_PER_SPLIT=k_per_split)


def matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, act: str | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:  # [M, K], [N, K], [N] -> [M, N]
    """act(x @ w.T + bias), accumulated in float32, rounded once to `out_dtype` (x's).

    For act="swiglu", w is [2N, K] (gate rows, then up rows), bias [2N], and the
    result silu(x @ gate.T + b_gate) * (x @ up.T + b_up) is [M, N].
    """
    if act not in ACTS:
        raise ValueError(f"act={act!r}: expected one of {list(ACTS)}")
    check_tensor("x", x, 2, last_contiguous=False)
    check_tensor("w", w, 2, last_contiguous=False)
    check_same("x, w", x, w)
    M, K = x.shape
    N_w, K_w = w.shape
    if K_w != K:
        raise ValueError(f"x {list(x.shape)} @ w.T: w is {list(w.shape)}, expected [N, {K}]")
    if act == "swiglu" and N_w % 2:
        raise ValueError(f"act='swiglu' needs w = cat(gate, up), [2N, K]; got {N_w} rows")
    N = N_w // 2 if act == "swiglu" else N_w
    if bias is not None:
        check_tensor("bias", bias, 1)
        if bias.shape[0] != N_w:
            raise ValueError(f"bias is {list(bias.shape)}, expected [{N_w}]")
    if K == 0:
        raise ValueError("x @ w.T with K = 0")
    out = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    bias_arg = bias if bias is not None else out  # a dummy pointer, never read
    meta = dict(HAS_BIAS=bias is not None, ACT=ACTS[act])

    if M > SKINNY_M:
        cfg = _tiled_config(M, N, x.dtype)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _matmul_kernel[grid](
            x, w, bias_arg, out,
            M, N, K,
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
            DOT_UPCAST=dot_upcast(x.dtype), **meta, **cfg,
        )
        return out

    cfg = _splitk_config(N_w, K)
    splits, block_n = cfg["SPLITS"], cfg["BLOCK_N"]
    part = torch.empty((splits, M, N_w), dtype=torch.float32, device=x.device)
    _matmul_splitk_kernel[(triton.cdiv(N_w, block_n), splits)](
        x, w, part,
        M, N_w, K, cfg["K_PER_SPLIT"],
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), part.stride(0), part.stride(1),
        DOT_UPCAST=dot_upcast(x.dtype), BLOCK_M=SKINNY_M, BLOCK_N=block_n, BLOCK_K=cfg["BLOCK_K"],
    )
    reduce_n = min(1024, triton.next_power_of_2(N))
    _splitk_reduce_kernel[(M, triton.cdiv(N, reduce_n))](
        part, bias_arg, out,
        N, splits,
        part.stride(0), part.stride(1), out.stride(0), out.stride(1),
        **meta, BLOCK_N=reduce_n,
    )
    return out

