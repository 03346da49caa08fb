"""The statistical check of a sampler: does a backend that draws from its own RNG draw
from the right distribution?

A backend with its own RNG cannot match refllm token for token, but its first sampled
token is a draw from a distribution refllm can compute exactly: the model's float64
logits at the prompt, put through the claimed engine's penalty, temperature, top-k,
top-p and min-p in that engine's order (`refllm.profiles.distribution`). conform asks
for N one-token generations of the case under N seeds and tests the counts:

    G = 2 sum_i O_i ln(O_i / E_i)         the likelihood-ratio (G) test of goodness of fit
    cells: the tokens with E_i >= 5; the rest pooled into one tail cell (E >= 5 too, or
           merged into the smallest cell); df = cells - 1; p = P(chi2_df >= G)

A token the claimed sampler can never draw (E = 0) that the backend drew is a failure
on its own (p = 0). The false-alarm rate ``ALPHA`` (1e-3) is the chance that a correct
backend fails a case. ``N`` is chosen for power: the smallest N at which a deviation of
Cohen's effect size ``w = sqrt(sum (q_i - p_i)^2 / p_i)`` = ``EFFECT_W`` (0.3, "medium")
is caught with probability ``POWER`` (0.99): the G statistic under such an alternative
is approximately noncentral chi2 with noncentrality ``N w^2`` (Cohen 1988, ch. 7).
Against a sampler that applies top-p before the temperature, or ignores top-k, the
effect sizes of the built-in cases are far larger (the report states them).

The counts are by token where the dialect returns ids, else by the token's text with
incomplete UTF-8 characters dropped (what llama-cpp-python returns); the expected
distribution is aggregated the same way, so that two ids with the same text share a cell.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

ALPHA = 1e-3
POWER = 0.99
EFFECT_W = 0.3
MIN_EXPECTED = 5.0
MAX_N = 2000

__all__ = ["ALPHA", "POWER", "EFFECT_W", "sample_size", "g_test", "effect_size"]


def sample_size(df: int, alpha: float = ALPHA, power: float = POWER, w: float = EFFECT_W) -> int:
    """The smallest N whose G test at false-alarm rate `alpha` catches effect size `w`
    with probability `power` (noncentral chi2 with noncentrality N w^2)."""
    from scipy.stats import chi2, ncx2

    df = max(int(df), 1)
    crit = chi2.isf(alpha, df)
    lo, hi = 1, 1
    while ncx2.sf(crit, df, hi * w * w) < power:
        lo, hi = hi, hi * 2
    while lo < hi:  # the first N with enough power
        mid = (lo + hi) // 2
        if ncx2.sf(crit, df, mid * w * w) >= power:
            hi = mid
        else:
            lo = mid + 1
    return hi


def effect_size(p, q) -> float:
    """Cohen's w of the alternative q against the null p (both [C] probabilities, p > 0)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    return float(math.sqrt(np.sum((q - p) ** 2 / p)))


def cells(expected: dict, n: int, min_expected: float = MIN_EXPECTED) -> tuple[list, list[float]]:
    """The cells of the test: each key with n * p >= min_expected, then one pooled tail
    ("<tail>") holding the rest, merged into the smallest cell if it is still too small.
    Returns (keys per cell: a key, or a tuple of pooled keys), probabilities per cell."""
    items = sorted(expected.items(), key=lambda kv: -kv[1])
    big = [(k, p) for k, p in items if n * p >= min_expected]
    tail = [(k, p) for k, p in items if n * p < min_expected and p > 0]
    keys = [k for k, _ in big]
    probs = [p for _, p in big]
    tail_p = sum(p for _, p in tail)
    if tail:
        if n * tail_p >= min_expected or not keys:
            keys.append(tuple(k for k, _ in tail))
            probs.append(tail_p)
        else:  # merge the tail into the smallest big cell
            last = keys[-1]
            keys[-1] = (last,) + tuple(k for k, _ in tail)
            probs[-1] += tail_p
    return keys, probs


def g_test(expected: dict, observed: Counter, alpha: float = ALPHA) -> dict:
    """Test `observed` counts (key -> count) against `expected` probabilities (key -> p).

    Returns the verdict and its evidence: n, df, G, the p-value, the cells, the most over-
    and under-represented keys (by the standardised residual (O - E) / sqrt(E)) and any
    key observed that the expected distribution never gives."""
    from scipy.stats import chi2

    impossible = {k: c for k, c in observed.items() if expected.get(k, 0.0) <= 0.0}
    n = int(sum(observed.values())) - sum(impossible.values())  # the draws the cells test (impossible: p = 0)
    keys, probs = cells(expected, n)
    rows = []
    g = 0.0
    for key, p in zip(keys, probs):
        members = key if isinstance(key, tuple) else (key,)
        o = sum(observed.get(k, 0) for k in members)
        e = n * p
        if o > 0:
            g += 2.0 * o * math.log(o / e)
        rows.append({"key": key if not isinstance(key, tuple) else "<tail>", "pooled": len(members),
                     "observed": o, "expected": e, "residual": (o - e) / math.sqrt(e) if e > 0 else math.inf})
    df = max(len(rows) - 1, 1)
    pvalue = 0.0 if impossible else float(chi2.sf(g, df))
    over = sorted(rows, key=lambda r: -r["residual"])[:3]
    under = sorted(rows, key=lambda r: r["residual"])[:3]
    return {"n": n + sum(impossible.values()), "df": df, "g": g, "pvalue": pvalue, "alpha": alpha, "passed": pvalue >= alpha,
            "impossible": impossible, "over": over, "under": under, "cells": rows}
