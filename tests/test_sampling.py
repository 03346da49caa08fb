"""refllm.sampling against SPEC.md section 3.

Each step is checked on cases worked by hand (the arithmetic is in the comments; the
probabilities are chosen dyadic, sums of powers of two, so every sum is exact and a
boundary can be hit on the nose). Then the whole pipeline is compared, with
hypothesis, to `reference_sample_token`: SPEC 3's pseudo-code written out as the
literal loop it is, over plain Python lists.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refllm.sampling import (
    Sampler,
    apply_repeat_penalty,
    draw,
    greedy,
    make_rng,
    needs_draw,
    sample_token,
    softmax_with_temperature,
    top_k_candidates,
    top_p_filter,
)
from refllm.types import InferencingParams

f32 = np.float32
FLT32_MAX = f32(np.finfo(np.float32).max)


def params(**kw) -> InferencingParams:
    """Params with the penalty off unless a test turns it on."""
    base = dict(repeat_penalty=1.0, repeat_penalty_last_n_token_count=64, temperature=1.0, top_k=40, top_p=1.0)
    base.update(kw)
    return InferencingParams(**base)


def below(x: float) -> float:
    """The largest double below x."""
    return float(np.nextafter(x, -np.inf))


# --------------------------------------------------------------------------- the reference


def reference_sample_token(logits, ids, p: InferencingParams, u):
    """SPEC 3 (version 2), line by line, as loops over Python lists (no vectorisation to trust).

    Step 3 is a formula rather than a walk, so it is written with the same NumPy
    expression as SPEC's (a sum in another order could move p by an ulp and make the
    comparison flaky at boundaries for a reason that is not a bug). Every other sum
    is an explicit left-to-right loop: not Python's `sum()`, which since 3.12 is
    compensated and so not the sequential sum SPEC's walk performs.
    """
    z = [f32(v) for v in logits]  # float32, as step 1 prescribes
    V = len(z)
    with np.errstate(over="ignore"):
        rp, last_n = f32(p.repeat_penalty), p.repeat_penalty_last_n_token_count
    # 1. repeat penalty
    if p.repeat_penalty != 1.0 and last_n > 0:
        window = list(ids)[-last_n:]
        with np.errstate(over="ignore"):
            for t in set(window):
                z[t] = z[t] / rp if z[t] >= 0 else z[t] * rp
        z = [min(max(v, -FLT32_MAX), FLT32_MAX) for v in z]  # clip: an overflow is the largest finite value
    # 2. greedy: argmax, ties -> the highest id
    if p.temperature <= 0:
        best = 0
        for i in range(V):
            if z[i] >= z[best]:
                best = i
        return best
    # 3. temperature, float64
    z64 = np.array(z, dtype=np.float64)
    with np.errstate(over="ignore"):
        x = (z64 - np.max(z64)) / np.float64(p.temperature)  # shift, then divide
    e = np.exp(x)
    prob = [float(q) for q in e / np.sum(e)]
    # 4. top-k: descending p, ties lower id first
    candidates = sorted(range(V), key=lambda i: (-prob[i], i))
    if p.top_k < V:
        candidates = candidates[: p.top_k]
    # 5. top-p against the whole softmax mass
    s = 0.0
    for i in candidates:
        s += prob[i]
    if 0 < p.top_p < s:
        kept, c = [], 0.0
        for i in candidates:
            if c >= p.top_p:
                continue  # drop
            c += prob[i]
            kept.append(i)
        candidates = kept
    # 6. draw
    W = 0.0
    for i in candidates:
        W += prob[i]
    c = 0.0
    for i in candidates:
        c += prob[i]
        if c > u * W:
            return i
    raise AssertionError("no candidate drawn")  # cannot happen for u < 1 and normal W


# --------------------------------------------------------------------------- 1. repeat penalty


def test_penalty_hand_worked_repeats_and_prompt():
    z = np.array([2.0, -1.0, 0.5, 3.0, 0.0], dtype=np.float32)
    ids = [4, 0, 1, 0, 0, 1]  # prompt [4, 0, 1], then generated [0, 0, 1]
    out = apply_repeat_penalty(z, ids, 2.0, 64)
    # window = all six ids, distinct {0, 1, 4}, each penalised ONCE:
    #   z0 =  2.0 / 2 =  1.0  (not 2 / 2 / 2 / 2 = 0.25 for its three occurrences)
    #   z1 = -1.0 * 2 = -2.0  (negative: multiplied, pushed further from zero)
    #   z4 =  0.0 / 2 =  0.0  (zero takes the >= 0 branch)
    #   z2, z3 are not in the window
    np.testing.assert_array_equal(out, [1.0, -2.0, 0.5, 3.0, 0.0])
    assert out.dtype == np.float32


def test_penalty_window_is_the_last_n_ids():
    z = np.array([2.0, -1.0, 0.5, 3.0, 0.0], dtype=np.float32)
    ids = [4, 0, 1, 0, 0, 1]
    # last_n = 2: window [0, 1] -> z0 = 1, z1 = -2; the prompt's 4 is out of it
    np.testing.assert_array_equal(apply_repeat_penalty(z, ids, 2.0, 2), [1.0, -2.0, 0.5, 3.0, 0.0])
    # last_n = 1: window [1] -> only z1
    np.testing.assert_array_equal(apply_repeat_penalty(z, ids, 2.0, 1), [2.0, -2.0, 0.5, 3.0, 0.0])
    # last_n = 5: window [0, 1, 0, 0, 1], still without the 4
    np.testing.assert_array_equal(apply_repeat_penalty(z, ids, 2.0, 5), [1.0, -2.0, 0.5, 3.0, 0.0])


def test_penalty_last_n_larger_than_ids():
    z = np.array([1.0, 1.0, 1.0, 3.0], dtype=np.float32)
    # ids[-100:] is just [3]: 3.0 / 2 = 1.5
    np.testing.assert_array_equal(apply_repeat_penalty(z, [3], 2.0, 100), [1.0, 1.0, 1.0, 1.5])


def test_penalty_last_n_zero_is_a_no_op():
    # the trap: ids[-0:] is ALL of ids in Python; last_n = 0 must penalise nothing
    z = np.array([2.0, -1.0, 4.0], dtype=np.float32)
    np.testing.assert_array_equal(apply_repeat_penalty(z, [0, 1, 2], 2.0, 0), z)


def test_penalty_one_is_a_no_op_and_still_a_copy():
    z = np.array([2.0, -1.0, 4.0], dtype=np.float32)
    out = apply_repeat_penalty(z, [0, 1, 2], 1.0, 64)
    np.testing.assert_array_equal(out, z)
    assert out is not z
    out[0] = 99.0
    assert z[0] == 2.0


def test_penalty_below_one_follows_the_same_formula():
    z = np.array([2.0, -1.0, -4.0, 0.0], dtype=np.float32)
    out = apply_repeat_penalty(z, [0, 1, 3], 0.5, 64)
    #  z0 =  2.0 / 0.5 =  4.0  (positive grows)
    #  z1 = -1.0 * 0.5 = -0.5  (negative moves TOWARDS zero: also more likely)
    #  z3 =  0.0 / 0.5 =  0.0
    #  z2 untouched
    np.testing.assert_array_equal(out, [4.0, -0.5, -4.0, 0.0])


def test_penalty_above_one_always_makes_a_token_less_likely():
    z = np.array([3.0, -3.0, 0.5, -0.5], dtype=np.float32)
    out = apply_repeat_penalty(z, [0, 1, 2, 3], 1.5, 64)
    assert np.all(out <= z)  # positive: divided down; negative: multiplied down
    expected = [f32(3.0) / f32(1.5), f32(-3.0) * f32(1.5), f32(0.5) / f32(1.5), f32(-0.5) * f32(1.5)]
    np.testing.assert_array_equal(out, expected)


def test_penalty_is_float32_arithmetic():
    z = np.array([1.0, 0.0], dtype=np.float32)
    out = apply_repeat_penalty(z, [0], 1.1, 64)
    # float32(1) / float32(1.1) = 0.9090909 in float32, while the float64 quotient
    # 1 / 1.1 rounded to float32 is 0.90909094: one float32 ulp apart.
    assert out[0] == f32(1.0) / f32(1.1)
    assert out[0] != f32(1.0 / 1.1)


def test_penalty_does_not_mutate_and_converts_dtype():
    z64 = np.array([2.0, -1.0, 4.0], dtype=np.float64)
    before = z64.copy()
    out = apply_repeat_penalty(z64, [0, 1], 2.0, 64)
    np.testing.assert_array_equal(z64, before)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [1.0, -2.0, 4.0])


@pytest.mark.parametrize("ids", [[0, 3], [-1], [1, 2, 7]])
def test_penalty_rejects_ids_outside_the_vocabulary(ids):
    with pytest.raises(ValueError):
        apply_repeat_penalty(np.zeros(3, np.float32), ids, 1.1, 64)


@pytest.mark.parametrize("penalty", [0.0, -1.0, float("nan"), float("inf")])
def test_penalty_rejects_non_positive_or_non_finite(penalty):
    with pytest.raises(ValueError):
        apply_repeat_penalty(np.zeros(3, np.float32), [0], penalty, 64)


def test_penalty_with_no_ids():
    z = np.array([1.0, -1.0], dtype=np.float32)
    np.testing.assert_array_equal(apply_repeat_penalty(z, [], 2.0, 64), z)
    np.testing.assert_array_equal(apply_repeat_penalty(z, np.array([], dtype=np.int64), 2.0, 64), z)


# --------------------------------------------------------------------------- 2. greedy


def test_greedy_ties_go_to_the_highest_id():
    assert greedy(np.array([1.0, 3.0, 3.0, 2.0], np.float32)) == 2  # np.argmax would say 1
    assert greedy(np.array([5.0, 5.0, 5.0], np.float32)) == 2
    assert greedy(np.array([-np.inf, -7.0, -np.inf], np.float32)) == 1
    assert greedy(np.array([0.25], np.float32)) == 0
    assert isinstance(greedy(np.array([0.0, 1.0])), int)


def test_greedy_applies_the_penalty_first():
    z = np.array([0.0, 2.0, 1.9], dtype=np.float32)
    # no penalty: argmax is id 1
    assert sample_token(z, [1], params(temperature=0.0), None) == 1
    # penalty 1.1 on id 1: 2.0 / 1.1 = 1.818 < 1.9, so id 2 wins
    assert sample_token(z, [1], params(temperature=0.0, repeat_penalty=1.1), None) == 2


def test_greedy_penalty_creates_a_tie_and_the_highest_id_wins():
    z = np.array([2.0, 4.0], dtype=np.float32)
    # id 1: 4.0 / 2 = 2.0 == z0, a tie -> the highest id, 1
    assert sample_token(z, [1], params(temperature=0.0, repeat_penalty=2.0), None) == 1
    # the same logits with the penalty on id 0 instead: 2.0 / 2 = 1.0, id 1 anyway
    assert sample_token(z, [0], params(temperature=0.0, repeat_penalty=2.0), None) == 1


@pytest.mark.parametrize("temperature", [0.0, -1.0, -0.0])
def test_greedy_path_ignores_u(temperature):
    z = np.array([0.1, 0.7, 0.2], dtype=np.float32)
    p = params(temperature=temperature, top_k=1, top_p=0.5)
    assert not needs_draw(p)
    assert sample_token(z, [], p, None) == 1
    assert sample_token(z, [], p, 0.999) == 1


# --------------------------------------------------------------------------- 3. temperature


def test_softmax_hand_worked():
    p = softmax_with_temperature(np.array([0.0, 1.0, 2.0], np.float32), 1.0)
    d = 1 + math.e + math.e**2  # e^0 + e^1 + e^2
    np.testing.assert_allclose(p, [1 / d, math.e / d, math.e**2 / d], rtol=1e-15)
    assert p.dtype == np.float64


def test_softmax_temperature_divides_the_logits():
    # [0, 2] / 2 = [0, 1]: p = [1 / (1 + e), e / (1 + e)]
    p = softmax_with_temperature(np.array([0.0, 2.0], np.float32), 2.0)
    np.testing.assert_allclose(p, [1 / (1 + math.e), math.e / (1 + math.e)], rtol=1e-15)
    # a low temperature sharpens: [0, 2] / 0.1 = [0, 20]
    p = softmax_with_temperature(np.array([0.0, 2.0], np.float32), 0.1)
    np.testing.assert_allclose(p, [1 / (1 + math.exp(20)), 1 / (1 + math.exp(-20))], rtol=1e-14)


def test_softmax_is_shift_invariant_and_does_not_overflow():
    z = np.array([1000.0, 999.0, -np.inf], np.float32)
    p = softmax_with_temperature(z, 1.0)
    np.testing.assert_allclose(p, [1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1)), 0.0], rtol=1e-15)
    assert p[2] == 0.0


@pytest.mark.parametrize("temperature", [0.0, -0.5])
def test_softmax_rejects_non_positive_temperature(temperature):
    with pytest.raises(ValueError):
        softmax_with_temperature(np.zeros(3, np.float32), temperature)


# --------------------------------------------------------------------------- 4. top-k

P5 = np.array([0.1, 0.3, 0.2, 0.3, 0.1])  # descending, stable: ids 1, 3 (tie), 2, 0, 4 (tie)


def test_top_k_stable_order_ties_lower_id_first():
    ids, probs = top_k_candidates(P5, 2)
    np.testing.assert_array_equal(ids, [1, 3])  # 0.3 at ids 1 and 3: lower first
    np.testing.assert_array_equal(probs, [0.3, 0.3])  # NOT renormalised to [0.5, 0.5]


def test_top_k_tie_at_the_cut_keeps_the_lower_id():
    # top_k = 4 = V - 1: the cut falls between the two 0.1s; id 0 stays, id 4 goes
    ids, probs = top_k_candidates(P5, 4)
    np.testing.assert_array_equal(ids, [1, 3, 2, 0])
    np.testing.assert_array_equal(probs, [0.3, 0.3, 0.2, 0.1])


@pytest.mark.parametrize("top_k", [5, 6, 1000])
def test_top_k_at_or_above_V_keeps_everything(top_k):
    ids, probs = top_k_candidates(P5, top_k)
    np.testing.assert_array_equal(ids, [1, 3, 2, 0, 4])
    np.testing.assert_array_equal(probs, [0.3, 0.3, 0.2, 0.1, 0.1])


def test_top_k_all_equal_is_identity_order():
    ids, _ = top_k_candidates(np.full(7, 1 / 7), 100)
    np.testing.assert_array_equal(ids, np.arange(7))


def test_top_k_rejects_zero():
    with pytest.raises(ValueError):
        top_k_candidates(P5, 0)


# --------------------------------------------------------------------------- 5. top-p

IDS = np.array([10, 11, 12, 13, 14])
PD = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625])  # dyadic: every partial sum exact; s = 1


@pytest.mark.parametrize(
    "top_p, kept",
    [
        # walk: c=0 < p keep (c=.5); then keep while c < p
        (0.6, [10, 11]),  # .5 < .6 keep (c=.75); .75 >= .6 drop
        (0.75, [10, 11]),  # .5 < .75 keep (c=.75); .75 >= .75 drop: the boundary is a drop
        (0.5, [10]),  # 0 < .5 keep (c=.5); .5 >= .5 drop
        (0.5000001, [10, 11]),  # just past the boundary the next one is kept
        (0.1, [10]),  # the first candidate is always kept (c = 0 < top_p)
        (0.9, [10, 11, 12, 13]),  # c: 0, .5, .75, .875 < .9 keep; .9375 >= .9 drop
        (0.9375, [10, 11, 12, 13]),  # .9375 >= .9375 drop
        (below(1.0), [10, 11, 12, 13, 14]),  # .9375 < 1 - 2^-53: keep all five
    ],
)
def test_top_p_walk_hand_worked(top_p, kept):
    ids, probs = top_p_filter(IDS, PD, top_p)
    np.testing.assert_array_equal(ids, kept)
    np.testing.assert_array_equal(probs, PD[: len(kept)])


@pytest.mark.parametrize("top_p", [0.0, -0.5, 1.0, 1.5, float("inf")])
def test_top_p_outside_0_s_keeps_everything(top_p):
    # s = 1: top_p <= 0 and top_p >= s mean no filtering at all
    ids, _ = top_p_filter(IDS, PD, top_p)
    np.testing.assert_array_equal(ids, IDS)


def test_top_p_measures_against_the_whole_mass_not_the_top_k_mass():
    # top-k kept [0.5, 0.25], s = 0.75
    ids, probs = IDS[:2], PD[:2]
    # top_p = 0.75 = s: not < s, no filtering
    np.testing.assert_array_equal(top_p_filter(ids, probs, 0.75)[0], [10, 11])
    # top_p = 0.6 < s: c = 0 keep (c = .5); .5 < .6 keep. Renormalised to
    # [2/3, 1/3] the walk would have stopped after the first (2/3 >= 0.6).
    np.testing.assert_array_equal(top_p_filter(ids, probs, 0.6)[0], [10, 11])
    # top_p = 0.5 < s: c = .5 >= .5 after the first -> [10]
    np.testing.assert_array_equal(top_p_filter(ids, probs, 0.5)[0], [10])


def test_top_p_vectorised_walk_equals_the_loop_on_awkward_sums():
    # probabilities whose partial sums round: the prefix must be the walk's, bit for bit
    rng = np.random.default_rng(0)
    for _ in range(200):
        w = np.sort(rng.random(rng.integers(1, 30)))[::-1]
        w = w / w.sum() * rng.uniform(0.3, 1.0)
        ids = np.arange(len(w))
        # top_p chosen ON a partial sum, the hardest case
        partial = np.cumsum(w)
        for top_p in [partial[rng.integers(len(w))], below(partial[rng.integers(len(w))]), rng.random()]:
            kept, c = [], 0.0
            for i, q in enumerate(w):
                if c >= top_p:
                    continue
                c += q
                kept.append(i)
            if not 0 < top_p < partial[-1]:
                kept = list(ids)
            np.testing.assert_array_equal(top_p_filter(ids, w, top_p)[0], kept)


# --------------------------------------------------------------------------- 6. draw

DIDS = np.array([7, 3, 5])
DW = np.array([0.5, 0.25, 0.25])  # cumsum [0.5, 0.75, 1.0], W = 1 so u * W = u exactly


@pytest.mark.parametrize(
    "u, token",
    [
        (0.0, 7),  # u = 0: the first candidate (cum 0.5 > 0)
        (below(0.5), 7),  # just below the first cumulative fraction
        (0.5, 3),  # on it: 0.5 > 0.5 is false, so the next one (strictly greater)
        (below(0.75), 3),
        (0.75, 5),
        (below(1.0), 5),  # u near 1: the last kept
    ],
)
def test_draw_boundaries(u, token):
    assert draw(DIDS, DW, u) == token


def test_draw_uses_unnormalised_weights():
    # w = [0.25, 0.125, 0.125], W = 0.5, cum = [.25, .375, .5]
    w = np.array([0.25, 0.125, 0.125])
    assert draw(DIDS, w, 0.5) == 3  # u * W = 0.25: cum[0] = .25 is not > .25; cum[1] is
    assert draw(DIDS, w, below(0.5)) == 7  # u * W just below .25
    assert draw(DIDS, w, 0.75) == 5  # u * W = .375 -> cum[2] = .5


def test_draw_never_picks_a_zero_weight():
    w = np.array([0.5, 0.5, 0.0])  # cum [.5, 1, 1]
    assert draw(DIDS, w, below(1.0)) == 3
    assert draw(DIDS, np.array([1.0, 0.0, 0.0]), below(1.0)) == 7


def test_draw_floating_edge_returns_the_last_positive_weight():
    # subnormal weights: W = 2 * 5e-324 and u * W rounds up to W, so no cum > u * W
    tiny = 5e-324
    w = np.array([tiny, tiny, 0.0])
    assert 0.99 * (2 * tiny) == 2 * tiny  # the edge really happens
    assert draw(DIDS, w, 0.99) == 3  # the last of positive weight, not the zero


@pytest.mark.parametrize("u", [-0.1, 1.0, 1.5, float("nan")])
def test_draw_rejects_u_outside_0_1(u):
    with pytest.raises(ValueError):
        draw(DIDS, DW, u)


# --------------------------------------------------------------------------- the pipeline


def test_sample_token_hand_worked_whole_pipeline():
    # logits ln of [0.4, 0.2, 0.2, 0.2] (up to a constant), temperature 1: p ~ [.4, .2, .2, .2]
    z = np.log(np.array([0.4, 0.2, 0.2, 0.2])).astype(np.float32)
    p = params(top_k=2, top_p=0.5)
    # top-k 2: ids [0, 1] (the 0.2s tie: lower id first), kept mass s ~ 0.6
    # top-p 0.5 < s: c = 0 keep (c ~ .4); .4 < .5 keep -> both ([2/3, 1/3] would drop 1)
    # draw: W ~ 0.6, cum ~ [.4, .6]; u = 0.7: u * W ~ .42 > .4 -> id 1
    assert sample_token(z, [], p, 0.7) == 1
    assert sample_token(z, [], p, 0.6) == 0  # u * W ~ .36 < .4
    # top_k = 1 leaves only id 0 whatever u
    assert sample_token(z, [], params(top_k=1), below(1.0)) == 0


def test_sample_token_penalty_window_includes_the_prompt():
    z = np.array([-1.0, -2.0, -3.0], dtype=np.float32)
    p = params(temperature=0.0, repeat_penalty=4.0, repeat_penalty_last_n_token_count=3)
    # without a penalty the argmax is id 0. ids [0, 2, 2]: 0 is a prompt token inside
    # the window of 3, so z0 = -1 * 4 = -4 < -2 and id 1 wins
    assert sample_token(z, [0, 2, 2], p, None) == 1
    # ids [0, 1, 1, 1]: the window [1, 1, 1] no longer reaches the prompt's 0;
    # z0 stays -1, z1 = -2 * 4 = -8, and id 0 wins
    assert sample_token(z, [0, 1, 1, 1], p, None) == 0


def test_sample_token_needs_u_on_the_sampling_path():
    z = np.zeros(4, np.float32)
    p = params(temperature=0.8)
    assert needs_draw(p)
    with pytest.raises(ValueError):
        sample_token(z, [], p, None)


@pytest.mark.parametrize(
    "logits",
    [np.zeros((2, 3), np.float32), np.zeros(0, np.float32), np.array([0.0, np.nan]), np.array([0.0, np.inf]),
     np.array([-np.inf, -np.inf])],
)
def test_sample_token_rejects_bad_logits(logits):
    with pytest.raises(ValueError):
        sample_token(logits, [], params(), 0.5)


def test_sample_token_accepts_other_dtypes_as_float32():
    z64 = np.array([0.1, 0.30000001, 0.3, -2.0], dtype=np.float64)
    p = params(repeat_penalty=1.3, temperature=0.9, top_k=3, top_p=0.8)
    for u in [0.0, 0.3, 0.5, 0.9]:
        assert sample_token(z64, [3, 1], p, u) == sample_token(z64.astype(np.float32), [3, 1], p, u)
    assert sample_token([1.0, 2.0], [], params(temperature=0.0), None) == 1  # a list works too


def test_sample_token_does_not_mutate_logits():
    z = np.array([2.0, -1.0, 0.5, 3.0], dtype=np.float32)
    before = z.copy()
    sample_token(z, [0, 1, 3], params(repeat_penalty=2.0, temperature=0.7, top_k=3, top_p=0.9), 0.42)
    sample_token(z, [0, 1, 3], params(repeat_penalty=2.0, temperature=0.0), None)
    np.testing.assert_array_equal(z, before)


def test_sample_token_large_vocabulary_is_fast_and_matches_the_reference():
    V = 49152
    rng = np.random.default_rng(1)
    z = (rng.standard_normal(V) * 3).astype(np.float32)
    ids = rng.integers(0, V, 300).tolist()
    p = params(repeat_penalty=1.1, repeat_penalty_last_n_token_count=64, temperature=0.8, top_k=V + 10, top_p=0.9)
    t = time.perf_counter()
    tok = sample_token(z, ids, p, 0.37)
    assert time.perf_counter() - t < 0.5  # vectorised: no Python loop over V
    assert tok == reference_sample_token(z, ids, p, 0.37)


# --------------------------------------------------------------------------- property: = SPEC 3

special_logits = st.sampled_from([0.0, 1.0, -1.0, 2.5, -2.5, 0.5, -30.0])  # ties on purpose
logit = st.one_of(special_logits, st.floats(-20, 20, width=32))


@st.composite
def cases(draw_):
    V = draw_(st.integers(1, 40))
    logits = np.array(draw_(st.lists(logit, min_size=V, max_size=V)), dtype=np.float32)
    ids = draw_(st.lists(st.integers(0, V - 1), max_size=30))
    p = InferencingParams(
        max_tokens=1,
        repeat_penalty=draw_(st.one_of(st.sampled_from([1.0, 0.5, 1.1, 1.3, 2.0]), st.floats(0.1, 3.0))),
        repeat_penalty_last_n_token_count=draw_(st.integers(0, 40)),
        temperature=draw_(st.one_of(st.sampled_from([0.0, -1.0, 0.1, 0.8, 1.0, 2.5]), st.floats(0.05, 5.0))),
        top_k=draw_(st.one_of(st.integers(1, 45), st.sampled_from([V, V - 1 if V > 1 else 1, V + 1]))),
        top_p=draw_(st.one_of(st.sampled_from([-0.5, 0.0, 0.25, 0.5, 0.9, 1.0, 1.5]), st.floats(0.0, 1.0))),
    )
    u = draw_(st.one_of(st.sampled_from([0.0, 0.5, below(1.0)]), st.floats(0.0, 1.0, exclude_max=True)))
    return logits, ids, p, u


@settings(max_examples=250, deadline=None)
@given(cases())
def test_sample_token_equals_the_spec_loop(case):
    logits, ids, p, u = case
    before = logits.copy()
    tok = sample_token(logits, ids, p, u)
    assert tok == reference_sample_token(logits, ids, p, u)
    assert sample_token(logits, ids, p, u) == tok  # the same u, the same token
    assert 0 <= tok < len(logits)
    np.testing.assert_array_equal(logits, before)


# --------------------------------------------------------------------------- property: extreme values (D1)

# Issue 14, D1: a temperature of 1e-307 or a penalty of 5e-324 made NaN probabilities
# and an IndexError in the top-p walk. Whatever validation lets through must give a
# valid token, the one SPEC 3 (version 2) gives.
extreme = st.sampled_from([5e-324, 1e-320, 1e-307, 1e-300, 1e-46, 1e-45, 1e-40, 1e-38, 1e-20, 1e-6,
                           0.5, 1.0, 2.0, 1e6, 1e20, 1e38, 3.4e38, 1e39, 1e300, 1.7e308])


@st.composite
def extreme_cases(draw_):
    V = draw_(st.integers(1, 12))
    big = st.sampled_from([0.0, -0.0, 1.0, -1.0, 3e38, -3e38, float(FLT32_MAX), -float(FLT32_MAX), 1e-30, -1e-30])
    logits = np.array(draw_(st.lists(st.one_of(big, st.floats(float(f32(-3e38)), float(f32(3e38)), width=32)), min_size=V, max_size=V)),
                      dtype=np.float32)
    ids = draw_(st.lists(st.integers(0, V - 1), max_size=10))
    p = InferencingParams(
        max_tokens=1,
        repeat_penalty=draw_(st.one_of(extreme, st.floats(min_value=0.0, exclude_min=True, allow_infinity=False))),
        repeat_penalty_last_n_token_count=draw_(st.sampled_from([0, 1, 5, 2**32 - 1])),
        temperature=draw_(st.one_of(extreme, st.sampled_from([0.0, -1.0]),
                                    st.floats(min_value=0.0, exclude_min=True, allow_infinity=False))),
        top_k=draw_(st.sampled_from([1, 2, V, 2**32 - 1])),
        top_p=draw_(st.one_of(st.sampled_from([5e-324, 1e-300, 0.5, 1.0, 1e300]), st.floats(0.0, 1.0))),
    )
    u = draw_(st.one_of(st.sampled_from([0.0, 0.5, below(1.0)]), st.floats(0.0, 1.0, exclude_max=True)))
    return logits, ids, p, u


@settings(max_examples=400, deadline=None)
@given(extreme_cases())
def test_sample_token_never_fails_on_what_validation_lets_through(case):
    from refllm.errors import InvalidInputError
    from refllm.generate import validate_params

    logits, ids, p, u = case
    try:
        validate_params(p)
    except InvalidInputError:
        assert not f32(p.repeat_penalty) > 0  # only a penalty that is 0 as a float32 is refused here
        return
    tok = sample_token(logits, ids, p, u)
    assert 0 <= tok < len(logits)
    assert tok == reference_sample_token(logits, ids, p, u)


@pytest.mark.parametrize("temperature, penalty", [(1e-307, 1.0), (5e-324, 1.0), (1.0, 1e-40), (1e-300, 1e-40)])
def test_tiny_temperature_or_penalty_picks_the_top_logit(temperature, penalty):
    """D1's requests: p = 1 on the largest (penalised) logit, so every u draws it."""
    logits = np.array([0.5, 3.0, -2.0, 2.9], dtype=np.float32)
    p = params(temperature=temperature, repeat_penalty=penalty, top_p=0.9)
    ids = [0] if penalty != 1.0 else []  # 0.5 / 1e-40 overflows: clipped to FLT32_MAX, the largest
    want = 0 if penalty != 1.0 else 1
    assert {sample_token(logits, ids, p, u) for u in (0.0, 0.5, below(1.0))} == {want}
    q = softmax_with_temperature(apply_repeat_penalty(logits, ids, penalty, 64), temperature)
    assert np.isfinite(q).all() and q[want] == 1.0


def test_a_penalty_that_is_zero_as_a_float32_is_invalid_input():
    from refllm.errors import InvalidInputError
    from refllm.generate import validate_params

    with pytest.raises(InvalidInputError, match="repeat_penalty"):
        validate_params(params(repeat_penalty=5e-324))
    validate_params(params(repeat_penalty=1e-45))  # the smallest float32 subnormal: valid
    validate_params(params(repeat_penalty=1e39))  # inf as a float32: valid, the clip keeps z finite


# --------------------------------------------------------------------------- randomness


def test_make_rng_is_reproducible_and_is_pcg64():
    a = make_rng(42).random(5)
    np.testing.assert_array_equal(a, make_rng(42).random(5))
    np.testing.assert_array_equal(a, np.random.Generator(np.random.PCG64(42)).random(5))
    assert a[0] == 0.7739560485559633  # the PCG64(42) stream, pinned
    assert not np.array_equal(a, make_rng(43).random(5))


@pytest.mark.parametrize("seed", [None, -1, 1.5, True])
def test_make_rng_wants_an_explicit_non_negative_int(seed):
    with pytest.raises(ValueError):
        make_rng(seed)


def test_sampler_draws_only_on_the_sampling_path():
    z = np.array([0.0, 1.0, 0.5, -1.0], dtype=np.float32)
    ids = [0, 1]
    # sampling: the k-th token uses the k-th draw of PCG64(seed)
    p = params(temperature=0.9, top_k=3, top_p=0.95)
    s = Sampler(p, seed=7)
    us = make_rng(7).random(6)
    assert [s(z, ids) for _ in range(6)] == [sample_token(z, ids, p, u) for u in us]
    # greedy: no draw is consumed, the generator is where it started
    g = Sampler(params(temperature=0.0), seed=7)
    for _ in range(3):
        assert g(z, ids) == 1
    assert g.rng.random() == us[0]


def test_top_k_candidates_equals_a_full_stable_sort_with_many_ties():
    # top_k_candidates sorts only the ids that can make the cut; it must pick exactly
    # what a stable descending sort of all V ids picks, ties at the cut included.
    rng = np.random.default_rng(0)
    for _ in range(300):
        V = int(rng.integers(1, 2000))
        p = rng.random(V)
        p[rng.integers(0, V, size=V // 3)] = p[0]  # many ties, some across the k-th place
        k = int(rng.integers(1, V + 5))
        ids, probs = top_k_candidates(p, k)
        expect = np.argsort(-p, kind="stable")[:k]
        np.testing.assert_array_equal(ids, expect)
        np.testing.assert_array_equal(probs, p[expect])
