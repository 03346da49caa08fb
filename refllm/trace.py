"""Traces: one `infer`, shown step by step through SPEC 3's sampling pipeline.

    t = trace("smollm2-135m-instruct", "The capital of France is", params, seed=1)
    print_trace(t)                     # a terminal table per generated token
    t.to_dict()                        # the same, as JSON-ready data

For every generated token the trace shows what a backend author needs to find where
their engine parts from the reference:

    logits       the model's top-n logits (float32, as sampled from)
    penalty      the top-n after the repeat penalty, penalised ids marked, and the window
    softmax      the top-n probabilities of softmax(z / T)            (sampling path)
    top-k        how many candidates are kept and their mass          (not renormalised)
    top-p        how many survive the top-p walk and their mass
    candidates   the kept candidates with p, the renormalised weight and the interval
                 [lo, hi) of u that picks each one
    draw         u, and the token it picks; on the greedy path the argmax and its margin

The trace re-runs `refllm.sampling`'s step functions on the logits that `infer`
recorded (`Generation.steps`), so it shows exactly the numbers that chose each token,
and checks that the pipeline picks the token `infer` picked.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Sequence, TextIO

import numpy as np

from . import api, logprobs, sampling
from .types import InferencingParams


@dataclass
class Candidate:
    id: int
    text: str
    value: float  # a logit or a probability, depending on the stage
    marked: bool = False  # penalised (in the penalty stage)


@dataclass
class Kept:
    id: int
    text: str
    p: float  # softmax probability (not renormalised)
    weight: float  # p / W, the renormalised weight the draw uses
    lo: float  # u in [lo, hi) picks this candidate
    hi: float


@dataclass
class TraceStep:
    index: int
    token: int
    text: str
    u: float | None
    logits: list[Candidate]  # top-n raw logits
    penalized: list[Candidate]  # top-n after the repeat penalty
    penalty_window: list[int]  # the distinct ids penalised ([] when the penalty is off)
    greedy: bool
    penalty_changes: list[tuple[int, str, float, float]] = field(default_factory=list)  # raw top-n ids penalised:
    #                                                     (id, text, logit before, after)
    margin: float | None = None  # greedy: penalised logit gap to the runner-up
    probs: list[Candidate] = field(default_factory=list)  # top-n softmax(z/T)
    top_k_kept: int | None = None
    top_k_mass: float | None = None
    top_p_kept: int | None = None
    top_p_mass: float | None = None
    candidates: list[Kept] = field(default_factory=list)  # the first n kept candidates


@dataclass
class Trace:
    model: str
    prompt: str
    params: InferencingParams
    seed: int
    prompt_ids: list[int]
    steps: list[TraceStep]
    text: str
    usage: dict
    finish_reason: str | None
    top: int

    def to_dict(self) -> dict:
        return asdict(self)


def _top(llm, values: np.ndarray, n: int, marked: set[int] = frozenset()) -> list[Candidate]:  # [V] -> n
    return [Candidate(i, llm.decode([i]), float(values[i]), i in marked) for i, _ in logprobs.top_n(values, n)]


def trace_step(llm, index: int, logits: np.ndarray, ids: Sequence[int], params: InferencingParams, u, token: int,
               top: int = 10) -> TraceStep:
    """One step of the pipeline, every stage recorded; checks it picks `token`."""
    z = np.asarray(logits, dtype=np.float32)  # [V]
    rp, last_n = params.repeat_penalty, params.repeat_penalty_last_n_token_count
    zp = sampling.apply_repeat_penalty(z, ids, rp, last_n)  # 1. [V]
    window = logprobs.penalty_window(ids, rp, last_n).tolist()  # the distinct ids penalised
    step = TraceStep(index, int(token), llm.decode([int(token)]), u, _top(llm, z, top),
                     _top(llm, zp, top, set(window)), window, greedy=not sampling.needs_draw(params))
    step.penalty_changes = [(c.id, c.text, float(z[c.id]), float(zp[c.id])) for c in step.logits if c.id in set(window)]
    if step.greedy:
        chosen = sampling.greedy(zp)  # 2.
        step.margin = float(np.float64(zp[chosen]) - np.max(np.delete(zp, chosen).astype(np.float64)))
    else:
        p = sampling.softmax_with_temperature(zp, params.temperature)  # 3. [V] float64
        step.probs = _top(llm, p, top)
        ids_k, p_k = sampling.top_k_candidates(p, params.top_k)  # 4. [K]
        step.top_k_kept, step.top_k_mass = len(ids_k), float(np.cumsum(p_k)[-1])
        ids_p, p_p = sampling.top_p_filter(ids_k, p_k, params.top_p)  # 5. [K']
        step.top_p_kept, step.top_p_mass = len(ids_p), float(np.cumsum(p_p)[-1])
        lo, hi = logprobs.u_intervals(p_p)  # [K'], [K']
        W = np.cumsum(p_p)[-1]
        for i in range(min(top, len(ids_p))):
            step.candidates.append(Kept(int(ids_p[i]), llm.decode([int(ids_p[i])]), float(p_p[i]), float(p_p[i] / W),
                                        float(lo[i]), float(hi[i])))
        chosen = sampling.draw(ids_p, p_p, u)  # 6.
    if chosen != token:
        raise AssertionError(f"step {index}: the pipeline picks {chosen}, infer picked {token}")
    return step


def trace(model: str, prompt: str, params: InferencingParams | None = None, seed: int | None = None, *,
          top: int = 10, precision: str | None = None, backend: str | None = None, models_dir=None,
          stop: Sequence[str] = ()) -> Trace:
    """Run one `refllm.infer` and trace every generated token through SPEC 3."""
    params = params or InferencingParams()
    gen = api.infer_stream(model, prompt, params, seed=seed, stop=stop, precision=precision, backend=backend,
                           models_dir=models_dir)
    result = gen.run()
    ids = list(gen.prompt_ids)
    steps = []
    for i, s in enumerate(gen.steps):
        steps.append(trace_step(gen.llm, i, s.logits, ids, params, s.u, s.token, top))
        ids.append(s.token)
    return Trace(model, prompt, params, gen.seed, list(gen.prompt_ids), steps, result.text,
                 {"prompt_token_count": result.usage.prompt_token_count,
                  "generated_token_count": result.usage.generated_token_count}, result.finish_reason, top)


# ----------------------------------------------------------------------------- printing

def _q(s: str, width: int = 12) -> str:
    r = repr(s)
    return r if len(r) <= width else r[: width - 2] + "…" + r[-1]


def _row(cands: Sequence[Candidate], fmt: str, n: int) -> str:
    return "  ".join(f"{c.id}{'*' if c.marked else ''} {_q(c.text)} {format(c.value, fmt)}" for c in cands[:n])


def print_trace(t: Trace, file: TextIO | None = None, width: int = 5) -> None:
    """The trace as a table per step; `width` candidates per line of logits/probabilities."""
    out = file or sys.stdout
    p = t.params
    w = lambda s="": print(s, file=out)  # noqa: E731
    w(f"trace  {t.model}  seed {t.seed}  max-tokens {p.max_tokens}  temperature {p.temperature}  top-k {p.top_k}  "
      f"top-p {p.top_p}  repeat-penalty {p.repeat_penalty} over {p.repeat_penalty_last_n_token_count}")
    more = " …" if len(t.prompt_ids) > 16 else ""
    w(f"prompt ({len(t.prompt_ids)} tokens) {_q(t.prompt, 60)}  ids {t.prompt_ids[:16]}{more}")
    for s in t.steps:
        w()
        head = f"step {s.index}  -> {s.token} {_q(s.text, 20)}"
        w(head + ("   greedy" if s.greedy else f"   u = {s.u:.6f}"))
        w(f"  logits      {_row(s.logits, '.4f', width)}")
        if s.penalty_window:
            w(f"  penalty     {_row(s.penalized, '.4f', width)}   (* penalised; window of {len(s.penalty_window)} ids)")
            for i, text, before, after in s.penalty_changes[:width]:
                w(f"              {i} {_q(text)} {before:.4f} -> {after:.4f}")
        else:
            w("  penalty     off")
        if s.greedy:
            w(f"  argmax      {s.token} {_q(s.text)}   margin to the runner-up {s.margin:.6g}")
            continue
        w(f"  softmax/T   {_row(s.probs, '.4f', width)}")
        w(f"  top-k {p.top_k:<6}kept {s.top_k_kept}, mass {s.top_k_mass:.6f} (not renormalised)")
        w(f"  top-p {p.top_p:<6}kept {s.top_p_kept}, mass {s.top_p_mass:.6f}")
        w(f"  {'#':>3} {'id':>7}  {'token':<14} {'p':>10} {'weight':>10}   u interval")
        for i, c in enumerate(s.candidates):
            arrow = "  <- u" if c.id == s.token else ""
            w(f"  {i:>3} {c.id:>7}  {_q(c.text, 14):<14} {c.p:>10.6f} {c.weight:>10.6f}   "
              f"[{c.lo:.6f}, {c.hi:.6f}){arrow}")
        if s.top_p_kept and s.top_p_kept > len(s.candidates):
            w(f"  ... {s.top_p_kept - len(s.candidates)} more candidates")
    w()
    w(f"text {_q(t.text, 80)}")
    w(f"usage prompt {t.usage['prompt_token_count']}, generated {t.usage['generated_token_count']}; "
      f"finish {t.finish_reason}")


__all__ = ["trace", "trace_step", "print_trace", "Trace", "TraceStep", "Candidate", "Kept"]
