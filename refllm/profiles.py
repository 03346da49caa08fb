"""Other backends' sampling orders, as pure functions beside SPEC 3's pipeline (SPEC 6).

refllm's default pipeline is `refllm.sampling.sample_token` (SPEC 3, Spin 3's order).
A backend that claims to follow another engine is checked against that engine's
order, written here from its upstream source, one function per step, each taking the
uniform draw ``u`` as an argument:

    PROFILES[name](logits, ids, params, u, **extras) -> token id

    name         order (after the model's logits z[V] and the ids so far)
    "spec"       penalty(last n) -> greedy | softmax(z/T) -> top-k -> top-p on the
                 WHOLE mass -> draw                                  (refllm.sampling)
    "spin"       the same sampling; Spin 3 differs in text, usage and embeddings only
    "hf"         penalty(whole sequence) -> greedy | z/T -> top-k -> top-p on the
                 RENORMALISED mass -> softmax -> draw
    "llama.cpp"  penalties(last n) -> top-k -> top-p -> min-p -> temperature LAST
                 (T <= 0 keeps the maximum) -> softmax -> draw

The same logits, ids and ``u`` give different tokens under different profiles; the
tests of this module (tests/test_profiles.py) show each difference on a hand-worked
case. Every profile draws the same way once its candidates are fixed: walk the kept
candidates in their order and take the first whose cumulative weight exceeds
``u * W`` (``W`` the kept weight), so that a backend's own RNG is the only thing left
out. Precision: the repeat penalty is float32 (as in every engine here, whose logits
are float32); everything after it is float64, so that the reference is never the less
precise side of a comparison.

Shape letters: V = vocabulary size, K = number of candidates still kept.


spin — Spin 3's local engine (spinframework/spin ``crates/llm-local``, candle 0.8)
-----------------------------------------------------------------------------------
Sampling is exactly SPEC 3 (``sample_token_spin`` is ``sampling.sample_token``), except
that Spin draws from an OS-seeded ChaCha ``StdRng``, so no seed reproduces it. What
differs is around the sampling (SPEC 2 and 6), where Spin's engine disagrees with the
WIT's words:

* ``text`` is the prompt followed by the completion (``spin_text``);
* ``prompt-token-count`` is prompt + generated tokens (``spin_usage``); the
  generated count is the same as refllm's (an EOS included);
* embeddings: tokenized with tokenizer.json as it is on disk (its own truncation,
  128 for all-MiniLM-L6-v2), padded to the longest text of the whole batch, run with
  NO attention mask, mean-pooled over all T positions padding included, the tanh
  GELU, ``x / |x|`` without epsilon; ``prompt-token-count`` is T, the padded length
  of the batch (``spin_embeddings_usage``). The vectors themselves are computed by
  ``refllm.embeddings.Embedder.embed(texts, profile="spin")``.

``spin_infer_result`` turns a spec result into the one Spin 3 returns for the same
generation.


hf — transformers ``generate`` and Text Generation Inference
-------------------------------------------------------------
From transformers ``src/transformers/generation/logits_process.py`` (read at 5.x:
``RepetitionPenaltyLogitsProcessor``, ``TemperatureLogitsWarper``,
``TopKLogitsWarper``, ``TopPLogitsWarper``) and TGI's ``HeterogeneousNextTokenChooser``
(``server/text_generation_server/utils/tokens.py``), which applies the same
processors in the same order:

1. `hf_repetition_penalty`: every distinct id of the WHOLE sequence (prompt and
   generated; there is no last-n window): ``z < 0 -> z * rp`` else ``z / rp``.
2. greedy (``do_sample=False``; here ``temperature <= 0``): ``argmax``, ties to the
   LOWEST id (``torch.argmax`` returns the first maximum; SPEC 3 takes the highest).
3. `hf_temperature`: ``z / T``.
4. `hf_top_k`: ``k = max(top_k, min_tokens_to_keep)``; remove every score strictly
   below the k-th largest (``scores < topk(scores, k)[-1]``), so ties at the k-th
   score are all kept and more than k candidates may survive.
5. `hf_top_p`: sort ascending, ``cumsum(softmax(sorted))``, remove where the
   cumulative mass ``<= 1 - top_p``, but never the last ``min_tokens_to_keep``. The
   softmax is over the scores that survived top-k: the mass is RENORMALISED, unlike
   SPEC 3 where top-p is measured against the whole softmax.
6. `hf_softmax` then `hf_draw`: ``torch.multinomial`` over the remaining probability
   mass. multinomial's own walk cannot be replayed from a single ``u``, so the draw
   here walks the candidates in SPEC 3's candidate order (descending probability,
   ties lower id first) and takes the first whose cumulative weight exceeds ``u * W``.

Each warper is applied only where transformers adds it: temperature when
``T != 1``, top-k when ``top_k < V``, top-p when ``top_p < 1``.


llama.cpp — the common sampler's default chain
----------------------------------------------
From ggml-org/llama.cpp master (read in 2025: ``common/common.h``,
``common_params_sampling::samplers``, at commit 001d906a; ``common/sampling.cpp``,
which builds the chain ``logit-bias -> samplers... -> dist``; and the samplers in
``src/llama-sampler.cpp``). The default order is

    penalties -> dry -> top-n-sigma -> top-k -> typical -> top-p -> min-p -> xtc
    -> temperature (temp-ext) -> dist

where dry, top-n-sigma, typical and xtc are off by default and left out here. The
defaults of ``common_params_sampling`` are top_k 40, top_p 0.95, min_p 0.05, temp 0.8,
penalty_last_n 64, penalty_repeat 1.0 (off), freq/present 0. The WIT's params map
onto them one to one; ``min_p`` (default 0.05, llama.cpp's), ``penalty_freq``,
``penalty_present`` and ``min_keep`` are extras. Older llama.cpp (before the
``llama_sampler`` chain of late 2024) applied the temperature before top-k, top-p and
min-p; this profile is the modern order.

1. `lcpp_penalties`: over the last ``last_n`` accepted tokens (llama.cpp's server
   accepts the prompt's tokens too, so the window spans prompt and generated ids, as
   in SPEC 3), for each token with ``count > 0``: ``z <= 0 -> z * rp`` else
   ``z / rp``; then ``z -= count * freq + present``.
2. `lcpp_top_k`: ``k <= 0`` keeps all; else sort by descending logit and keep the first
   ``min(k, K)``. No softmax, no renormalisation: top-k works on logits.
3. `lcpp_top_p`: ``p >= 1`` keeps all; else softmax over the CURRENT candidates (so
   over the top-k survivors, renormalised), sorted descending, keep up to and
   INCLUDING the first candidate where the running sum reaches ``p`` (``cum >= p``).
4. `lcpp_min_p`: ``p <= 0`` keeps all; else keep candidates with
   ``logit >= max_logit + log(p)``, i.e. ``prob >= p * max_prob``.
5. `lcpp_temperature`: ``T <= 0`` sets every logit but the (first) maximum to -inf,
   which makes the chain greedy; else ``z / T``. The temperature comes LAST, after
   every filter, so it reshapes only the kept candidates' distribution.
6. `lcpp_dist`: softmax over the kept candidates in their current order; the first
   whose cumulative weight reaches ``u * W`` (llama.cpp's ``sum_run >= sum_tgt``).
   Candidates of zero weight (the -inf of step 5) are never picked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from . import sampling
from .types import InferencingParams, InferencingResult, InferencingUsage

__all__ = [
    "PROFILES",
    "sample_token_spec",
    # spin
    "sample_token_spin", "spin_text", "spin_usage", "spin_infer_result", "spin_embeddings_usage",
    # hf
    "sample_token_hf", "hf_repetition_penalty", "hf_greedy", "hf_temperature", "hf_top_k", "hf_top_p",
    "hf_softmax", "hf_draw",
    # llama.cpp
    "sample_token_llama_cpp", "lcpp_penalties", "lcpp_top_k", "lcpp_top_p", "lcpp_min_p", "lcpp_temperature",
    "lcpp_dist", "lcpp_chain", "LLAMA_CPP_DEFAULT_MIN_P", "hf_scores",
    "distribution",
]


def _check_logits(logits) -> np.ndarray:  # [V] -> [V]
    z = np.asarray(logits)
    if z.ndim != 1 or z.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D array [V], got shape {z.shape}")
    if np.isnan(z).any() or np.isposinf(z).any():
        raise ValueError("logits must not contain NaN or +inf")
    return z


def _check_u(u) -> float:
    if u is None or not 0.0 <= u < 1.0:
        raise ValueError(f"the sampling path needs a draw u in [0, 1), got {u!r}")
    return float(u)


def _walk(kept_ids: np.ndarray, weights: np.ndarray, u: float, inclusive: bool) -> int:  # [K], [K], () -> ()
    """The first candidate (of positive weight) whose cumulative weight exceeds ``u * W``
    (``>=`` with ``inclusive``, llama.cpp's comparison)."""
    w = np.asarray(weights, dtype=np.float64)  # [K]
    pos = w > 0
    kept_ids, w = kept_ids[pos], w[pos]  # [K+]
    cum = np.cumsum(w)  # [K+] sequential
    target = np.float64(u) * cum[-1]
    i = int(np.searchsorted(cum, target, side="left" if inclusive else "right"))
    return int(kept_ids[min(i, len(cum) - 1)])


# ===================================================================== spec

sample_token_spec = sampling.sample_token


# ===================================================================== spin

def sample_token_spin(logits, ids: Sequence[int], params: InferencingParams, u: float | None, **extras) -> int:
    """Spin 3's sampling: exactly SPEC 3 (`refllm.sampling.sample_token`)."""
    if extras:
        raise TypeError(f"the spin profile takes no extras, got {sorted(extras)}")
    return sampling.sample_token(logits, ids, params, u)


def spin_text(prompt: str, text: str) -> str:
    """Spin 3's `text`: the prompt followed by the completion."""
    return prompt + text


def spin_usage(usage: InferencingUsage) -> InferencingUsage:
    """Spin 3's inferencing usage: prompt-token-count = prompt + generated tokens."""
    return InferencingUsage(prompt_token_count=usage.prompt_token_count + usage.generated_token_count,
                            generated_token_count=usage.generated_token_count)


def spin_infer_result(result: InferencingResult, prompt: str) -> InferencingResult:
    """What Spin 3's engine returns for the generation that gave the spec `result`."""
    return InferencingResult(text=spin_text(prompt, result.text), usage=spin_usage(result.usage),
                             seed=result.seed, finish_reason=result.finish_reason)


def spin_embeddings_usage(token_lengths: Sequence[int]) -> int:
    """Spin 3's embeddings prompt-token-count: T, the padded length of the batch, i.e. the
    longest text's token count (with Spin's own tokenizer truncation), whatever the
    number of texts."""
    if len(token_lengths) == 0:
        raise ValueError("no texts")
    return int(max(token_lengths))


# ===================================================================== hf

def hf_repetition_penalty(logits, ids: Sequence[int], penalty: float) -> np.ndarray:  # [V], ids -> [V] float32
    """RepetitionPenaltyLogitsProcessor: each distinct id of the whole sequence once,
    ``z * rp`` where ``z < 0`` else ``z / rp``; float32, a new array."""
    z = np.array(logits, dtype=np.float32)  # [V] a copy
    if not (math.isfinite(penalty) and penalty > 0):
        raise ValueError(f"repetition penalty must be a finite number > 0, got {penalty!r}")
    seen = sampling.as_ids(ids, len(z))  # [n] int64, checked
    if penalty == 1.0 or len(seen) == 0:
        return z
    window = np.unique(seen)  # [n_distinct] the WHOLE sequence, no last-n
    rp = np.float32(penalty)
    zw = z[window]
    z[window] = np.where(zw < 0, zw * rp, zw / rp)
    return z


def hf_greedy(scores) -> int:  # [V] -> ()
    """``torch.argmax``: among equal maxima, the LOWEST id (SPEC 3 takes the highest)."""
    return int(np.argmax(np.asarray(scores)))


def hf_temperature(scores, temperature: float) -> np.ndarray:  # [V] -> [V] float64
    """TemperatureLogitsWarper: ``scores / T`` (float64)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 on the sampling path, got {temperature!r}")
    return np.asarray(scores, dtype=np.float64) / np.float64(temperature)


def hf_top_k(scores, top_k: int, min_tokens_to_keep: int = 1) -> np.ndarray:  # [V] -> [V] float64
    """TopKLogitsWarper: -inf for every score strictly below the k-th largest; ties at
    the k-th score survive, so more than k may be kept."""
    x = np.array(scores, dtype=np.float64)  # [V]
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k!r}")
    k = min(max(int(top_k), min_tokens_to_keep), len(x))
    kth = np.partition(x, len(x) - k)[len(x) - k]  # () the k-th largest score
    x[x < kth] = -np.inf
    return x


def hf_top_p(scores, top_p: float, min_tokens_to_keep: int = 1) -> np.ndarray:  # [V] -> [V] float64
    """TopPLogitsWarper: sort ascending, cumulative softmax mass, remove where it is
    ``<= 1 - top_p``, keep at least the last ``min_tokens_to_keep``. The softmax is over
    the scores as they are (-inf from top-k has mass 0): the RENORMALISED mass. Equal
    scores are sorted lower id first (``torch.sort`` leaves their order unspecified, which
    matters only when the cut falls between two equal scores)."""
    x = np.array(scores, dtype=np.float64)  # [V]
    order = np.argsort(x, kind="stable")  # [V] ascending; ties: lower id first
    cum = np.cumsum(hf_softmax(x[order]))  # [V] ascending cumulative mass
    remove = cum <= (1.0 - float(top_p))  # [V] in sorted order
    remove[len(x) - min_tokens_to_keep:] = False
    x[order[remove]] = -np.inf
    return x


def hf_softmax(scores) -> np.ndarray:  # [V] -> [V] float64
    """``softmax(scores)`` in float64; -inf scores get probability 0."""
    x = np.asarray(scores, dtype=np.float64)
    e = np.exp(x - np.max(x))
    return e / np.sum(e)


def hf_draw(probs, u: float) -> int:  # [V], () -> ()
    """multinomial's draw, replayable: the candidates of positive probability in
    descending order (ties, lower id first), the first whose cumulative probability
    exceeds ``u * W``."""
    p = np.asarray(probs, dtype=np.float64)  # [V]
    order = np.argsort(-p, kind="stable")  # [V]
    return _walk(order, p[order], _check_u(u), inclusive=False)


def hf_scores(logits, ids: Sequence[int], params: InferencingParams, *, min_tokens_to_keep: int = 1) -> np.ndarray:
    """Steps 1 and 3-5 on the sampling path: the warped scores [V] float64 (-inf where removed)."""
    z = _check_logits(logits)
    z = hf_repetition_penalty(z, ids, params.repeat_penalty)  # 1. [V] float32
    x = np.asarray(z, dtype=np.float64)  # [V]
    if params.temperature != 1.0:
        x = hf_temperature(x, params.temperature)  # 3.
    if params.top_k < len(x):
        x = hf_top_k(x, params.top_k, min_tokens_to_keep)  # 4.
    if params.top_p < 1.0:
        x = hf_top_p(x, params.top_p, min_tokens_to_keep)  # 5.
    return x


def sample_token_hf(logits, ids: Sequence[int], params: InferencingParams, u: float | None, *,
                    min_tokens_to_keep: int = 1) -> int:
    """transformers / TGI: penalty over the whole sequence (``repeat_penalty_last_n_token_count``
    is ignored), then greedy, or temperature, top-k, top-p on the renormalised mass,
    softmax and the draw ``u``."""
    if params.temperature <= 0:
        return hf_greedy(hf_repetition_penalty(_check_logits(logits), ids, params.repeat_penalty))  # 1., 2.
    x = hf_scores(logits, ids, params, min_tokens_to_keep=min_tokens_to_keep)  # 1., 3.-5. [V]
    return hf_draw(hf_softmax(x), _check_u(u))  # 6.


# ===================================================================== llama.cpp

LLAMA_CPP_DEFAULT_MIN_P = 0.05  # common_params_sampling::min_p


def lcpp_penalties(logits, ids: Sequence[int], last_n: int, repeat: float, freq: float = 0.0,
                   present: float = 0.0) -> np.ndarray:  # [V], ids -> [V] float32
    """llama_sampler_penalties: counts over the last ``last_n`` ids; for a counted token,
    ``z <= 0 -> z * repeat`` else ``z / repeat``, then ``z -= count * freq + present``."""
    z = np.array(logits, dtype=np.float32)  # [V] a copy
    seen = sampling.as_ids(ids, len(z))
    if last_n == 0 or (repeat == 1.0 and freq == 0.0 and present == 0.0) or len(seen) == 0:
        return z
    window = seen[-last_n:] if last_n > 0 else seen  # llama.cpp: -1 means the whole context
    tokens, counts = np.unique(window, return_counts=True)  # [n], [n]
    zw = z[tokens]
    rp = np.float32(repeat)
    zw = np.where(zw <= 0, zw * rp, zw / rp)
    zw = zw - (counts.astype(np.float32) * np.float32(freq) + np.float32(present))
    z[tokens] = zw.astype(np.float32)
    return z


def _sorted(cand_ids, cand_logits):  # [K], [K] -> [K], [K] by descending logit, ties lower id first
    order = np.lexsort((cand_ids, -np.asarray(cand_logits, dtype=np.float64)))
    return cand_ids[order], cand_logits[order]


def lcpp_top_k(cand_ids, cand_logits, k: int):  # [K], [K] -> [K'], [K']
    """llama_sampler_top_k: ``k <= 0`` keeps all (unsorted); else sorted by descending
    logit (ties lower id first) and cut to ``min(k, K)``. Works on logits."""
    if k <= 0:
        return cand_ids, cand_logits
    ids, z = _sorted(cand_ids, cand_logits)
    k = min(int(k), len(ids))
    return ids[:k], z[:k]


def lcpp_top_p(cand_ids, cand_logits, p: float, min_keep: int = 1):  # [K], [K] -> [K'], [K']
    """llama_sampler_top_p: softmax over the current candidates (renormalised), sorted
    descending; keep through the first candidate where the running sum reaches ``p``."""
    if p >= 1.0:
        return cand_ids, cand_logits
    ids, z = _sorted(cand_ids, cand_logits)
    cum = np.cumsum(hf_softmax(z))  # [K] sequential
    hit = np.nonzero((cum >= p) & (np.arange(1, len(z) + 1) >= min_keep))[0]
    last = int(hit[0]) + 1 if len(hit) else len(z)
    return ids[:last], z[:last]


def lcpp_min_p(cand_ids, cand_logits, p: float, min_keep: int = 1):  # [K], [K] -> [K'], [K']
    """llama_sampler_min_p: keep ``logit >= max_logit + log(p)`` (``prob >= p * max_prob``),
    in the current order; if fewer than ``min_keep`` survive, the ``min_keep`` best."""
    if p <= 0 or len(cand_ids) == 0:
        return cand_ids, cand_logits
    z = np.asarray(cand_logits, dtype=np.float64)
    keep = z >= np.max(z) + math.log(p)
    if np.count_nonzero(keep) >= min_keep:
        return cand_ids[keep], cand_logits[keep]
    ids, zs = _sorted(cand_ids, cand_logits)
    return ids[:min_keep], zs[:min_keep]


def lcpp_temperature(cand_ids, cand_logits, temperature: float):  # [K], [K] -> [K], [K] float64
    """llama_sampler_temp(_ext): ``T <= 0`` leaves only the first maximum finite (the rest
    -inf: greedy); else ``z / T``."""
    z = np.array(cand_logits, dtype=np.float64)
    if temperature <= 0:
        i = int(np.argmax(z))  # the first maximum in the current order
        out = np.full_like(z, -np.inf)
        out[i] = z[i]
        return cand_ids, out
    return cand_ids, z / np.float64(temperature)


def lcpp_dist(cand_ids, cand_logits, u: float) -> int:  # [K], [K], () -> ()
    """llama_sampler_dist: softmax in the current order; the first candidate whose
    cumulative weight reaches ``u * W``."""
    return _walk(np.asarray(cand_ids), hf_softmax(cand_logits), _check_u(u), inclusive=True)


def lcpp_chain(logits, ids: Sequence[int], params: InferencingParams, *, min_p: float = LLAMA_CPP_DEFAULT_MIN_P,
               min_keep: int = 1, penalty_freq: float = 0.0, penalty_present: float = 0.0):
    """Steps 1-5 of the chain: the candidates `lcpp_dist` draws from and their logits. [V] -> [K], [K]"""
    z = _check_logits(logits)
    z = lcpp_penalties(z, ids, params.repeat_penalty_last_n_token_count, params.repeat_penalty,
                       penalty_freq, penalty_present)  # 1. [V] float32
    cand_ids, cand = np.arange(len(z)), z.astype(np.float64)  # [V], [V] in id order, unsorted
    top_k = params.top_k if params.top_k < 2**31 else 0  # int32 in llama.cpp; beyond it: all
    cand_ids, cand = lcpp_top_k(cand_ids, cand, top_k)  # 2. [K]
    cand_ids, cand = lcpp_top_p(cand_ids, cand, params.top_p, min_keep)  # 3.
    cand_ids, cand = lcpp_min_p(cand_ids, cand, min_p, min_keep)  # 4.
    return lcpp_temperature(cand_ids, cand, params.temperature)  # 5.


def sample_token_llama_cpp(logits, ids: Sequence[int], params: InferencingParams, u: float | None,
                           **extras) -> int:
    """llama.cpp's default chain: penalties, top-k, top-p, min-p, temperature, dist.
    Extras (`lcpp_chain`): min_p (default 0.05, llama.cpp's), min_keep, penalty_freq,
    penalty_present.

    On the greedy path (``temperature <= 0``) ``u`` may be None: the chain leaves one
    candidate and any draw picks it."""
    cand_ids, cand = lcpp_chain(logits, ids, params, **extras)  # 1.-5. [K], [K]
    if params.temperature <= 0 and u is None:
        u = 0.0
    return lcpp_dist(cand_ids, cand, u)  # 6.


# ===================================================================== the table

PROFILES = {
    "spec": sample_token_spec,
    "spin": sample_token_spin,
    "hf": sample_token_hf,
    "llama.cpp": sample_token_llama_cpp,
}


# ===================================================================== distributions

def distribution(profile: str, logits, ids: Sequence[int], params: InferencingParams, **extras) -> np.ndarray:
    """The exact probability of each next token [V] float64 on the sampling path
    (``temperature > 0``) under `profile`: the weights its draw walks, normalised. This is
    what a backend with its own RNG is tested against (`refllm.conform.stats`)."""
    if not params.temperature > 0:
        raise ValueError("a distribution exists on the sampling path only (temperature > 0)")
    z = _check_logits(logits)
    out = np.zeros(len(z), dtype=np.float64)  # [V]
    if profile in ("spec", "spin"):
        if extras:
            raise TypeError(f"the {profile} profile takes no extras, got {sorted(extras)}")
        from .logprobs import kept_candidates

        kept, w = kept_candidates(z, ids, params)  # [K], [K] not renormalised
        out[kept] = np.asarray(w, dtype=np.float64) / np.cumsum(w)[-1]
    elif profile == "hf":
        out = hf_softmax(hf_scores(z, ids, params, **extras))
    elif profile == "llama.cpp":
        cand_ids, cand = lcpp_chain(z, ids, params, **extras)
        out[np.asarray(cand_ids)] = hf_softmax(cand)
    else:
        raise ValueError(f"profile {profile!r} is not one of {', '.join(PROFILES)}")
    return out
