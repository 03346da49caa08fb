"""refllm.logprobs against independent computations: torch's log_softmax, SPEC 3's float32
penalty, and the draw itself (u at an interval's ends)."""

import numpy as np
import pytest
import torch

from refllm import logprobs, sampling
from refllm.types import InferencingParams


def test_log_softmax_matches_torch():
    z = np.random.default_rng(0).normal(size=500).astype(np.float32) * 8
    want = torch.log_softmax(torch.tensor(z, dtype=torch.float64), dim=0).numpy()
    np.testing.assert_allclose(logprobs.log_softmax(z), want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(logprobs.log_softmax_at(z, [3, 7]), want[[3, 7]], rtol=0, atol=1e-12)


def test_penalize_is_spec3_step1_in_float64():
    z = np.array([2.0, -2.0, 1.0, 0.5, -0.25], dtype=np.float32)
    ids = [0, 1, 1, 3, 4]
    assert logprobs.penalty_window(ids, 1.5, 3).tolist() == [1, 3, 4]  # last 3 ids, distinct
    got = logprobs.penalize(z, ids, 1.5, 3)
    assert got.tolist() == [2.0, -3.0, 1.0, 0.5 / 1.5, -0.375]
    np.testing.assert_allclose(got, sampling.apply_repeat_penalty(z, ids, 1.5, 3), rtol=1e-7)
    assert logprobs.penalize_one(-2.0, 1, ids, 1.5, 3) == -3.0
    assert logprobs.penalize_one(2.0, 0, ids, 1.5, 3) == 2.0  # outside the window
    assert logprobs.penalize(z, ids, 1.0, 3).tolist() == z.tolist()


def test_top_n_orders_ties_lower_id_first():
    assert logprobs.top_n([1.0, 3.0, 3.0, 2.0], 3) == [(1, 3.0), (2, 3.0), (3, 2.0)]


@pytest.mark.parametrize("params", [InferencingParams(temperature=0.8, top_k=5, top_p=0.7, repeat_penalty=1.3),
                                    InferencingParams(temperature=1.0, top_k=50, top_p=1.0, repeat_penalty=1.0)])
def test_u_interval_is_where_the_draw_picks_the_token(params):
    z = np.random.default_rng(1).normal(size=64).astype(np.float32) * 3
    ids = [1, 2, 3]
    kept, _ = logprobs.kept_candidates(z, ids, params)
    for token in kept[:4]:
        lo, hi = logprobs.u_interval(z, ids, params, int(token))
        assert lo < hi
        assert sampling.sample_token(z, ids, params, lo) == token
        assert sampling.sample_token(z, ids, params, np.nextafter(hi, 0)) == token
        if hi < 1:
            assert sampling.sample_token(z, ids, params, hi) != token
    not_kept = next(i for i in range(64) if i not in set(kept.tolist()))
    assert logprobs.u_interval(z, ids, params, not_kept) == (0.0, 0.0)
