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
def test_rms_norm_row_is_rms_norm_of_one_row(dtype, tol):
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal(576).astype(dtype) * 3, rng.standard_normal(576).astype(dtype)  # [D] x2
    out = np.empty_like(x)
    got = ops.rms_norm_row(x, w, 1e-5, out=out)  # [D]
    assert got is out and got.dtype == dtype
    np.testing.assert_allclose(got, ops.rms_norm(x[None], w, 1e-5)[0], rtol=tol, atol=tol)
