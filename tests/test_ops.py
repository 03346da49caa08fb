"""NumPy operators against independent formulations of the same mathematics."""

from __future__ import annotations

import numpy as np
import pytest

from refllm import ops


@pytest.mark.parametrize("HD", [2, 8, 64, 96])
@pytest.mark.parametrize("position", [0, 1, 37, 4095])
def test_rope_matrix_is_rope_at_one_position(HD, position):
    """x @ rope_matrix(cos, sin) == rope(x, cos, sin), and both equal the rotation of the
    complex numbers x[i] + i x[i + HD/2] by position * inv_freq[i] (RoFormer's form)."""
    rng = np.random.default_rng(HD + position)
    inv_freq = ops.rope_inv_freq(HD, 10000.0)  # [HD/2]
    cos, sin = ops.rope_tables([position], inv_freq, np.float64)  # [1, HD] x2
    x = rng.standard_normal((5, HD))  # [N, HD]: 5 heads at this position
    by_matrix = x @ ops.rope_matrix(cos[0], sin[0])  # [N, HD]
    by_rope = ops.rope(x[None], cos, sin)[0]  # [N, HD]
    z = (x[:, : HD // 2] + 1j * x[:, HD // 2 :]) * np.exp(1j * position * inv_freq)  # [N, HD/2]
    by_complex = np.concatenate([z.real, z.imag], axis=-1)  # [N, HD]
    np.testing.assert_allclose(by_matrix, by_complex, rtol=0, atol=1e-13)
    np.testing.assert_allclose(by_rope, by_complex, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-6), (np.float64, 1e-15)])
def test_rms_norm_rows_is_rms_norm_and_each_row_its_own(dtype, tol):
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((5, 576)).astype(dtype) * 3, rng.standard_normal(576).astype(dtype)  # [B, D], [D]
    out = np.empty_like(x)
    got = ops.rms_norm_rows(x, w, 1e-5, out=out)  # [B, D]
    assert got is out and got.dtype == dtype
    np.testing.assert_allclose(got, ops.rms_norm(x, w, 1e-5), rtol=tol, atol=tol)
    for r in range(5):  # a row alone is the same bits as in the batch (decode_batch's invariance rests on it)
        alone = ops.rms_norm_rows(x[r : r + 1].copy(), w, 1e-5, out=np.empty((1, 576), dtype))
        np.testing.assert_array_equal(alone[0], got[r])


def test_float32_erf_is_within_4_2e_7_of_the_exact_erf():
    import scipy.special

    x = np.concatenate([np.linspace(-6, 6, 200_001), [-np.inf, -40.0, 0.0, 40.0, np.inf]]).astype(np.float32)
    exact = scipy.special.erf(x.astype(np.float64))
    assert np.abs(ops.erf(x).astype(np.float64) - exact).max() <= 4.2e-7  # 7 float32 ulps of 1; the docs say so
    assert ops.erf(np.float64(0.5)) == scipy.special.erf(0.5)  # float64: scipy's own


@pytest.mark.parametrize("shape, order", [((7,), "C"), ((320, 1536), "C"), ((100, 1536), "F"), ((2, 3, 70_000), "C")],
                         ids=["small", "bert-b32", "column-major", "3-d"])
@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-6), (np.float64, 1e-15)])
def test_gelu_by_blocks_is_the_exact_gelu(shape, order, dtype, tol):
    """gelu = 0.5 x (1 + erf(x / sqrt 2)) with scipy's float64 erf; computed by blocks of
    BLOCK_ELEMENTS when large, it is the unblocked computation bit for bit, in x's order."""
    import scipy.special

    x = np.asarray(np.random.default_rng(3).standard_normal(shape) * 3, dtype=dtype, order=order)
    y = ops.gelu(x)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(y, 0.5 * x64 * (1 + scipy.special.erf(x64 / np.sqrt(2))), rtol=0, atol=tol * 4)
    assert y.dtype == dtype and y.shape == shape and y.flags.f_contiguous == x.flags.f_contiguous
    np.testing.assert_array_equal(y, ops._gelu(x))
    if x.size > ops.BLOCK_ELEMENTS:  # a strided view is computed whole, the same
        np.testing.assert_array_equal(ops.gelu(x[..., ::2]), ops._gelu(x[..., ::2]))


@pytest.mark.parametrize("B, T, NH, HD", [(1, 5, 2, 4), (4, 9, 3, 8), (32, 14, 12, 32)])
def test_masked_attention_is_each_querys_softmax_over_the_real_keys(B, T, NH, HD):
    """Against the definition, one (sentence, head, query) at a time in float64: a
    softmax over the keys the mask keeps, then the weighted sum of their values."""
    rng = np.random.default_rng(B * T)
    q, k, v = (rng.standard_normal((B, NH, T, HD)) for _ in range(3))  # [B, NH, T, HD] x3
    lengths = rng.integers(1, T + 1, size=B)
    lengths[0] = T  # one sentence without padding
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)  # [B, T]
    got = ops.masked_attention(q, k, v, mask)  # [B, NH, T, HD]
    for b in range(B):
        n = lengths[b]
        for h in range(NH):
            for t in range(T):
                s = k[b, h, :n] @ q[b, h, t] / np.sqrt(HD)  # [n]
                w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
                np.testing.assert_allclose(got[b, h, t], w @ v[b, h, :n], rtol=0, atol=1e-13)
