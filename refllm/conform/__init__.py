"""Conformance: replay a golden set against a running backend over HTTP and say, case by
case, where it parts from the reference.

    code = conform("http://127.0.0.1:3000", dialect="spin")          # the built-in set
    code = conform(url, "tgi", golden_dir="golden/", report="r.json")
    refllm conform --against URL --dialect spin|tgi|openai [--golden DIR] [--token T]
                   [--report FILE] [--profile spec|spin|hf|llama.cpp] [--backend NAME]
                   [--case NAME ...] [--skip embed|error|sampled|greedy ...]
                   [--sampled strict|stats|info|skip] [--stats-n N]

The package: `transport` (HTTP, every exchange recorded), `backends` (what each engine
reads and does, as data), `dialects` (case -> request, answer -> `Got`), `checks` (one
per kind of case), `stats` (the statistical check of sampling), `report` (summary, table,
JSON).

What is sent in each dialect (`--token T` adds ``authorization: bearer T``) is written
once, in `refllm.conform.dialects`' docstring.

`--backend` (refllm, llama-cpp-python, llama-server, tgi, vllm, openai) picks the entry
of `backends.BACKENDS` the requests are written and scored by; without it the profile
names one (llama.cpp over openai: llama-cpp-python; hf: tgi or vllm; else refllm).

A case a dialect or backend cannot express is skipped and says why: a backend that
penalises the whole sequence cannot hold a shorter window, llama-cpp-python's window
holds only generated tokens; at least one new token is needed (max-tokens 0 is
skipped); OpenAI caps the temperature at 2. `--skip KIND` leaves out a kind of case:
embed, error, sampled or greedy (e.g. `--skip embed` for an LLM-only server).

What is checked, per case:

* generation — the exact-match length: how many of the reference's tokens the backend
  reproduced, compared by token id where the dialect returns ids (TGI ``details``), by
  token text where it returns token texts (OpenAI ``logprobs``), else by the text (each
  reference step's text must be a prefix of the backend's). At the first divergence:
  both tokens (the backend's re-tokenized from its text with the golden set's
  tokenizer.json when the dialect gives no ids), refllm's margin there (greedy: the
  penalised float64 logit gap to the runner-up, and to the backend's token when that is
  among the reference's top 20; sampled: the distance of ``u`` to the nearer end of the
  chosen token's interval) and a diagnosis. Then the text, the usage, and the
  log-probabilities where the dialect returns them (accepted against either
  convention: of the raw logits, or of the logits after the repeat penalty). Texts are
  compared in whole characters (a token ending inside a UTF-8 character is U+FFFD to
  some backends and nothing to llama-cpp-python). max-tokens, the usage and the finish
  reason are checked always, also after a divergence.
* embeddings — the cosine of every vector to the float64 reference, the norms, the usage.
* errors — every bad input must be answered with an error (a 4xx; Spin's dialect may
  also answer ``{"error": ...}``), of the WIT variant the golden set records where the
  dialect carries one (refllm's Spin dialect does, as ``"variant"``).

Thresholds (`THRESHOLDS`; a case fails, and the exit code is 1, when one is crossed):

    tie_logit   2e-3    a greedy divergence where refllm's logit gap is below this is a
                        near tie (float32 backends' logits are ~2e-4 off float64), a warning
    tie_u       1e-4    a sampled divergence with u this close to an interval's end: a near tie
                        (float32 sums over thousands of candidates are ~1e-5 off)
    logprob     2e-3    max |backend logprob - reference| over the compared steps
    cosine      0.99999 minimum cosine of an embedding to the float64 reference
    norm        1e-3    max | |v| - 1 | of an embedding

    alpha       1e-3    the statistical check's false-alarm rate (`stats`)

Every generated token, text and usage must match otherwise (a near tie ends the
comparison of that case with a warning). Sampled cases: under ``--profile spec`` the
backend must draw ``u`` as SPEC 3 does from the request's seed, and they are compared
token by token ("strict"); under the other profiles, whose engines draw from their own
RNGs, each is checked by statistics ("stats"): N one-token generations under N seeds,
a G-test of the first token's counts against the claimed sampler's exact distribution
(`stats`). ``sampled="strict" | "stats" | "info" | "skip"`` overrides. A case that fails
only in ways its backend is documented to (`backends.Backend.known`, the README's
table) is "known", named with its cause, and does not fail the run. Exit codes: 0 every
scored case passed (warnings and known behaviours allowed), 1 some failed, 2 the
backend or the golden set could not be used.

Profiles (``--profile``, the behaviour the backend claims, SPEC 6 and `refllm.profiles`):

    spec       SPEC 2-4 (the default)
    spin       Spin 3's engine: text = prompt + completion, prompt-token-count = prompt
               + generated; embeddings pooled without the mask, tanh GELU, usage = the
               padded batch length (the golden set's "spin" expectations)
    hf         transformers/TGI/vLLM: the penalty covers the whole sequence (cases with a
               shorter window are skipped); sampled cases by statistics, transformers' order
    llama.cpp  llama.cpp's chain: greedy cases as spec; sampled cases by statistics,
               llama.cpp's order (`refllm.profiles.lcpp_chain`, min-p sent as 0)

Faults named in the report (``faults``): repeat-penalty (the backend picked the
unpenalised argmax: its penalty is missing, or its window leaves out the prompt),
unrequested-penalty (a penalty nobody asked for, e.g. a server default), token-mismatch,
stopped-early, did-not-stop, max-tokens (more tokens than max_tokens), finish-reason,
detokenize (same tokens, other text), text-includes-prompt, text-without-prompt,
logprobs (the backend's logits differ from the reference; a small drift with agreeing
tokens is named as 16-bit arithmetic), sampling-distribution, sampling-impossible-token, usage-spin3 (usage counted like Spin 3),
usage-not-spin3, usage-prompt, usage-generated, usage, embeddings,
embeddings-padding (the padded texts of a batch are off while the longest is right:
padding leaks through the attention mask or the pooling), embeddings-not-normalised,
embeddings-count, error-not-raised, error-status (a bad input answered with a 5xx),
error-variant, http-error, transport.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable, TextIO

from ..errors import LLMError
from ..golden import Golden, builtin_golden_dir, load_golden
from .backends import BACKENDS, Backend, backend_for
from .checks import (Context, _fault, _finish, _new_result, _Tokenizers, check_embed, check_error, check_generate,
                     cosine, whole_chars)
from .dialects import DIALECT_CLASSES, OpenAIDialect, Skip, SpinDialect, TgiDialect
from .report import _jsonable, print_table, summarize
from .transport import Transport, Unreachable

THRESHOLDS = {"tie_logit": 2e-3, "tie_u": 1e-4, "logprob": 2e-3, "cosine": 0.99999, "norm": 1e-3, "alpha": 1e-3}
DIALECTS = ("spin", "tgi", "openai")
PROFILES = ("spec", "spin", "hf", "llama.cpp")
SKIPPABLE = ("embed", "error", "sampled", "greedy")
REPORT_VERSION = 2  # 2: exchanges, known, stats, backend

CHECKS = {"generate": check_generate, "embed": check_embed, "error": check_error}


def _kind(case: dict) -> str:
    if case["kind"] == "generate":
        return "sampled" if case["sampling"] else "greedy"
    if case["kind"] == "error" and case.get("op") == "generate_embeddings":
        return "embed"  # an LLM-only server has no embeddings to refuse
    return case["kind"]


def _known(res: dict, backend: Backend | None) -> None:
    """A failure made only of the backend's documented behaviours becomes "known"."""
    if backend is None or res["status"] != "fail" or not res["faults"]:
        return
    causes = [backend.known.get((res["name"], f)) for f in res["faults"]]
    if all(causes):
        res["status"] = "known"
        res["known"] = list(dict.fromkeys(causes))


def run_checks(golden: Golden, ctx: Context, names: Iterable[str] | None = None, progress: TextIO | None = None,
               skip: Iterable[str] = ()):
    names = None if names is None else list(names)
    skip = set(skip)
    bad = skip - set(SKIPPABLE)
    if bad:
        raise ValueError(f"cannot skip {sorted(bad)}: the kinds are {', '.join(SKIPPABLE)}")
    cases = golden.cases if names is None else [c for c in golden.cases if c["name"] in names]
    if names is not None:
        missing = sorted(set(names) - {c["name"] for c in cases})
        if missing:
            raise ValueError(f"no such case(s) in the golden set: {', '.join(missing)}")
    results = []
    for case in cases:
        try:
            if _kind(case) in skip:
                raise Skip(f"left out (--skip {_kind(case)})")
            res = CHECKS[case["kind"]](case, ctx)
        except Skip as e:
            res = _new_result(case)
            res.update(status="skip", scored=False, notes=[str(e)])
        except Unreachable:
            raise
        except Exception as e:  # noqa: BLE001 - a malformed answer fails the case, not the run
            res = _new_result(case)
            _fault(res, "transport", f"{type(e).__name__}: {e}")
            _finish(res)
        _known(res, ctx.backend)
        res["exchanges"] = ctx.transport.take_exchanges()
        results.append(res)
        if progress is not None:
            print(f"conform: {case['name']}: {res['status']}", file=progress)
    return results


def conform(against_url: str, dialect: str = "spin", golden_dir=None, token: str | None = None,
            profile: str = "spec", report=None, *, cases: Iterable[str] | None = None, models_root=None,
            sampled: str | None = None, timeout: float = 600.0, thresholds: dict | None = None,
            model_map: dict | None = None, out: TextIO | None = None, progress: bool = False,
            backend: str | None = None, skip: Iterable[str] = (), stats_n: int | None = None) -> int:
    """Replay a golden set (the built-in one when `golden_dir` is None, generated into the
    cache from the models under `models_root` on first use) against the backend at
    `against_url`; print a summary table to `out` (stdout), write the JSON report to
    `report` if given, and return the exit code (0 pass, 1 fail, 2 unusable)."""
    out = out or sys.stdout
    if dialect not in DIALECTS:
        raise ValueError(f"dialect {dialect!r} is not one of {', '.join(DIALECTS)}")
    if profile not in PROFILES:
        raise ValueError(f"profile {profile!r} is not one of {', '.join(PROFILES)}")
    be = backend_for(profile, dialect, backend)
    if sampled is None:
        sampled = "strict" if profile == "spec" else "stats"
    if sampled not in ("strict", "stats", "info", "skip"):
        raise ValueError(f"sampled={sampled!r} is not one of strict, stats, info, skip")
    try:
        gdir = Path(golden_dir) if golden_dir is not None else builtin_golden_dir(models_root, progress=progress)
        golden = load_golden(gdir)
    except (OSError, ValueError, LLMError) as e:  # LLMError: no local models to build the built-in set
        print(f"conform: cannot use the golden set: {e}", file=out)
        return 2
    th = {**THRESHOLDS, **(thresholds or {})}
    transport = Transport(against_url, token=token, timeout=timeout)
    ctx = Context(golden, DIALECT_CLASSES[dialect](golden, be), transport, profile, sampled, th, _Tokenizers(golden),
                  dict(model_map or {}), backend=be, models_root=models_root, stats_n=stats_n)
    try:
        results = run_checks(golden, ctx, cases, progress=sys.stderr if progress else None, skip=skip)
    except Unreachable as e:
        print(f"conform: {e}", file=out)
        return 2
    finally:
        transport.close()
    summary = summarize(results)
    print_table(results, summary, out)
    if report is not None:
        doc = {"report_version": REPORT_VERSION, "against": against_url, "dialect": dialect, "profile": profile,
               "backend": be.name, "sampled": sampled, "skip": sorted(set(skip)), "thresholds": th,
               "requests": transport.requests,
               "golden": {"dir": str(golden.dir), **{k: golden.header.get(k) for k in
                                                     ("suite", "suite_version", "refllm_version", "spec_version")}},
               "summary": summary, "cases": results}
        Path(report).write_text(json.dumps(_jsonable(doc), ensure_ascii=False, indent=1, allow_nan=False) + "\n",
                                encoding="utf-8")
    return summary["exit_code"]


__all__ = ["conform", "run_checks", "summarize", "print_table", "THRESHOLDS", "DIALECTS", "PROFILES", "SKIPPABLE",
           "Transport", "SpinDialect", "TgiDialect", "OpenAIDialect", "Unreachable", "Skip", "BACKENDS", "Backend",
           "backend_for", "cosine", "whole_chars"]
