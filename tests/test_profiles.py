"""Sampling profiles (refllm.profiles): each against its documented algorithm on
hand-worked cases, hf against transformers' own LogitsProcessors on random logits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from refllm import profiles, sampling
from refllm.profiles import (PROFILES, hf_draw, hf_greedy, hf_repetition_penalty, hf_softmax, hf_top_k, hf_top_p,
                             lcpp_dist, lcpp_min_p, lcpp_penalties, lcpp_temperature, lcpp_top_k, lcpp_top_p,
                             sample_token_hf, sample_token_llama_cpp, sample_token_spin)
from refllm.types import InferencingParams, InferencingResult, InferencingUsage

ALL = 2**32 - 1


def P(**kw) -> InferencingParams:
    base = dict(max_tokens=1, repeat_penalty=1.0, repeat_penalty_last_n_token_count=64, temperature=1.0, top_k=ALL,
                top_p=1.0)
    base.update(kw)
    return InferencingParams(**base)


def logits_of(probs) -> np.ndarray:  # probabilities -> float32 logits whose softmax they are
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def test_profiles_table():
    assert set(PROFILES) == {"spec", "spin", "hf", "llama.cpp"}
    assert PROFILES["spec"] is sampling.sample_token
    rng = np.random.default_rng(0)
    z = rng.normal(size=64).astype(np.float32)
    for name, fn in PROFILES.items():
        for params, u in ((P(temperature=0.0), None), (P(temperature=0.9, top_k=10, top_p=0.8), 0.3)):
            t = fn(z, [1, 2, 3], params, u)
            assert 0 <= t < 64 and t == fn(z, [1, 2, 3], params, u), name


# ----------------------------------------------------------------------------- spin

def test_spin_samples_as_spec():
    rng = np.random.default_rng(1)
    for _ in range(50):
        z = rng.normal(scale=3, size=40).astype(np.float32)
        ids = rng.integers(0, 40, size=12).tolist()
        params = P(temperature=float(rng.uniform(0.2, 2)), top_k=int(rng.integers(1, 50)),
                   top_p=float(rng.uniform(0.1, 1)), repeat_penalty=float(rng.uniform(0.8, 1.5)),
                   repeat_penalty_last_n_token_count=int(rng.integers(0, 16)))
        u = float(rng.random())
        assert sample_token_spin(z, ids, params, u) == sampling.sample_token(z, ids, params, u)


def test_spin_result_helpers():
    r = InferencingResult(" Paris.", InferencingUsage(5, 3), seed=7, finish_reason="eos")
    s = profiles.spin_infer_result(r, "The capital of France is")
    assert s.text == "The capital of France is Paris."
    assert s.usage == InferencingUsage(prompt_token_count=8, generated_token_count=3)
    assert (s.seed, s.finish_reason) == (7, "eos")
    assert profiles.spin_embeddings_usage([6, 22, 2]) == 22  # the padded batch length, not 30


# ----------------------------------------------------------------------------- hf, hand-worked

def test_hf_penalty_covers_the_whole_sequence():
    z = np.array([2.0, -1.0, 0.5, 3.0], dtype=np.float32)
    ids = [0, 1, 0]  # last_n is ignored: both 0 and 1 are penalised, 0 once
    out = hf_repetition_penalty(z, ids, 2.0)
    np.testing.assert_array_equal(out, np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32))
    spec = sampling.apply_repeat_penalty(z, ids, 2.0, 1)  # SPEC 3 with last-n 1: only id 0
    np.testing.assert_array_equal(spec, np.array([1.0, -1.0, 0.5, 3.0], dtype=np.float32))
    assert z[0] == 2.0  # the input is not modified


def test_hf_greedy_ties_go_to_the_lowest_id():
    z = np.array([1.0, 3.0, 3.0], dtype=np.float32)
    assert hf_greedy(z) == 1
    assert sample_token_hf(z, [], P(temperature=0.0), None) == 1
    assert sampling.sample_token(z, [], P(temperature=0.0), None) == 2  # SPEC 3: the highest


def test_hf_top_k_keeps_ties_at_the_kth_score():
    x = hf_top_k(np.array([1.0, 2.0, 2.0, 0.0]), 1)
    assert np.isfinite(x).tolist() == [False, True, True, False]  # k = 1, two survive
    x = hf_top_k(np.array([1.0, 2.0, 3.0, 0.0]), 2)
    assert np.isfinite(x).tolist() == [False, True, True, False]


def test_hf_top_p_removes_the_low_tail_of_the_renormalised_mass():
    # probabilities 0.5, 0.3, 0.2: ascending cumulative mass 0.2, 0.5, 1.0
    x = hf_top_p(np.log([0.5, 0.3, 0.2]), 0.6)  # remove where cum <= 0.4: only the 0.2
    assert np.isfinite(x).tolist() == [True, True, False]
    x = hf_top_p(np.log([0.5, 0.3, 0.2]), 0.5)  # remove where cum <= 0.5: the 0.2 and the 0.3
    assert np.isfinite(x).tolist() == [True, False, False]
    x = hf_top_p(np.log([0.5, 0.3, 0.2]), 0.0, min_tokens_to_keep=2)  # removes all but min_keep
    assert np.isfinite(x).tolist() == [True, True, False]


def test_hf_and_spec_differ_on_top_p_after_top_k():
    """top-k 2 then top-p 0.6 over p = (0.5, 0.3, 0.2): SPEC 3 measures top-p against the
    whole mass (kept 0.5 + 0.3 = 0.8; the walk keeps both), hf against the renormalised
    mass (0.625, 0.375: the 0.375 falls below 1 - 0.6 and is removed)."""
    z = logits_of([0.5, 0.3, 0.2])
    params = P(top_k=2, top_p=0.6)
    assert sampling.sample_token(z, [], params, 0.9) == 1  # u*W = 0.72 > 0.5
    assert sample_token_hf(z, [], params, 0.9) == 0  # only id 0 is left
    probs = hf_softmax(hf_top_p(hf_top_k(z.astype(np.float64), 2), 0.6))
    np.testing.assert_allclose(probs, [1.0, 0.0, 0.0])


def test_hf_draw_walks_by_descending_probability():
    p = np.array([0.2, 0.5, 0.3])
    assert [hf_draw(p, u) for u in (0.0, 0.49, 0.5, 0.79, 0.8, 0.999)] == [1, 1, 2, 2, 0, 0]
    with pytest.raises(ValueError):
        hf_draw(p, 1.0)


# ----------------------------------------------------------------------------- hf vs transformers

def _transformers_probs(z32, ids, params):
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    scores = torch.tensor(z32[None, :], dtype=torch.float32)  # [1, V] float32, as a model's
    input_ids = torch.tensor([ids], dtype=torch.long)  # [1, n]
    if params.repeat_penalty != 1.0:
        scores = lp.RepetitionPenaltyLogitsProcessor(params.repeat_penalty)(input_ids, scores)
    scores = scores.double()
    if params.temperature <= 0:
        return None, int(torch.argmax(scores[0]))
    warpers = []
    if params.temperature != 1.0:
        warpers.append(lp.TemperatureLogitsWarper(params.temperature))
    if params.top_k < scores.shape[-1]:
        warpers.append(lp.TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(lp.TopPLogitsWarper(params.top_p))
    for w in warpers:
        scores = w(input_ids, scores)
    return torch.softmax(scores[0], dim=-1).numpy(), None


def _ours(z32, ids, params):
    z = hf_repetition_penalty(z32, ids, params.repeat_penalty)
    x = z.astype(np.float64)
    if params.temperature != 1.0:
        x = profiles.hf_temperature(x, params.temperature)
    if params.top_k < len(x):
        x = hf_top_k(x, params.top_k)
    if params.top_p < 1.0:
        x = hf_top_p(x, params.top_p)
    return hf_softmax(x)


def test_hf_matches_transformers_logits_processors():
    rng = np.random.default_rng(7)
    V = 50
    for trial in range(60):
        z = (rng.normal(scale=2.5, size=V)).astype(np.float32)
        ids = rng.integers(0, V, size=int(rng.integers(1, 30))).tolist()
        params = P(repeat_penalty=float(rng.choice([1.0, rng.uniform(0.7, 1.6)])),
                   temperature=float(rng.choice([0.0, 1.0, rng.uniform(0.3, 2.0)])),
                   top_k=int(rng.choice([ALL, rng.integers(1, 60)])),
                   top_p=float(rng.choice([1.0, rng.uniform(0.05, 0.99)])))
        want, want_greedy = _transformers_probs(z, ids, params)
        if want is None:  # do_sample=False
            assert sample_token_hf(z, ids, params, None) == want_greedy
            continue
        got = _ours(z, ids, params)
        np.testing.assert_array_equal(got > 0, want > 0, err_msg=f"trial {trial}: kept sets differ")
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15, err_msg=f"trial {trial}")
        for u in rng.random(5):  # then the draw: the same u picks the same token from either distribution
            assert sample_token_hf(z, ids, params, float(u)) == hf_draw(want, float(u))


# ----------------------------------------------------------------------------- llama.cpp, hand-worked

def test_lcpp_penalties_window_counts_and_zero():
    z = np.array([2.0, -1.0, 0.0, 3.0], dtype=np.float32)
    ids = [1, 0, 3, 0]  # last 3: 0, 3, 0 -> counts {0: 2, 3: 1}; id 1 is outside the window
    out = lcpp_penalties(z, ids, 3, 2.0)
    np.testing.assert_array_equal(out, np.array([1.0, -1.0, 0.0, 1.5], dtype=np.float32))
    out = lcpp_penalties(z, ids, 3, 2.0, freq=0.5, present=0.25)  # z -= count*freq + present
    np.testing.assert_allclose(out, [1.0 - 1.0 - 0.25, -1.0, 0.0, 1.5 - 0.5 - 0.25])
    out = lcpp_penalties(np.array([0.0, 1.0], dtype=np.float32), [0], 1, 2.0)  # z <= 0: multiplied
    assert out[0] == 0.0
    np.testing.assert_array_equal(lcpp_penalties(z, ids, 0, 2.0), z)  # last_n 0: off


def test_lcpp_top_k_sorts_and_cuts_on_logits():
    ids, z = lcpp_top_k(np.arange(5), np.array([0.1, 3.0, 2.0, 3.0, -1.0]), 3)
    assert ids.tolist() == [1, 3, 2] and z.tolist() == [3.0, 3.0, 2.0]  # ties: lower id first
    ids, z = lcpp_top_k(np.arange(3), np.array([0.5, 0.2, 0.9]), 0)  # k <= 0: unchanged
    assert ids.tolist() == [0, 1, 2]


def test_lcpp_top_p_includes_the_crossing_token_of_the_renormalised_mass():
    ids, z = lcpp_top_p(np.arange(3), np.log([0.5, 0.3, 0.2]), 0.5)  # cum 0.5 >= 0.5 at the first
    assert ids.tolist() == [0]
    ids, z = lcpp_top_p(np.arange(3), np.log([0.5, 0.3, 0.2]), 0.55)  # cum 0.8 >= 0.55 at the second
    assert ids.tolist() == [0, 1]
    # after top-k 2 the mass is renormalised: 0.625 >= 0.6 already
    ids, z = lcpp_top_p(*lcpp_top_k(np.arange(3), np.log([0.5, 0.3, 0.2]), 2), 0.6)
    assert ids.tolist() == [0]


def test_lcpp_min_p_is_relative_to_the_best_logit():
    ids, z = lcpp_min_p(np.arange(3), np.array([2.0, 1.0, 0.0]), 0.3)  # keep z >= 2 + ln 0.3 = 0.796
    assert ids.tolist() == [0, 1]
    ids, z = lcpp_min_p(np.arange(3), np.array([2.0, 1.0, 0.0]), 0.0)
    assert ids.tolist() == [0, 1, 2]


def test_lcpp_temperature_comes_last():
    """min-p 0.3 on logits (2, 1, 0) removes id 2 before the temperature; had the
    temperature 3 come first, (0.67, 0.33, 0) would all pass min-p."""
    z = np.array([2.0, 1.0, 0.0], dtype=np.float32)
    params = P(temperature=3.0)
    assert sample_token_llama_cpp(z, [], params, 0.999, min_p=0.3) == 1  # id 2 is gone
    assert sampling.sample_token(z, [], params, 0.999) == 2  # SPEC 3 has no min-p
    ids, zt = lcpp_min_p(*lcpp_temperature(np.arange(3), z, 3.0), 0.3)  # the other order
    assert ids.tolist() == [0, 1, 2]


def test_lcpp_greedy_and_temperature_zero():
    z = np.array([1.0, 3.0, 3.0, 2.0], dtype=np.float32)
    ids, zt = lcpp_temperature(np.arange(4), z, 0.0)
    assert np.isfinite(zt).tolist() == [False, True, False, False]  # the first maximum only
    assert sample_token_llama_cpp(z, [], P(temperature=0.0), None) == 1
    assert sample_token_llama_cpp(z, [], P(temperature=0.0), 0.999) == 1


def test_lcpp_dist_uses_greater_or_equal():
    assert lcpp_dist(np.array([7, 9]), np.log([0.5, 0.5]), 0.5) == 7  # cum 0.5 >= 0.5
    assert sampling.draw(np.array([7, 9]), np.array([0.5, 0.5]), 0.5) == 9  # SPEC 3: cum > u*W


def test_lcpp_top_p_after_top_k_differs_from_spec():
    z = logits_of([0.5, 0.3, 0.2])
    params = P(top_k=2, top_p=0.6, temperature=1.0)
    assert sample_token_llama_cpp(z, [], params, 0.9, min_p=0.0) == 0
    assert sampling.sample_token(z, [], params, 0.9) == 1


# ----------------------------------------------------------------------------- properties

def test_greedy_agrees_across_profiles_when_the_window_covers_everything():
    rng = np.random.default_rng(3)
    for _ in range(100):
        z = rng.normal(scale=3, size=30).astype(np.float32)
        ids = rng.integers(0, 30, size=10).tolist()
        params = P(temperature=0.0, repeat_penalty=float(rng.uniform(1.0, 2.0)), repeat_penalty_last_n_token_count=64)
        want = sampling.sample_token(z, ids, params, None)
        assert sample_token_hf(z, ids, params, None) == want
        assert sample_token_llama_cpp(z, ids, params, None) == want


def test_every_profile_picks_a_token_within_top_k():
    rng = np.random.default_rng(5)
    for _ in range(200):
        z = rng.normal(scale=2, size=20).astype(np.float32)
        params = P(temperature=float(rng.uniform(0.3, 2)), top_k=int(rng.integers(1, 25)),
                   top_p=float(rng.uniform(0.05, 1.0)))
        u = float(rng.random())
        allowed = np.argsort(-z, kind="stable")[: params.top_k].tolist()  # no ties in random floats
        for name, fn in PROFILES.items():
            assert fn(z, [], params, u) in allowed, name


def test_bad_inputs_are_refused():
    z = np.zeros(4, dtype=np.float32)
    with pytest.raises(ValueError):
        sample_token_hf(z, [], P(temperature=1.0), None)  # the sampling path needs u
    with pytest.raises(ValueError):
        sample_token_llama_cpp(np.array([math.nan, 0.0]), [], P(), 0.5)
    with pytest.raises(ValueError):
        hf_repetition_penalty(z, [9], 1.1)  # id outside the vocabulary
    with pytest.raises(TypeError):
        sample_token_spin(z, [], P(), 0.5, min_p=0.1)


# ----------------------------------------------------------------------------- distributions

@pytest.mark.parametrize("profile", ["spec", "hf", "llama.cpp"])
def test_distribution_is_the_measure_of_u_that_picks_each_token(profile):
    """`distribution` must be what the profile's own sampler draws: the fraction of a fine,
    even grid of u in [0, 1) that picks each token (exact up to the grid's spacing)."""
    z = np.random.default_rng(3).normal(size=40).astype(np.float32)
    ids = [1, 5, 5, 7]
    params = InferencingParams(temperature=1.2, top_k=12, top_p=0.8, repeat_penalty=1.3,
                               repeat_penalty_last_n_token_count=3)
    extras = {"min_p": 0.02} if profile == "llama.cpp" else {}
    p = profiles.distribution(profile, z, ids, params, **extras)
    grid = (np.arange(4000) + 0.5) / 4000
    picks = np.bincount([PROFILES[profile](z, ids, params, float(u), **extras) for u in grid], minlength=40)
    np.testing.assert_allclose(p, picks / len(grid), atol=1 / len(grid))
    assert abs(p.sum() - 1) < 1e-12 and (p > 0).sum() > 2


def test_distributions_of_the_orders_differ():
    """The same logits and params give other distributions under other orders (the
    statistical check's power rests on this)."""
    z = np.random.default_rng(4).normal(size=40).astype(np.float32)
    params = InferencingParams(temperature=1.5, top_k=8, top_p=0.6, repeat_penalty=1.0)
    spec = profiles.distribution("spec", z, [], params)
    lcpp = profiles.distribution("llama.cpp", z, [], params, min_p=0.0)
    hf = profiles.distribution("hf", z, [], params)
    # spec: top-p on the whole mass at T keeps 8; llama.cpp and hf renormalise (and llama.cpp
    # filters before T), each keeping 4
    assert ((spec > 0).sum(), (lcpp > 0).sum(), (hf > 0).sum()) == (8, 4, 4)
    assert np.abs(spec - lcpp).max() > 0.1 and np.abs(spec - hf).max() > 0.1
    with pytest.raises(ValueError):
        profiles.distribution("spec", z, [], InferencingParams(temperature=0.0))
