"""Every Triton kernel of `refllm.kernels` against its NumPy reference in `refllm.ops`.

Shapes are irregular on purpose (Triton's tutorials test 1823 x 781; Liger-Kernel's
tests pick "weird" shapes): no size is a multiple of a block, so every masked edge is
exercised. The reference is computed in float64 from the very inputs the kernel got
(rounded to its dtype first), so a difference is the kernel's own error, and it is
judged against a per-dtype tolerance (TOL). A failure reports max |Δ|, how many
elements are out of tolerance, and NaN / Inf counted apart.

Where they run: on CUDA when torch sees a GPU, else on the CPU under Triton's
interpreter (`TRITON_INTERPRET=1`, set below before triton is imported). The
interpreter runs each program as NumPy code, about a millisecond per `tl` operation,
so the wrappers pick large blocks there. Without torch or triton the module skips,
with the reason.

    pytest tests/test_kernels.py            # the default run, interpreter: ~1-2 min on 2 cores
    pytest tests/test_kernels.py -m slow    # + the compile check for sm_80 / sm_90 (minutes)
    pytest tests/test_kernels.py -s         # print max |Δ| of every case
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the Triton kernels take torch tensors")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton and the kernels are imported
pytest.importorskip("triton", reason="triton is not installed: no CUDA and no interpreter to run the kernels")

import refllm.kernels as kn  # noqa: E402
from refllm import ops  # noqa: E402

if not (torch.cuda.is_available() or kn.INTERPRET):
    pytest.skip("no CUDA device and TRITON_INTERPRET=0: nowhere to run the kernels", allow_module_level=True)

DEVICE = kn.device()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Against a float64 reference on the same inputs. float32: accumulation error only;
# float16 / bfloat16: the output's rounding (2^-11 / 2^-8 relative) and, in attention,
# the probabilities rounded to the input dtype for p @ v.
TOL = {  # dtype: (atol, rtol)
    torch.float32: (2e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


pytestmark = pytest.mark.usefixtures("one_blas_thread")


def rand(rng, shape, dtype, scale=1.0, offset=0.0):
    """A random tensor of `dtype` on the kernels' device (normal, times scale, plus
    offset), and the float64 NumPy copy of exactly its values (after rounding to dtype)."""
    t = torch.tensor(rng.standard_normal(shape) * scale + offset, dtype=torch.float64).to(dtype).to(DEVICE)
    return t, t.double().cpu().numpy()


def check(name: str, got: torch.Tensor, ref: np.ndarray, dtype: torch.dtype) -> float:
    """Assert |got - ref| <= atol + rtol |ref| everywhere; print and return max |Δ|."""
    atol, rtol = TOL[dtype]
    g = got.detach().double().cpu().numpy()
    assert g.shape == ref.shape, f"{name}: shape {g.shape}, expected {ref.shape}"
    n_nan, n_inf = int(np.isnan(g).sum()), int(np.isinf(g).sum())
    finite = np.isfinite(g)
    diff = np.where(finite, np.abs(g - ref), np.inf)
    bad = diff > atol + rtol * np.abs(ref)
    max_d = float(np.max(np.abs(g - ref)[finite])) if finite.any() else float("nan")
    print(f"{name} [{str(dtype).replace('torch.', '')}]: max |Δ| = {max_d:.3g}")
    assert not bad.any(), (
        f"{name} [{dtype}]: max |Δ| = {max_d:.3g} (atol {atol:g}, rtol {rtol:g}); "
        f"{int(bad.sum())} of {bad.size} elements out of tolerance, {n_nan} NaN, {n_inf} Inf")
    return max_d


# ------------------------------------------------------------------------------ matmul

MATMUL_SHAPES = [  # M, N, K
    (1, 576, 1536),  # decode: split-K, SmolLM2's down_proj shape
    (1, 1536, 576),  # decode: split-K, gate/up
    (7, 123, 4096),  # split-K, a few rows, a long K
    (1823, 781, 515),  # tiled, tutorial 03's shape, odd K
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K", MATMUL_SHAPES, ids=lambda v: str(v))
def test_matmul(M, N, K, dtype):
    rng = np.random.default_rng(M + N + K)
    x, x64 = rand(rng, (M, K), dtype)
    w, w64 = rand(rng, (N, K), dtype, scale=1 / np.sqrt(K))
    check(f"matmul {M}x{N}x{K}", kn.matmul(x, w), x64 @ w64.T, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "swiglu", None])
@pytest.mark.parametrize("M", [3, 37])  # split-K and tiled
def test_matmul_bias_and_activation(M, act, dtype):
    N, K = 300, 129
    NW = 2 * N if act == "swiglu" else N
    rng = np.random.default_rng(M)
    x, x64 = rand(rng, (M, K), dtype)
    w, w64 = rand(rng, (NW, K), dtype, scale=1 / np.sqrt(K))
    b, b64 = rand(rng, (NW,), dtype)
    y64 = x64 @ w64.T + b64  # [M, NW]
    ref = {None: lambda y: y, "gelu": ops.gelu, "gelu_tanh": ops.gelu_tanh,
           "swiglu": lambda y: ops.silu(y[:, :N]) * y[:, N:]}[act](y64)
    check(f"matmul {M}x{N}x{K} +bias act={act}", kn.matmul(x, w, b, act=act), ref, dtype)


@pytest.mark.parametrize("M", [5, 70])
def test_matmul_strided_views(M):
    """x a column slice of a wider buffer and w a transposed view: no copies needed."""
    rng = np.random.default_rng(0)
    buf, buf64 = rand(rng, (M, 200), torch.float32)
    wt, wt64 = rand(rng, (97, 61), torch.float32)  # w = wt.T is [61, 97], strides (1, 61)
    x, w = buf[:, 3:100], wt.T
    check(f"matmul strided {M}x61x97", kn.matmul(x, w), buf64[:, 3:100] @ wt64, torch.float32)


def test_matmul_checks_its_arguments():
    x = torch.zeros((4, 8), device=DEVICE)
    with pytest.raises(ValueError, match="expected \\[N, 8\\]"):
        kn.matmul(x, torch.zeros((5, 9), device=DEVICE))
    with pytest.raises(TypeError, match="share one dtype"):
        kn.matmul(x, torch.zeros((5, 8), dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="swiglu"):
        kn.matmul(x, torch.zeros((5, 8), device=DEVICE), act="swiglu")
    with pytest.raises(ValueError, match="act="):
        kn.matmul(x, torch.zeros((5, 8), device=DEVICE), act="relu")
    with pytest.raises(TypeError, match="dtype"):
        kn.matmul(x.double(), torch.zeros((5, 8), dtype=torch.float64, device=DEVICE))


# ------------------------------------------------------------------------------ norms

NORM_SHAPES = [(1, 576), (257, 576), (17, 36), (5, 1000)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R,D", NORM_SHAPES, ids=str)
def test_rms_norm(R, D, dtype):
    rng = np.random.default_rng(R * D)
    x, x64 = rand(rng, (R, D), dtype)
    w, w64 = rand(rng, (D,), dtype, scale=0.1, offset=1.0)
    check(f"rms_norm {R}x{D}", kn.rms_norm(x, w, 1e-5), ops.rms_norm(x64, w64, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_fused_residual(dtype):
    rng = np.random.default_rng(1)
    x, x64 = rand(rng, (3, 13, 576), dtype)  # 3-D: the rows are the leading dims
    r, r64 = rand(rng, (3, 13, 576), dtype)
    w, w64 = rand(rng, (576,), dtype)
    y = kn.rms_norm(x, w, 1e-6, residual=r)
    h64 = r.double().cpu().numpy()  # the updated residual, as stored (rounded to dtype)
    check("rms_norm residual += x", r, x64 + r64, dtype)
    check("rms_norm(residual + x)", y, ops.rms_norm(h64, w64, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R,H", [(1, 384), (257, 384), (33, 30), (4, 1000)], ids=str)
def test_layer_norm(R, H, dtype):
    rng = np.random.default_rng(R + H)
    x, x64 = rand(rng, (R, H), dtype, scale=3.0, offset=5.0)  # the mean must come out before the variance
    w, w64 = rand(rng, (H,), dtype)
    b, b64 = rand(rng, (H,), dtype)
    check(f"layer_norm {R}x{H}", kn.layer_norm(x, w, b, 1e-12), ops.layer_norm(x64, w64, b64, 1e-12), dtype)
    r, r64 = rand(rng, (R, H), dtype)
    check(f"layer_norm(x + residual) {R}x{H}", kn.layer_norm(x, w, b, 1e-5, residual=r),
          ops.layer_norm(x64 + r64, w64, b64, 1e-5), dtype)


# ------------------------------------------------------------------------------ RoPE

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,N,HD,start", [(1, 9, 64, 5), (17, 12, 64, 0), (257, 3, 10, 1000)], ids=str)
def test_rope(T, N, HD, start, dtype):
    rng = np.random.default_rng(T)
    inv_freq = ops.rope_inv_freq(HD, 1e5)
    cos64, sin64 = ops.rope_tables(np.arange(start, start + T), inv_freq, np.float64)
    cos32, sin32 = (torch.tensor(a, dtype=torch.float32, device=DEVICE) for a in ops.rope_tables(
        np.arange(start, start + T), inv_freq, np.float32))
    x, x64 = rand(rng, (T, N, HD), dtype)
    ref = ops.rope(x64, cos32.double().cpu().numpy(), sin32.double().cpu().numpy())
    check(f"rope {T}x{N}x{HD} @{start}", kn.rope(x, cos32, sin32), ref, dtype)
    assert np.abs(ref - ops.rope(x64, cos64, sin64)).max() < 1e-5  # the float32 tables are the float64 ones, rounded


def test_rope_in_place_in_a_strided_view():
    """As the decoder uses it: q rotated in place inside the q/k/v buffer, k written
    into another buffer (the KV cache); v untouched."""
    T, NH, NKV, HD = 7, 6, 2, 16
    rng = np.random.default_rng(2)
    qkv, qkv64 = rand(rng, (T, (NH + 2 * NKV) * HD), torch.float32)
    cos, sin = (torch.tensor(a, device=DEVICE) for a in ops.rope_tables(np.arange(3, 3 + T), ops.rope_inv_freq(HD, 1e4), np.float32))
    c64, s64 = cos.double().cpu().numpy(), sin.double().cpu().numpy()
    q = qkv[:, : NH * HD].unflatten(1, (NH, HD))
    k = qkv[:, NH * HD : (NH + NKV) * HD].unflatten(1, (NKV, HD))
    cache = torch.zeros((20, NKV, HD), device=DEVICE)
    kn.rope(q, cos, sin, out=q)
    kn.rope(k, cos, sin, out=cache[3 : 3 + T])
    check("rope q in place", q, ops.rope(qkv64[:, : NH * HD].reshape(T, NH, HD), c64, s64), torch.float32)
    check("rope k into the cache", cache[3 : 3 + T], ops.rope(qkv64[:, NH * HD : (NH + NKV) * HD].reshape(T, NKV, HD), c64, s64), torch.float32)
    assert np.array_equal(qkv[:, NH * HD :].cpu().numpy(), qkv64[:, NH * HD :].astype(np.float32))
    assert not cache[: 3].any() and not cache[3 + T :].any()


# ------------------------------------------------------------------------------ attention

ATTENTION_CASES = [  # T, start_pos, NH, NKV, HD
    (1, 0, 9, 3, 64),  # GQA, one token (SmolLM2's heads)
    (17, 0, 9, 3, 64),  # GQA prefill
    (17, 40, 4, 4, 64),  # MHA, a chunk on top of a cache
    (257, 0, 9, 3, 64),  # GQA, longer than a block
    (257, 3, 4, 4, 64),  # MHA with start_pos
    (17, 5, 3, 1, 10),  # one key/value head, a head dim that is no power of two
]


@pytest.mark.parametrize("T,start,NH,NKV,HD", ATTENTION_CASES, ids=str)
def test_causal_attention(T, start, NH, NKV, HD):
    S = start + T
    rng = np.random.default_rng(T + start)
    q, q64 = rand(rng, (T, NH, HD), torch.float32)
    k, k64 = rand(rng, (S, NKV, HD), torch.float32)
    v, v64 = rand(rng, (S, NKV, HD), torch.float32)
    check(f"causal_attention T={T} start={start} {NH}/{NKV}x{HD}", kn.causal_attention(q, k, v, start),
          ops.causal_attention(q64, k64, v64, start), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T,start", [(17, 0), (33, 20)], ids=str)
def test_causal_attention_half(T, start, dtype):
    S, NH, NKV, HD = start + T, 9, 3, 64
    rng = np.random.default_rng(T)
    q, q64 = rand(rng, (T, NH, HD), dtype)
    k, k64 = rand(rng, (S, NKV, HD), dtype)
    v, v64 = rand(rng, (S, NKV, HD), dtype)
    check(f"causal_attention T={T} start={start}", kn.causal_attention(q, k, v, start),
          ops.causal_attention(q64, k64, v64, start), dtype)


@pytest.mark.parametrize("S,NH,NKV,HD,splits", [
    (1, 9, 3, 64, None), (17, 9, 3, 64, None), (17, 9, 3, 64, 3), (257, 9, 3, 64, 4),
    (257, 4, 4, 64, None), (100, 3, 1, 10, 7)], ids=str)
def test_decode_attention(S, NH, NKV, HD, splits):
    rng = np.random.default_rng(S)
    q, q64 = rand(rng, (1, NH, HD), torch.float32)
    k, k64 = rand(rng, (S, NKV, HD), torch.float32)
    v, v64 = rand(rng, (S, NKV, HD), torch.float32)
    check(f"decode_attention S={S} {NH}/{NKV}x{HD} splits={splits}", kn.decode_attention(q, k, v, num_splits=splits),
          ops.causal_attention(q64, k64, v64, S - 1), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_decode_attention_half(dtype):
    S, NH, NKV, HD = 257, 9, 3, 64
    rng = np.random.default_rng(3)
    q, q64 = rand(rng, (1, NH, HD), dtype)
    k, k64 = rand(rng, (S, NKV, HD), dtype)
    v, v64 = rand(rng, (S, NKV, HD), dtype)
    check("decode_attention S=257", kn.decode_attention(q, k, v, num_splits=3),
          ops.causal_attention(q64, k64, v64, S - 1), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,NH,HD", [(3, 17, 12, 32), (2, 257, 4, 64), (2, 1, 3, 10)], ids=str)
def test_masked_attention(B, T, NH, HD, dtype):
    rng = np.random.default_rng(B * T)
    q, q64 = rand(rng, (B, NH, T, HD), dtype)
    k, k64 = rand(rng, (B, NH, T, HD), dtype)
    v, v64 = rand(rng, (B, NH, T, HD), dtype)
    lengths = [T, max(1, T - 5), 1][:B]
    mask = (np.arange(T)[None, :] < np.array(lengths)[:, None]).astype(np.int64)  # [B, T], padding on the right
    check(f"masked_attention B={B} T={T} {NH}x{HD}", kn.masked_attention(q, k, v, torch.tensor(mask, device=DEVICE)),
          ops.masked_attention(q64, k64, v64, mask), dtype)


def test_attention_checks_its_arguments():
    q = torch.zeros((5, 6, 16), device=DEVICE)
    kv = torch.zeros((5, 4, 16), device=DEVICE)
    with pytest.raises(ValueError, match="not a multiple"):
        kn.causal_attention(q, kv, kv, 0)
    with pytest.raises(ValueError, match="need keys"):
        kn.causal_attention(q, kv[:, :2], kv[:, :2], 1)
    with pytest.raises(ValueError, match="one query"):
        kn.decode_attention(q, kv[:, :2], kv[:, :2])


# ------------------------------------------------------------------------------ elementwise

@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # silu(-90): x / (1 + inf) = -0, as the reference
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: the tails, where exp overflows if written naively
def test_activations(dtype, scale):
    rng = np.random.default_rng(4)
    x, x64 = rand(rng, (33, 77), dtype, scale=scale)
    g, g64 = rand(rng, (33, 77), dtype)
    check(f"gelu x{scale:g}", kn.gelu(x), ops.gelu(x64), dtype)
    check(f"gelu_tanh x{scale:g}", kn.gelu(x, approximate="tanh"), ops.gelu_tanh(x64), dtype)
    with np.errstate(over="ignore"):
        ref = ops.silu(x64) * g64
    check(f"swiglu x{scale:g}", kn.swiglu(x, g), ref, dtype)


# ------------------------------------------------------------------------------ CUDA compile

def _has_nvidia_backend() -> bool:
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton has no NVIDIA backend (ptxas) to compile with")
def test_every_kernel_compiles_for_cuda():
    """The configurations the wrappers pick on a GPU compile to sm_80 and sm_90 cubins
    (Triton's whole pipeline and ptxas), checked without a GPU: what the interpreter
    cannot see (tl.dot shape rules, loop-carried dtypes, shared memory). Started as the
    README writes it, under the interpreter the tests set: it re-runs itself without."""
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, "-m", "refllm.kernels.compile_check", "--arch", "80", "90"],
                       env=env, capture_output=True, text=True, timeout=1800)
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
