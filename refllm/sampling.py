"""Sampling: SPEC.md section 3, the normative pipeline, one pure function per step.

Given the float32 logits ``z`` of the next position, the token ids so far (the prompt
with its BOS, then the generated tokens), the `InferencingParams` and a uniform draw
``u`` in [0, 1), the next token is

    1. apply_repeat_penalty       each distinct id t of ids[-last_n:] once:
                                  z[t] / rp if z[t] >= 0 else z[t] * rp        float32
                                  then z clipped to [-FLT32_MAX, FLT32_MAX]
    2. greedy                     temperature <= 0: argmax(z), ties -> highest id
    3. softmax_with_temperature   x = (float64(z) - max) / temperature;
                                  p = exp(x) / sum(exp(x))                     float64
    4. top_k_candidates           all ids by descending p (stable: ties, lower id
                                  first); the first top_k kept, NOT renormalised
    5. top_p_filter               if 0 < top_p < sum(kept): keep a candidate while
                                  the kept mass before it is < top_p
    6. draw                       the first candidate whose cumulative weight > u * W

`sample_token` runs the six steps; each step is also public, so that a backend author
can check their own logits, or their own step, against this one.

Where the order comes from
--------------------------
This is what Spin 3's local engine does (fermyon/spin, ``crates/llm-local/src/llama.rs``):
it calls candle's ``candle_transformers::utils::apply_repeat_penalty`` on the logits
with the last ``repeat_penalty_last_n_token_count`` ids of the whole token list
(so the prompt counts too), unless ``repeat_penalty == 1``, and then
``LogitsProcessor::sample`` (``candle-transformers/src/generation/mod.rs``) with
``Sampling::ArgMax`` when ``temperature <= 0`` and otherwise
``Sampling::TopKThenTopP { k, p, temperature }``: softmax of logits / temperature,
keep the top k, then the top-p walk over those, then a weighted draw. Two properties
of that order are easy to get wrong, and they are the reason this file exists:

* top-p is measured against the whole softmax mass, not against the renormalised
  top-k mass (the kept probabilities are never rescaled before step 6);
* the penalty window includes the prompt, and the penalty applies on the greedy path.

SPEC 3 fixes argmax ties to the highest token id: that is what candle's argmax gives
where it is Rust's ``Iterator::max_by``, which returns the *last* of equal maxima
(``np.argmax`` returns the first, so `greedy` does not call it on ``z`` directly).

What refllm changes, on purpose
-------------------------------
* Precision. Step 1 is float32, as in candle (its logits are f32 there). Steps 3 to 6
  are float64, so that the reference is never the less precise side of a comparison:
  a float32 backend disagrees with it only where ``u`` falls within rounding of a
  boundary between two candidates. Sums that decide something (the top-p walk, the
  mass ``s`` and ``W``, the cumulative weights) are sequential left-to-right sums in
  candidate order, ``np.cumsum``, never pairwise sums, so that they are bit-identical
  to the literal loops of SPEC 3.
* The draw. Candle draws from an OS-seeded ChaCha ``StdRng``; here the uniform ``u``
  is an argument, so any backend given the same ``u`` sequence picks the same tokens.
  ``u`` comes from ``make_rng(seed).random()``, i.e.
  ``numpy.random.Generator(PCG64(seed))``, one draw per *sampled* token; the greedy
  path consumes none (`needs_draw`). `Sampler` bundles the two for a generation loop.
* No NaN, no infinity (SPEC version 2). A tiny penalty can overflow ``z[t] / rp`` to
  infinity, and a tiny temperature ``z / T``; then ``inf - inf`` made NaN
  probabilities (and an IndexError in the top-p walk). Step 1 clips the penalised
  logits to the largest finite float32, and step 3 subtracts the maximum *before*
  dividing, so the largest logit becomes exactly 0 and a temperature of 1e-300 gives
  it probability 1 (shared equally by ties). Both are no-ops on ordinary values.
* Edge rules are written once, for every k: top-p filters only when
  ``0 < top_p < s`` (so ``top_p <= 0`` and ``top_p >= s`` keep everything). Candle
  makes that test only when k < V; with k >= V its walk runs regardless, which for
  ``top_p <= 0`` drops every candidate and fails the draw.

Other backends, other orders
----------------------------
transformers / TGI apply the penalty, then temperature, then top-k, then top-p over
the *renormalised* cumulative mass; llama.cpp applies its penalties, then top-k,
top-p, min-p, and the temperature last. Each gives different tokens for the same
logits and ``u``. Such orders are separate, named profiles (SPEC section 6), never
this default, and none is implemented in this file.

Shape letters: V = vocabulary size, K = number of kept candidates (1 <= K <= V).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from refllm.types import InferencingParams

FLT32_MAX = np.float32(np.finfo(np.float32).max)  # the clip of step 1

__all__ = [
    "apply_repeat_penalty",
    "greedy",
    "softmax_with_temperature",
    "top_k_candidates",
    "top_p_filter",
    "draw",
    "sample_token",
    "needs_draw",
    "make_rng",
    "Sampler",
]


# ---------------------------------------------------------------- step 1: penalty


def apply_repeat_penalty(  # [V], ids, (), () -> [V] float32
    logits: np.ndarray, ids: Sequence[int], penalty: float, last_n: int
) -> np.ndarray:
    """Step 1: penalise every distinct id of ``ids[-last_n:]`` once, in float32.

    ``z[t] / penalty`` where ``z[t] >= 0``, else ``z[t] * penalty``: a penalty above 1
    pulls the logit towards zero from above and pushes it away from zero below, so
    the token always becomes less likely; a penalty below 1 does the opposite.
    A no-op when ``penalty == 1.0`` or ``last_n == 0``. Otherwise the result is then
    clipped to ``[-FLT32_MAX, FLT32_MAX]`` (SPEC 3, version 2): a penalty of 1e-40
    turns ``z[t] / rp`` into infinity, which becomes the largest finite float32.
    ``penalty`` is used as the float32 it becomes; generation validates that it is
    still > 0 there. Returns a new float32 array; the caller's array is never modified.
    """
    z = np.array(logits, dtype=np.float32)  # [V] a copy, always
    if z.ndim != 1:
        raise ValueError(f"logits must be 1-D [V], got shape {z.shape}")
    with np.errstate(over="ignore"):
        rp = np.float32(penalty)  # () 1e39 -> inf (valid: the clip keeps z finite), 1e-46 -> 0 (invalid)
    if not (np.isfinite(penalty) and penalty > 0 and rp > 0):
        raise ValueError(f"repeat penalty must be a finite number > 0 (also as a float32), got {penalty!r}")
    if last_n < 0:
        raise ValueError(f"last_n must be >= 0, got {last_n!r}")
    ids = as_ids(ids, len(z))  # [n] int64, each in [0, V)
    if penalty == 1.0 or last_n == 0 or len(ids) == 0:
        return z
    window = np.unique(ids[-last_n:])  # [<= last_n] distinct ids, prompt included
    with np.errstate(over="ignore", invalid="ignore"):  # the branch np.where discards may be 0 * inf
        zw = z[window]  # [n_distinct] float32
        z[window] = np.where(zw >= 0, zw / rp, zw * rp)  # float32 / float32 -> float32, may overflow
    return np.clip(z, -FLT32_MAX, FLT32_MAX, out=z)  # [V] an overflow is the largest finite value


def as_ids(ids: Sequence[int], vocab_size: int) -> np.ndarray:  # ids -> [n] int64
    """The token ids as int64, checked to be integers in [0, vocab_size)."""
    a = np.asarray(ids)
    if a.size == 0:
        return np.zeros(0, dtype=np.int64)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"ids must be a flat sequence of ints, got dtype {a.dtype}, shape {a.shape}")
    a = a.astype(np.int64)
    bad = (a < 0) | (a >= vocab_size)
    if bad.any():
        raise ValueError(f"token id {int(a[bad][0])} is outside the vocabulary [0, {vocab_size})")
    return a


# ---------------------------------------------------------------- step 2: greedy


def greedy(logits: np.ndarray) -> int:  # [V] -> ()
    """Step 2: argmax of the (penalised) logits; among equal maxima, the highest id."""
    z = np.asarray(logits)  # [V]
    return int(len(z) - 1 - np.argmax(z[::-1]))  # np.argmax alone gives the lowest id


# ---------------------------------------------------------------- step 3: temperature


def softmax_with_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:  # [V] -> [V] float64
    """Step 3: ``x = (float64(z) - max(float64(z))) / float64(temperature)``,
    ``p = exp(x) / sum(exp(x))``, in float64.

    The shift comes before the division (SPEC 3, version 2): dividing first, a
    temperature of 1e-300 sends every positive logit to infinity and ``x - max(x)``
    to NaN. Shifted first, the largest logit is exactly 0 whatever the temperature,
    the others are <= 0 (-inf at worst), and exp() of them is in [0, 1].
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 on the sampling path, got {temperature!r}")
    z = np.asarray(logits, dtype=np.float64)  # [V]
    with np.errstate(over="ignore"):  # (z - max) / 1e-300 may be -inf: exp(-inf) = 0
        x = (z - np.max(z)) / np.float64(temperature)  # [V] <= 0, the maximum exactly 0
    e = np.exp(x)  # [V] in [0, 1], the maximum is exactly 1
    return e / np.sum(e)  # [V]


# ---------------------------------------------------------------- step 4: top-k


def top_k_candidates(p: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:  # [V] -> [K], [K]
    """Step 4: all ids by descending p (stable: ties, lower id first), the first top_k.

    ``top_k >= V`` keeps all V ids. The kept probabilities are returned as they are,
    NOT renormalised: step 5 measures top-p against the whole softmax mass.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k!r}")
    V = p.shape[0]
    if top_k < V:  # sort only the ids that can make the cut: those with p >= the k-th largest
        kth = np.partition(p, V - top_k)[V - top_k]  # () the k-th largest p
        candidates = np.flatnonzero(p >= kth)  # [>= K] ascending ids, ties at kth included
    else:
        candidates = np.arange(V)  # [V]
    # A stable sort of ids in ascending order keeps the lower id first on ties.
    kept_ids = candidates[np.argsort(-p[candidates], kind="stable")][:top_k]  # [K] K = min(top_k, V)
    return kept_ids, p[kept_ids]  # [K], [K] float64


# ---------------------------------------------------------------- step 5: top-p


def top_p_filter(  # [K], [K], () -> [K'], [K']
    kept_ids: np.ndarray, kept_probs: np.ndarray, top_p: float
) -> tuple[np.ndarray, np.ndarray]:
    """Step 5: the top-p walk over the kept candidates, in candidate order.

    With ``s`` the kept mass: if ``0 < top_p < s``, walk with ``c = 0``; a candidate
    is dropped if ``c >= top_p``, else kept and ``c += p_i``. Otherwise all are kept.

    ``c`` only grows while candidates are kept, and once one is dropped ``c`` stops
    changing, so every later one is dropped too: the walk keeps exactly the prefix of
    candidates whose mass *before* them is below top_p. That mass is the exclusive
    prefix sum, computed with ``np.cumsum`` (sequential, left to right, float64),
    which performs the walk's additions in the walk's order, hence the same bits.
    """
    w = np.asarray(kept_probs, dtype=np.float64)  # [K]
    inclusive = np.cumsum(w)  # [K] inclusive[i] = p_0 + ... + p_i, sequentially
    s = inclusive[-1]  # () the kept mass, the same sequential sum
    if not 0 < top_p < s:
        return kept_ids, kept_probs
    before = np.concatenate(([0.0], inclusive[:-1]))  # [K] c at candidate i, in the walk
    n_keep = int(np.count_nonzero(before < top_p))  # a prefix, since `before` is non-decreasing
    return kept_ids[:n_keep], kept_probs[:n_keep]  # [K'], [K'] K' >= 1 (before[0] = 0 < top_p)


# ---------------------------------------------------------------- step 6: draw


def draw(kept_ids: np.ndarray, kept_probs: np.ndarray, u: float) -> int:  # [K'], [K'], () -> ()
    """Step 6: the first kept candidate i with ``cumsum(w)[i] > u * W``, ``W = sum(w)``.

    ``w`` are the kept probabilities in candidate order, used as unnormalised weights;
    ``W`` is their sequential sum (the last cumulative weight). ``u = 0`` picks the
    first candidate; a candidate of weight 0 is never picked. For a normal ``W`` and
    ``u < 1``, ``u * W`` rounds below ``W``, so some candidate always qualifies; only
    a subnormal ``W`` (never from `sample_token`, where ``W >= max p >= 1/V``) can
    round ``u * W`` up to ``W``, and then the last candidate of positive weight is
    returned, which is what ``u -> 1`` means.
    """
    if not 0.0 <= u < 1.0:
        raise ValueError(f"u must be a float in [0, 1), got {u!r}")
    cum = np.cumsum(np.asarray(kept_probs, dtype=np.float64))  # [K'] sequential
    W = cum[-1]  # ()
    i = int(np.searchsorted(cum, np.float64(u) * W, side="right"))  # first i: cum[i] > u*W
    if i == len(cum):  # floating edge: no cum[i] > u*W
        i = int(np.searchsorted(cum, W, side="left"))  # the first i reaching W
    return int(kept_ids[i])


# ---------------------------------------------------------------- the pipeline


def needs_draw(params: InferencingParams) -> bool:
    """Whether `sample_token` needs a uniform draw ``u``: only on the sampling path.

    A generation loop calls ``rng.random()`` only when this is true, so that the
    greedy path consumes no draws (SPEC 3).
    """
    return params.temperature > 0


def sample_token(  # [V], ids, params, () -> ()
    logits: np.ndarray, ids: Sequence[int], params: InferencingParams, u: float | None
) -> int:
    """The next token id: SPEC 3, steps 1 to 6.

    ``logits`` is the [V] vector of the next position (float32; other dtypes are
    converted to float32 for step 1, as in candle). ``ids`` is every token so far,
    prompt (BOS included) then generated. ``u`` is a uniform draw in [0, 1), required
    when ``params.temperature > 0`` and ignored (may be None) on the greedy path.
    The caller's logits are not modified.
    """
    z = np.asarray(logits)
    if z.ndim != 1 or z.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D array [V], got shape {z.shape}")
    if np.isnan(z).any() or np.isposinf(z).any():
        raise ValueError("logits must not contain NaN or +inf")
    if np.isneginf(z).all():
        raise ValueError("logits are all -inf: no token can be chosen")

    z = apply_repeat_penalty(  # 1. [V] float32
        z, ids, params.repeat_penalty, params.repeat_penalty_last_n_token_count
    )
    if not needs_draw(params):
        return greedy(z)  # 2. u is not used
    if u is None:
        raise ValueError(f"temperature {params.temperature} > 0 samples, so it needs a draw u in [0, 1)")
    p = softmax_with_temperature(z, params.temperature)  # 3. [V] float64
    kept_ids, kept_probs = top_k_candidates(p, params.top_k)  # 4. [K], [K]
    kept_ids, kept_probs = top_p_filter(kept_ids, kept_probs, params.top_p)  # 5. [K'], [K']
    return draw(kept_ids, kept_probs, u)  # 6.


# ---------------------------------------------------------------- the randomness


def make_rng(seed: int) -> np.random.Generator:
    """The generator SPEC 3 prescribes for ``u``: ``numpy.random.Generator(PCG64(seed))``.

    The seed must be given (a non-negative int): a generation without a user seed
    draws a random one itself and reports it, so every run can be replayed.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return np.random.Generator(np.random.PCG64(int(seed)))


class Sampler:
    """`sample_token` with its params and its generator: one ``u`` per sampled token.

        sampler = Sampler(params, seed)
        next_id = sampler(logits, ids)   # consumes rng.random() only if needs_draw(params)
    """

    def __init__(self, params: InferencingParams, seed: int):
        self.params = params
        self.seed = seed
        self.rng = make_rng(seed)

    def __call__(self, logits: np.ndarray, ids: Sequence[int]) -> int:  # [V], ids -> ()
        u = self.rng.random() if needs_draw(self.params) else None
        return sample_token(logits, ids, self.params, u)
