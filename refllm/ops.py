"""The operators of both models, in plain NumPy.

These are the reference: every Triton kernel in `refllm.kernels` is tested against the
function here with the same name. Each is a few lines whose shape comment reads
`[in] -> [out]` with the letters of `refllm.config`.

Precision policy (the whole of it):
- Tensors stay in the dtype they come in (float32 by default, float64 on request);
  NumPy's reductions (`mean`, `sum`, `@`) accumulate in that dtype.
- The RoPE angles `position * inv_freq` are computed in float64 and then cast, so the
  tables are the correctly rounded cos/sin of the exact angle.
- softmax subtracts the row max before `exp`; masked scores are `-inf`, and a row is
  never fully masked (causal attention always sees itself, BERT always sees [CLS]).
- GELU is the exact erf form (`gelu`) unless a config names the tanh form
  (`gelu_tanh`, transformers' `gelu_new` / `gelu_pytorch_tanh`). Its erf is scipy's in
  float64; in float32 it is a rational approximation within 4.2e-7 of the exact value
  (`erf`), as close as torch's own float32 GELU and 5x faster than scipy's float32 erf.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.special


def rms_norm(x, weight, eps):  # [..., D], [D] -> [..., D]
    """RMSNorm (Zhang & Sennrich 2019), as Llama: x / sqrt(mean(x^2) + eps) * weight."""
    ms = np.add.reduce(x * x, axis=-1, keepdims=True) / x.shape[-1]  # [..., 1], = np.mean, minus its Python wrapper
    return x / np.sqrt(ms + eps) * weight


def rms_norm_rows(x, weight, eps, out):  # [B, D], [D] -> [B, D], written into out
    """rms_norm of the rows of a decode step, one row per sequence: each row's mean
    square is a dot product of its own (BLAS's, the same call whatever the other rows)
    and its scale a Python float (float64) rounded to x's dtype; the scaling is then two
    elementwise passes over all the rows."""
    D = x.shape[-1]
    scale = np.array([1 / math.sqrt(float(np.dot(row, row)) / D + eps) for row in x], dtype=x.dtype)  # [B]
    np.multiply(x, scale[:, None], out=out)
    out *= weight
    return out


def layer_norm(x, weight, bias, eps):  # [..., H], [H], [H] -> [..., H]
    """LayerNorm (Ba et al. 2016) with the biased variance, as torch.nn.LayerNorm."""
    H = x.shape[-1]
    mean = np.add.reduce(x, axis=-1, keepdims=True) / H  # [..., 1], = np.mean
    xc = x - mean  # [..., H]
    var = np.add.reduce(xc * xc, axis=-1, keepdims=True) / H  # [..., 1]
    xc /= np.sqrt(var + eps)  # in place from here: xc is ours
    xc *= weight
    xc += bias
    return xc


def softmax(x, axis=-1):  # [..., N] -> [..., N]
    e = x - np.maximum.reduce(x, axis=axis, keepdims=True)  # the one new array; in place from here
    np.exp(e, out=e)
    e /= np.add.reduce(e, axis=axis, keepdims=True)
    return e


def silu(x, out=None):  # [...] -> [...]
    """x * sigmoid(x), written x / (1 + exp(-x)) to stay finite for large |x|; into
    `out` when given (an array of x's shape, not x itself)."""
    y = np.negative(x, out=out)
    np.exp(y, out=y)
    y += 1
    return np.divide(x, y, out=y)


BLOCK_ELEMENTS = 1 << 16  # 256 KiB of float32: what a chain of elementwise passes works on at a time


def by_blocks(f, x):  # [...] -> [...]
    """f(x) for an elementwise f, computed on blocks of BLOCK_ELEMENTS in memory order.

    A chain of NumPy operations passes over its whole input once per operation: GELU's
    erf makes ~25 passes, and BERT's [320, 1536] float32 input (2 MB) does not stay in
    a core's cache between them. Over blocks of 256 KiB the passes after the first read
    the cache: 2.5x faster on that input (6.9 ms to 2.5-3.2 ms, Intel Xeon, 2 MiB L2).
    """
    if x.size <= BLOCK_ELEMENTS or not (x.flags.c_contiguous or x.flags.f_contiguous):
        return f(x)
    out = np.empty_like(x)  # x's memory order
    src, dst = x.ravel(order="K"), out.ravel(order="K")  # [x.size] views, in memory order
    for i in range(0, x.size, BLOCK_ELEMENTS):
        dst[i : i + BLOCK_ELEMENTS] = f(src[i : i + BLOCK_ELEMENTS])
    return out


def gelu(x):  # [...] -> [...]
    """Exact GELU (Hendrycks & Gimpel 2016): x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)),
    by blocks when x is large (`by_blocks`)."""
    return by_blocks(_gelu, x)


def _gelu(x):  # [...] -> [...]
    y = erf(x * x.dtype.type(1 / np.sqrt(2)))  # [...]
    y += 1
    y *= x
    y *= x.dtype.type(0.5)
    return y


# erf in float32: Eigen's `generic_fast_erf_float` (Eigen/src/Core/MathFunctionsImpl.h,
# also XLA's and TensorFlow's), x P(x^2) / Q(x^2) on x clamped to [-4, 4], where erf
# rounds to +-1 in float32. Coefficients from the highest power down.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def erf(x):  # [...] -> [...]
    """The error function. float32: the rational approximation above, within 4.2e-7 of the
    exact value (scipy's float32 erf computes in float64, 5x slower: it was the largest
    cost of a BERT forward pass). Any other dtype: scipy.special.erf."""
    if x.dtype != np.float32:
        return scipy.special.erf(x)
    x = np.clip(x, np.float32(-4), np.float32(4))  # [...]
    x2 = x * x  # [...]
    p, q = _horner(_ERF_P, x2), _horner(_ERF_Q, x2)  # [...] x2
    p *= x
    p /= q
    return p


def _horner(coefficients, x):  # [...] -> [...], the polynomial at x, in x's dtype, in place
    y = x * x.dtype.type(coefficients[0])
    for c in coefficients[1:-1]:
        y += x.dtype.type(c)
        y *= x
    y += x.dtype.type(coefficients[-1])
    return y


def gelu_tanh(x):  # [...] -> [...]
    """The tanh approximation of GELU (BERT's original TF code, transformers' gelu_new)."""
    c = np.sqrt(2 / np.pi).astype(x.dtype)
    return 0.5 * x * (1 + np.tanh(c * (x + 0.044715 * x * x * x)))


def rope_inv_freq(head_dim, theta, rope_scaling=None):  # -> [HD/2] float64
    """The RoPE frequencies (Su et al. 2021, RoFormer) with transformers' scaling types.

    default: inv_freq[i] = theta ** (-2i / HD)
    linear:  inv_freq / factor (positions stretched by `factor`)
    llama3:  long wavelengths divided by `factor`, short ones kept, a smooth ramp
             between (transformers' `_compute_llama3_parameters`).
    """
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [HD/2]
    scaling = rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * np.pi / inv_freq  # [HD/2]
        scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return np.where(medium, smoothed, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")


def rope_tables(positions, inv_freq, dtype):  # [T], [HD/2] -> [T, HD], [T, HD]
    """cos and sin of every (position, frequency) angle, in rotate-half layout."""
    angles = np.outer(np.asarray(positions, dtype=np.float64), inv_freq)  # [T, HD/2]
    angles = np.concatenate([angles, angles], axis=-1)  # [T, HD]
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def rope(x, cos, sin):  # [T, N, HD], [T, HD], [T, HD] -> [T, N, HD]
    """Rotary embedding, Hugging Face's rotate-half convention (GPT-NeoX style):
    dims i and i + HD/2 form a pair, rotated by angle position * inv_freq[i]."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # [T, N, HD]
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rope_matrix(cos, sin):  # [HD], [HD] -> [HD, HD]
    """RoPE at one position as the linear map it is: `x @ rope_matrix(cos, sin)` equals
    `rope(x, cos, sin)` for every row x of that position. RoFormer (Su et al. 2021, eq.
    14-15) defines it this way, a block rotation R with cos on the diagonal and -sin / sin
    pairing dims i and i + HD/2 (rotate-half layout):

        (x R)[i]        = x[i] cos[i] - x[i + HD/2] sin[i]
        (x R)[i + HD/2] = x[i + HD/2] cos[i] + x[i] sin[i]

    A decode step builds it once and rotates every layer's queries and keys with one
    product each, which costs less than the eight elementwise operations of `rope`."""
    HD = cos.shape[-1]
    half, i = HD // 2, np.arange(HD // 2)
    R = np.diag(cos)  # [HD, HD]
    R[i + half, i] = -sin[:half]  # x[i + HD/2] feeds output i
    R[i, i + half] = sin[half:]  # x[i] feeds output i + HD/2
    return R


def causal_attention(q, k, v, start_pos):  # [T, NH, HD], [S, NKV, HD], [S, NKV, HD] -> [T, NH, HD]
    """Scaled dot-product attention with grouped-query heads and a causal mask.

    Query t sits at absolute position start_pos + t and sees keys 0 .. start_pos + t.
    Query head h reads key/value head h // G (G = NH / NKV), without copying K or V.
    A prompt (T > 1): the G query heads of a key/value head and the T positions are the
    rows of one matrix, so each key/value head is one [T*G, HD] x [HD, S] product. A
    decode step (T = 1): each query head is a matrix-vector product with its head's
    keys 0 .. start_pos (a slice, not a mask), and its probabilities one with the values
    (BLAS gemv: less fixed cost per call than a gemm with 1..G rows); every reshape is
    then a view.
    """
    T, NH, HD = q.shape
    S, NKV, _ = k.shape
    G = NH // NKV  # query heads per key/value head
    scale = q.dtype.type(1 / math.sqrt(HD))
    kh, vh = k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # [NKV, S, HD] x2, views of the cache
    if T == 1:
        kh, vh = kh[:, : start_pos + 1], vh[:, : start_pos + 1]  # [NKV, start_pos+1, HD] x2: the keys it may see
        qg = q.reshape(NKV, G, HD, 1)  # [NKV, G, HD, 1]
        scores = (kh[:, None] @ qg)[..., 0]  # [NKV, G, S]
        scores *= scale
        out = softmax(scores)[:, :, None, :] @ vh[:, None]  # [NKV, G, 1, HD]
        return out.reshape(1, NH, HD)
    qg = q.reshape(T, NKV, G, HD).transpose(1, 0, 2, 3).reshape(NKV, T * G, HD)  # [NKV, T*G, HD], row t*G + g
    scores = (qg @ kh.transpose(0, 2, 1)) * scale  # [NKV, T*G, S]
    visible = np.arange(S)[None, :] <= start_pos + np.arange(T)[:, None]  # [T, S]
    scores = np.where(np.repeat(visible, G, axis=0), scores, -np.inf)  # [T*G, S] rows match qg's
    out = softmax(scores) @ vh  # [NKV, T*G, HD]
    return out.reshape(NKV, T, G, HD).transpose(1, 0, 2, 3).reshape(T, NH, HD)


def masked_attention(q, k, v, mask):  # [B, NH, T, HD] x3, [B, T] -> [B, NH, T, HD]
    """BERT's bidirectional attention; keys where mask == 0 (padding) are ignored.

    The softmax runs over a keys-first copy of the scores, [T_k, B, NH, T_q]. NumPy
    reduces over the last axis one short row at a time (a sentence has ~14 keys, and
    each row costs ~150 ns), but over the first axis as elementwise operations on long
    contiguous rows: 2.6x faster for the 32 benchmark sentences.
    """
    HD = q.shape[-1]
    scores = (q @ k.swapaxes(-1, -2)) * q.dtype.type(1 / np.sqrt(HD))  # [B, NH, Tq, Tk]
    keys_first = np.moveaxis(scores, -1, 0).copy()  # [Tk, B, NH, Tq], contiguous
    keys_first[mask.T <= 0] = -np.inf  # padded keys (mask > 0 is a real token), whole [NH, Tq] blocks
    p = softmax(keys_first, axis=0)  # [Tk, B, NH, Tq]
    return np.moveaxis(p, 0, -1) @ v  # [B, NH, Tq, Tk] @ [B, NH, Tk, HD]
