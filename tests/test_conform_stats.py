"""refllm.conform.stats by simulation: the G-test's false-alarm rate and its power at the
N that `sample_size` chooses, with multinomial draws from numpy (no model, no server)."""

from collections import Counter

import numpy as np
import pytest

from refllm.conform import stats


def _draw(rng, keys, probs, n) -> Counter:
    return Counter(dict(zip(keys, rng.multinomial(n, probs).tolist())))


def _alternative(p, w):
    """A distribution q at Cohen's effect size w from p: mass moved among the four likeliest."""
    d = np.zeros(len(p))
    d[:4] = [1.0, -1.0, 1.0, -1.0]
    d *= w / np.sqrt(np.sum(d * d / p))
    q = p + d
    assert (q > 0).all() and abs(q.sum() - 1) < 1e-12
    return q


@pytest.fixture
def null():
    p = np.array([0.40, 0.22, 0.12, 0.09, 0.07, 0.05, 0.03, 0.015, 0.005])  # a tail to pool
    return [f"t{i}" for i in range(len(p))], p / p.sum()


def test_sample_size_gives_the_stated_power_and_false_alarm_rate(null):
    keys, p = null
    rng = np.random.default_rng(0)
    n = stats.sample_size(len(stats.cells(dict(zip(keys, p)), 400)[0]) - 1)
    assert 200 < n < 1000
    expected = dict(zip(keys, p))
    alarms = sum(not stats.g_test(expected, _draw(rng, keys, p, n))["passed"] for _ in range(2000))
    assert alarms <= 8  # alpha = 1e-3: 2 expected; P(> 8) ~ 1e-4
    q = _alternative(p, stats.EFFECT_W)
    caught = sum(not stats.g_test(expected, _draw(rng, keys, q, n))["passed"] for _ in range(400))
    assert caught >= 0.97 * 400  # power 0.99 (the chi2 approximation is close at these counts)


def test_the_report_names_the_tokens(null):
    keys, p = null
    q = p.copy()
    q[0], q[1] = p[1], p[0]  # the two most likely tokens swapped
    t = stats.g_test(dict(zip(keys, p)), Counter(dict(zip(keys, (q * 500).round().astype(int).tolist()))))
    assert not t["passed"] and t["pvalue"] < 1e-6
    assert t["over"][0]["key"] == "t1" and t["under"][0]["key"] == "t0"
    t = stats.g_test({"a": 0.5, "b": 0.5}, Counter({"a": 10, "b": 9, "c": 1}))
    assert t["impossible"] == {"c": 1} and t["pvalue"] == 0.0 and not t["passed"]
