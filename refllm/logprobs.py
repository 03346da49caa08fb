"""The reference arithmetic around sampling, written once: the repeat-penalty window,
log-softmax, the top-n logits and the interval of ``u`` that picks a token.

Every part of refllm that reports on a generation (the golden set, `refllm trace`,
`refllm conform`, the HTTP dialects' ``logprobs``) needs the same four small
computations next to SPEC 3's pipeline (`refllm.sampling`). They live here, built on
`sampling`'s step functions where one exists, so that a number printed by one tool is
the number another tool compares against.

    penalty_window(ids, penalty, last_n)        -> [n] distinct ids the penalty touches
    penalize(z, ids, penalty, last_n)           -> [V] float64 penalised logits
    penalize_one(z_t, t, ids, penalty, last_n)  -> () one token's penalised logit
    log_softmax(z)                              -> [V] float64
    log_softmax_at(z, ids)                      -> [n] float64
    top_n(z, n)                                 -> n x (id, value), descending (ties: lower id)
    u_intervals(kept_probs)                     -> [K], [K]: candidate i is picked for lo[i] <= u < hi[i]
    u_interval(z32, ids, params, token)         -> (lo, hi): SPEC 3 picks `token` for lo <= u < hi

SPEC 3 step 1 is float32 (`sampling.apply_repeat_penalty`); `penalize` is the same rule
in float64, for references that must never be the less precise side of a comparison
(the golden set's margins and log-probs).

Shape letters: V = vocabulary size, n = a number of ids, K = kept candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import sampling
from .types import InferencingParams

__all__ = ["penalty_window", "penalize", "penalize_one", "log_softmax", "log_softmax_at", "top_n", "u_interval",
           "u_intervals", "kept_candidates"]


def penalty_window(ids: Sequence[int], penalty: float, last_n: int) -> np.ndarray:  # ids -> [n] int64
    """The distinct ids SPEC 3 step 1 penalises: those of ``ids[-last_n:]`` (the prompt
    counts too), none when ``penalty == 1`` or ``last_n == 0``. Ascending."""
    if penalty == 1.0 or last_n == 0 or len(ids) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.asarray(list(ids)[-last_n:], dtype=np.int64))


def penalize(logits, ids: Sequence[int], penalty: float, last_n: int) -> np.ndarray:  # [V] -> [V] float64
    """SPEC 3 step 1 in float64: ``z / rp`` where ``z >= 0`` else ``z * rp``, over the window."""
    z = np.array(logits, dtype=np.float64)  # [V] a copy
    window = penalty_window(ids, penalty, last_n)  # [n]
    zw = z[window]
    z[window] = np.where(zw >= 0, zw / penalty, zw * penalty)
    return z


def penalize_one(logit: float, token: int, ids: Sequence[int], penalty: float, last_n: int) -> float:
    """`penalize` for one token whose logit is known (e.g. from a golden step's top-n)."""
    if penalty == 1.0 or last_n == 0 or token not in set(list(ids)[-last_n:]):
        return float(logit)
    return float(logit / penalty if logit >= 0 else logit * penalty)


def log_softmax(logits) -> np.ndarray:  # [V] -> [V] float64
    """``z - logsumexp(z)`` in float64 (the max subtracted first)."""
    z = np.asarray(logits, dtype=np.float64)  # [V]
    m = np.max(z)
    return z - (m + np.log(np.sum(np.exp(z - m))))


def log_softmax_at(logits, ids) -> np.ndarray:  # [V], [n] -> [n] float64
    """`log_softmax` at the given ids only."""
    z = np.asarray(logits, dtype=np.float64)  # [V]
    m = np.max(z)
    lse = m + np.log(np.sum(np.exp(z - m)))  # ()
    return z[np.asarray(ids, dtype=np.int64)] - lse


def top_n(values, n: int) -> list[tuple[int, float]]:  # [V] -> n x (id, value)
    """The n largest values with their ids, descending; equal values lower id first."""
    v = np.asarray(values, dtype=np.float64)  # [V]
    order = np.argsort(-v, kind="stable")[:n]  # [n]
    return [(int(i), float(v[i])) for i in order]


def kept_candidates(logits, ids: Sequence[int], params: InferencingParams) -> tuple[np.ndarray, np.ndarray]:
    """SPEC 3 steps 1 and 3-5 on float32 logits: the candidates the draw walks, in its
    order, with their (not renormalised) probabilities. [V] -> [K], [K]."""
    zp = sampling.apply_repeat_penalty(logits, ids, params.repeat_penalty,
                                       params.repeat_penalty_last_n_token_count)  # [V] float32
    p = sampling.softmax_with_temperature(zp, params.temperature)  # [V] float64
    return sampling.top_p_filter(*sampling.top_k_candidates(p, params.top_k), params.top_p)  # [K], [K]


def u_intervals(kept_probs) -> tuple[np.ndarray, np.ndarray]:  # [K] -> [K], [K]
    """For each kept candidate i, the draws ``lo[i] <= u < hi[i]`` for which SPEC 3's step 6
    picks it: ``cumsum(w)[i-1] / W`` to ``cumsum(w)[i] / W`` (sequential sums, as step 6)."""
    cum = np.cumsum(np.asarray(kept_probs, dtype=np.float64))  # [K]
    hi = cum / cum[-1]  # [K]
    lo = np.concatenate(([0.0], cum[:-1])) / cum[-1]  # [K]
    return lo, hi


def u_interval(logits, ids: Sequence[int], params: InferencingParams, token: int) -> tuple[float, float]:
    """The draws ``u`` for which SPEC 3's step 6 picks `token`: ``lo <= u < hi``
    (`u_intervals` of the kept candidates). (0, 0) if `token` is not kept."""
    kept, probs = kept_candidates(logits, ids, params)  # [K], [K]
    where = np.nonzero(kept == token)[0]
    if len(where) == 0:
        return 0.0, 0.0
    lo, hi = u_intervals(probs)
    i = int(where[0])
    return float(lo[i]), float(hi[i])
