"""conform's checks: one function per kind of case (generate, embed, error), each
returning a result dict with its verdict, its evidence and the faults it found.

Generation is compared by token id where the backend returns ids, by token text where it
returns token texts, else by the text; texts are compared as the bytes that make whole
characters (a token that ends inside a UTF-8 character is the empty string to
llama-cpp-python and U+FFFD to others: both are the same token). The usage, max-tokens
and finish reason are checked always, also after a divergence. Sampled cases are
scored token by token under the spec profile (the backend draws SPEC 3's ``u``), by
the statistical check (`stats`) otherwise.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .. import logprobs
from ..golden import Golden, params_from_json
from ..types import InferencingParams
from . import stats
from .backends import Backend
from .dialects import Dialect, Got, Skip, penalty_mode
from .transport import Response, Transport

# ----------------------------------------------------------------------------- reference arithmetic

def _penalize(logit: float, token: int, ids: Sequence[int], params: InferencingParams) -> float:
    """SPEC 3 step 1 for one token, in float64."""
    return logprobs.penalize_one(logit, token, ids, params.repeat_penalty, params.repeat_penalty_last_n_token_count)


def whole_chars(text: str | None) -> str:
    """The text without the marks of incomplete UTF-8 characters: U+FFFD (a replacing
    decoder) and nothing (llama-cpp-python's ``errors="ignore"``) become the same."""
    return (text or "").replace("\ufffd", "")


def _top_logit(step: dict, token: int) -> float | None:
    for i, z in step["top"]:
        if i == token:
            return z
    return None


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


class _Tokenizers:
    """The golden set's tokenizer.json files, loaded on first use (needs `tokenizers`)."""

    def __init__(self, golden: Golden):
        self.golden = golden
        self._cache: dict[str, Any] = {}

    def get(self, model: str):
        if model not in self._cache:
            tok = None
            path = self.golden.tokenizer_path(model)
            if path is not None and path.is_file():
                try:
                    from tokenizers import Tokenizer

                    tok = Tokenizer.from_file(str(path))
                except Exception:  # noqa: BLE001 - no tokenizer: compare by text only
                    tok = None
            self._cache[model] = tok
        return self._cache[model]

    def first_token(self, model: str, text: str) -> int | None:
        tok = self.get(model)
        if tok is None or not text:
            return None
        ids = tok.encode(text, add_special_tokens=False).ids
        return int(ids[0]) if ids else None

    def decode(self, model: str, token: int) -> str | None:
        tok = self.get(model)
        return tok.decode([token], skip_special_tokens=True) if tok is not None else None


# ----------------------------------------------------------------------------- the checks

@dataclass
class Context:
    golden: Golden
    dialect: Dialect
    transport: Transport
    profile: str
    sampled: str
    thresholds: dict
    tokenizers: _Tokenizers
    model_map: dict = field(default_factory=dict)
    backend: Backend | None = None
    models_root: Any = None  # where the reference models are, for the statistical check's logits
    stats_n: int | None = None  # the statistical check's N (default: chosen for power, `stats.sample_size`)
    _logits: dict = field(default_factory=dict)
    stats_done: dict = field(default_factory=dict)  # first-token distributions already tested

    def model(self, name: str) -> str:
        return self.model_map.get(name, name)

    def logits_at(self, case: dict, prompt: str, ids: Sequence[int]) -> np.ndarray:
        """refllm's float64 logits after `ids` [V], the model loaded from `models_root` on
        first use; `ids` must be what the model makes of `prompt`, the text sent."""
        key = (case["model"], tuple(ids))
        if key not in self._logits:
            from .. import engine, registry

            llm = engine.get_llm(registry.find_llm(case["model"], self.models_root), precision="float64",
                                 backend="numpy")
            if list(llm.encode(prompt)) != list(ids):
                raise Skip("the prompt plus the reference's first tokens tokenizes otherwise; no statistical check")
            self._logits[key] = np.asarray(llm.model(np.asarray(ids), last_only=True)[0], dtype=np.float64)
        return self._logits[key]


def _new_result(case: dict) -> dict:
    return {"name": case["name"], "kind": case["kind"], "description": case.get("description", ""),
            "status": "pass", "scored": True, "faults": [], "notes": []}


def _fault(res: dict, name: str, note: str) -> None:
    if name not in res["faults"]:
        res["faults"].append(name)
    res["notes"].append(note)


def _http_failed(res: dict, r: Response) -> bool:
    if 200 <= r.status < 300 and r.body is not None:
        return False
    _fault(res, "http-error", f"HTTP {r.status}: {r.text[:300]}")
    return True


def check_generate(case: dict, ctx: Context) -> dict:
    res = _new_result(case)
    params = params_from_json(case["params"])
    steps, sampled = case["steps"], case["sampling"]
    res.update(sampling=sampled, steps=len(steps), match=None, divergence=None)
    if sampled:
        if ctx.sampled == "skip":
            raise Skip("sampled cases are skipped (--sampled skip)")
        if ctx.sampled == "stats" and params.max_tokens > 0:
            return check_sampled_stats(case, ctx, res, params)
        res["scored"] = ctx.sampled in ("strict", "stats")  # max-tokens 0 draws nothing: compared exactly
    if ctx.profile == "hf" and params.repeat_penalty != 1.0 and penalty_mode(case, params) != "whole":
        raise Skip("under the hf profile the penalty covers the whole sequence; this case's window does not")
    sent = case
    if ctx.backend is not None and ctx.backend.penalty == "generated-last-n" and \
            window_immaterial(case, params, ctx.backend.penalty_last_n):
        sent = {**case, "window_immaterial": True}
        res["notes"].append("the penalty's window differs (generated tokens only), but on refllm's top logits it "
                            "changes no greedy choice of this case")
    path, body = ctx.dialect.generate(sent, ctx.model(case["model"]), params)
    r = ctx.transport.post(path, body)
    if _http_failed(res, r):
        return _finish(res)
    got = ctx.dialect.parse_generate(r, case)

    # -- the text: Spin 3 returns prompt + completion
    prompt, want = case["prompt"], case["text"]
    completion = got.text
    if ctx.profile == "spin":
        if completion.startswith(prompt):
            completion = completion[len(prompt):]
        else:
            _fault(res, "text-without-prompt", "the spin profile returns prompt + completion; the text does not "
                                               "start with the prompt")
    elif prompt and completion != want and completion.startswith(prompt) and not want.startswith(prompt):
        completion = completion[len(prompt):]
        _fault(res, "text-includes-prompt", "the text starts with the prompt (Spin 3's engine does this)")
    expected_text = case["spin"]["text"] if ctx.profile == "spin" else want
    res["text"] = {"expected": expected_text, "got": got.text, "equal": got.text == expected_text}

    # -- the exact-match length: by id, by token text, else by the text (whole characters)
    n = len(steps)
    if got.tokens is not None and all(t.get("id") is not None for t in got.tokens):
        how = "id"
        got_ids = [int(t["id"]) for t in got.tokens]
        m = next((i for i in range(min(n, len(got_ids))) if got_ids[i] != case["tokens"][i]), min(n, len(got_ids)))
    elif got.tokens is not None:
        how = "token-text"
        m = next((i for i in range(min(n, len(got.tokens)))
                  if whole_chars(got.tokens[i].get("text")) != whole_chars(steps[i]["text"])), min(n, len(got.tokens)))
    else:
        how = "text"
        m = 0
        done, want_w = whole_chars(completion), whole_chars(want)
        while m < n and done.startswith(whole_chars(want[: steps[m]["text_end"]])) and \
                not (steps[m]["eos"] and len(done) > len(want_w)):
            m += 1
    if how != "text" and m == len(got.tokens) == n - 1 and steps[-1]["eos"] and \
            whole_chars(completion) == whole_chars(want):
        m = n  # the backend stopped on the EOS but leaves it out of its token list
        res["notes"].append("the backend's token list leaves out the EOS")
    res["compared_by"] = how
    res["match"] = m
    n_got = len(got.tokens) if got.tokens is not None else got.generated_tokens
    if m == n == len(got.tokens or ()) + 1 and steps[-1]["eos"]:
        n_got = n
    near_tie = False
    if m < n:
        near_tie = _divergence(res, case, ctx, params, got, completion, m, how)
    elif n_got is not None and n_got > n:
        if steps and steps[-1]["eos"]:
            _fault(res, "did-not-stop", f"the backend generated {n_got} tokens where the reference stopped on the "
                                        f"EOS after {n}")
        elif not whole_chars(completion).startswith(whole_chars(want)):  # past max-tokens: `_check_length` says so
            _fault(res, "detokenize", f"same tokens, other text: {completion[:60]!r} vs {want[:60]!r}")
    elif whole_chars(completion) != whole_chars(want):
        _fault(res, "detokenize", f"same tokens, other text: {completion[:60]!r} vs {want[:60]!r}")

    # -- log-probabilities, where the dialect returns them
    if got.tokens is not None and any(t.get("logprob") is not None for t in got.tokens):
        _check_logprobs(res, case, ctx, params, got, m)

    # -- max-tokens, usage and the finish reason: always, also after a divergence
    _check_length(res, case, ctx, params, got, n_got)
    _check_usage(res, case, ctx, got, full=(m == n and not near_tie))
    if near_tie and not res["faults"]:
        res["status"] = "warn"
    return _finish(res)


def window_immaterial(case: dict, params: InferencingParams, last_n: int | None = None) -> bool:
    """Whether a greedy case picks the same tokens when the penalty's window holds only the
    generated tokens: at each step, on refllm's top-n logits, the reference's token stays
    the argmax, and (a penalty >= 1 only lowers logits) above every logit outside the top-n.
    `last_n`: the backend's window length over the generated ids (default: the case's)."""
    if case["sampling"] or params.repeat_penalty < 1.0:
        return False
    n = last_n if last_n is not None else params.repeat_penalty_last_n_token_count
    for k, step in enumerate(case["steps"]):
        generated = list(case["tokens"][:k])
        pen = [(logprobs.penalize_one(z, t, generated, params.repeat_penalty, n), t) for t, z in step["top"]]
        best, token = max(pen)
        if token != step["token"] or best <= step["top"][-1][1]:
            return False
    return True


def _check_length(res: dict, case: dict, ctx: Context, params: InferencingParams, got: Got, n_got) -> None:
    """max-tokens is a hard limit and the finish reason must say why the backend stopped."""
    counts = [c for c in (n_got, got.generated_tokens) if c is not None]
    over = max(counts) if counts else None
    if over is not None and over > params.max_tokens:
        _fault(res, "max-tokens", f"generated {over} tokens for max_tokens {params.max_tokens}")
    want, have = FINISH.get(case.get("finish_reason")), FINISH.get(got.finish_reason, got.finish_reason)
    res["finish_reason"] = {"expected": want, "got": have}
    if have is None or want is None:
        return
    if have == "length" and over is not None and over < params.max_tokens:
        _fault(res, "finish-reason", f"finish_reason 'length' after {over} of max_tokens {params.max_tokens}")
    elif res.get("match") == len(case["steps"]) and have != want and not res["faults"]:
        _fault(res, "finish-reason", f"finish_reason {have!r}, expected {want!r}")


FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}  # refllm's -> OpenAI's words


def _divergence(res: dict, case: dict, ctx: Context, params: InferencingParams, got: Got, completion: str, k: int,
                how: str) -> bool:
    """Describe and diagnose the first divergence, at step k; True if it is a near tie."""
    steps, model = case["steps"], case["model"]
    s = steps[k]
    eos_ids = ctx.golden.header.get("models", {}).get(model, {}).get("eos_token_ids") or []
    got_tok: dict = {}
    if how == "id":
        got_tok = ({"id": int(got.tokens[k]["id"]), "text": got.tokens[k].get("text")} if k < len(got.tokens)
                   else {"end": True})
    elif how == "token-text":
        if k < len(got.tokens):
            got_tok = {"text": got.tokens[k].get("text")}
            tid = ctx.tokenizers.first_token(model, got_tok["text"] or "")
            if tid is not None and ctx.tokenizers.decode(model, tid) == got_tok["text"]:
                got_tok["id"] = tid
        else:
            got_tok = {"end": True}
    else:
        rest = completion[steps[k - 1]["text_end"] if k else 0:]
        if not rest:
            got_tok = {"end": True}
        else:
            tid = ctx.tokenizers.first_token(model, rest)
            got_tok = {"id": tid, "text": ctx.tokenizers.decode(model, tid), "retokenized": True} if tid is not None \
                else {"text": rest[:16]}
    if got_tok.get("end") and len(eos_ids) == 1:
        got_tok["id"] = eos_ids[0]  # the backend stopped: an EOS (or a length cut)
    ids = list(case["prompt_ids"]) + list(case["tokens"][:k])
    div = {"step": k, "expected": {"id": s["token"], "text": s["text"]}, "got": got_tok,
           "margin": s["margin"], "margin_kind": "u" if case["sampling"] else "logit"}
    gid = got_tok.get("id")
    if gid is not None and not case["sampling"]:
        z = _top_logit(s, gid)
        want_pen = _penalize(s["logit"], s["token"], ids, params)
        if z is not None:
            div["logit_gap"] = want_pen - _penalize(z, gid, ids, params)
        elif params.repeat_penalty >= 1.0:
            div["logit_gap_at_least"] = want_pen - s["top"][-1][1]
    res["divergence"] = div

    gap = div.get("logit_gap", max(s["margin"], div.get("logit_gap_at_least", -math.inf)))
    if case["sampling"]:
        near = s["margin"] < ctx.thresholds["tie_u"]
    else:
        near = gap < ctx.thresholds["tie_logit"]
    raw_argmax = s["top"][0][0]
    if near:
        res["notes"].append(f"near tie at step {k}: refllm's margin {div['margin']:.3g} "
                            f"({div['margin_kind']}) is within rounding")
        return True
    desc = f"step {k}: expected {s['token']} {s['text']!r}, got {gid if gid is not None else '?'} " \
           f"{got_tok.get('text')!r}; refllm's margin {s['margin']:.4g}"
    context = ids[-64:]
    if not case["sampling"] and penalty_mode(case, params) == "none" and gid is not None and \
            s["token"] in set(context) and _default_penalty_picks(s, context, gid):
        _fault(res, "unrequested-penalty", desc + " - the server applied a repeat penalty that was not asked for "
                                                  "(the expected token was already in the context; a penalty of 1.1 "
                                                  "over the last 64 ids picks exactly the backend's token)")
    elif not case["sampling"] and penalty_mode(case, params) != "none" and gid == raw_argmax != s["token"]:
        _fault(res, "repeat-penalty", desc + " - the backend chose the unpenalised argmax: its repeat penalty is "
                                             "missing, or its window leaves out the prompt")
    elif got_tok.get("end") and not s["eos"]:
        _fault(res, "stopped-early", desc + " - the backend stopped here")
    elif s["eos"]:
        _fault(res, "did-not-stop", desc + " - the reference stops here (EOS)")
    else:
        _fault(res, "token-mismatch", desc)
    return False


def _default_penalty_picks(step: dict, context: Sequence[int], gid: int) -> bool:
    """Whether llama.cpp's old default penalty (1.1 over the last 64 ids) on refllm's top
    logits makes `gid` the argmax."""
    pen = [(logprobs.penalize_one(z, t, context, 1.1, 64), t) for t, z in step["top"]]
    return max(pen)[1] == gid


def _check_logprobs(res: dict, case: dict, ctx: Context, params: InferencingParams, got: Got, m: int) -> None:
    steps = case["steps"]
    worst = {"raw": 0.0, "penalized": 0.0}
    compared = 0
    for i in range(min(len(got.tokens), len(steps), m + 1)):
        lp = got.tokens[i].get("logprob")
        if lp is None:
            continue
        s = steps[i]
        if i < m:
            ref = {"raw": s["logprob"], "penalized": s["logprob_penalized"]}
        else:  # the divergence step: the backend's token, if it is among the reference's top 20
            gid = got.tokens[i].get("id") if i < len(got.tokens) else None
            z = _top_logit(s, gid) if gid is not None else None
            if z is None:
                continue
            ids = list(case["prompt_ids"]) + list(case["tokens"][:i])
            lse = s["logit"] - s["logprob"]
            lse_pen = _penalize(s["logit"], s["token"], ids, params) - s["logprob_penalized"]
            ref = {"raw": z - lse, "penalized": _penalize(z, gid, ids, params) - lse_pen}
        for conv in worst:
            worst[conv] = max(worst[conv], abs(float(lp) - ref[conv]))
        compared += 1
    if not compared:
        return
    conv = min(worst, key=worst.get)
    res["logprobs"] = {"compared": compared, "max_abs_diff": worst[conv], "convention": conv}
    if worst[conv] > ctx.thresholds["logprob"]:
        d = worst[conv]
        if m == len(steps) and d < 3e-2:
            cause = (f"log-probs drift by {d:.2g}, consistent with 16-bit arithmetic in the backend (a 16-bit KV "
                     f"cache, as llama.cpp's default; start llama.cpp with --type_k 0 --type_v 0 for F32); greedy "
                     f"tokens agree")
        else:
            cause = f"log-probabilities differ from the reference by up to {d:.3g}: the backend's logits are not the model's"
        _fault(res, "logprobs", cause + f" (threshold {ctx.thresholds['logprob']:g})")


def _check_usage(res: dict, case: dict, ctx: Context, got: Got, full: bool) -> None:
    spec_u = case["usage"]
    exp = dict(case["spin"]["usage"] if ctx.profile == "spin" else spec_u)
    be = ctx.backend
    ended_on_eos = bool(case["steps"]) and case["steps"][-1]["eos"]
    eos_alternatives = {exp["generated_token_count"]}
    if ended_on_eos and be is not None and be.eos_counted is not True:  # False: not counted; None: either
        if be.eos_counted is False:
            eos_alternatives = {exp["generated_token_count"] - 1}
            exp["generated_token_count"] -= 1
        else:
            eos_alternatives.add(exp["generated_token_count"] - 1)
    res["usage"] = {"expected": {"prompt": exp["prompt_token_count"], "generated": exp["generated_token_count"]},
                    "got": {"prompt": got.prompt_tokens, "generated": got.generated_tokens}}
    ok = True
    if got.prompt_tokens is not None and got.prompt_tokens != exp["prompt_token_count"]:
        ok = False
        generated = got.generated_tokens if got.generated_tokens is not None else spec_u["generated_token_count"]
        spin3 = spec_u["prompt_token_count"] + generated
        if ctx.profile != "spin" and got.prompt_tokens == spin3 != spec_u["prompt_token_count"]:
            _fault(res, "usage-spin3", f"prompt-token-count {got.prompt_tokens} = prompt + generated tokens "
                                       f"(Spin 3's counting); the WIT's is {exp['prompt_token_count']}")
        elif ctx.profile == "spin" and got.prompt_tokens == spec_u["prompt_token_count"]:
            _fault(res, "usage-not-spin3", f"prompt-token-count {got.prompt_tokens} counts the prompt only; Spin 3 "
                                           f"counts prompt + generated = {exp['prompt_token_count']}")
        else:
            _fault(res, "usage-prompt", f"prompt-token-count {got.prompt_tokens}, expected {exp['prompt_token_count']}")
    if got.generated_tokens is not None and "max-tokens" not in res["faults"]:  # else said already
        if full and got.generated_tokens not in eos_alternatives:
            ok = False
            eos = (" (the EOS counted)" if got.generated_tokens == spec_u["generated_token_count"] and ended_on_eos
                   else "")
            _fault(res, "usage-generated", f"generated-token-count {got.generated_tokens}{eos}, expected "
                                           f"{exp['generated_token_count']}"
                                           f"{' (' + be.name + ' does not count the EOS)' if be and eos else ''}")
        elif not full and got.tokens is not None and got.generated_tokens != len(got.tokens) and \
                got.generated_tokens != len(got.tokens) + 1:
            ok = False  # after a divergence: the count must still be the backend's own tokens
            _fault(res, "usage-generated", f"generated-token-count {got.generated_tokens} for the {len(got.tokens)} "
                                           f"tokens the backend returned")
    res["usage"]["equal"] = ok if got.prompt_tokens is not None or got.generated_tokens is not None else None


def check_embed(case: dict, ctx: Context) -> dict:
    res = _new_result(case)
    path, body = ctx.dialect.embed(case, ctx.model(case["model"]))
    r = ctx.transport.post(path, body)
    if _http_failed(res, r):
        return _finish(res)
    vectors, usage = ctx.dialect.parse_embed(r)
    spin = ctx.profile == "spin"
    want = case["spin"]["embeddings"] if spin else case["embeddings"]
    want_usage = (case["spin"] if spin else case)["usage"]["prompt_token_count"]
    if not isinstance(vectors, list) or len(vectors) != len(want):
        _fault(res, "embeddings-count", f"{len(vectors) if isinstance(vectors, list) else '?'} vectors for "
                                        f"{len(want)} texts")
        return _finish(res)
    cos = [cosine(a, b) for a, b in zip(want, vectors)]
    norms = [float(np.linalg.norm(np.asarray(v, dtype=np.float64))) for v in vectors]
    res["cosine"] = cos
    res["cosine_min"] = min(cos)
    lengths = [len(t) for t in case["token_ids"]]
    bad = [i for i, c in enumerate(cos) if not c >= ctx.thresholds["cosine"]]
    if bad:
        longest = max(lengths)
        if len(set(lengths)) > 1 and all(lengths[i] < longest for i in bad):
            _fault(res, "embeddings-padding", f"texts {bad} (padded in the batch) have cosine down to {min(cos):.6f}, "
                                              f"the longest text is right: padding leaks through the attention mask "
                                              f"or the pooling")
        else:
            _fault(res, "embeddings", f"cosine to the reference down to {min(cos):.6f} "
                                      f"(< {ctx.thresholds['cosine']}) for texts {bad}")
    if any(abs(x - 1.0) > ctx.thresholds["norm"] for x in norms):
        _fault(res, "embeddings-not-normalised", f"vector norms {[round(x, 4) for x in norms]}")
    res["usage"] = {"expected": {"prompt": want_usage}, "got": {"prompt": usage}}
    if usage is not None and usage != want_usage:
        if not spin and usage == case["spin"]["usage"]["prompt_token_count"] != want_usage:
            _fault(res, "usage-spin3", f"prompt-token-count {usage} = the padded batch length (Spin 3's counting); "
                                       f"the real tokens are {want_usage}")
        elif spin and usage == case["usage"]["prompt_token_count"]:
            _fault(res, "usage-not-spin3", f"prompt-token-count {usage} counts real tokens; Spin 3 reports the padded "
                                           f"batch length {want_usage}")
        else:
            _fault(res, "usage", f"prompt-token-count {usage}, expected {want_usage}")
    res["usage"]["equal"] = None if usage is None else usage == want_usage
    return _finish(res)


def check_error(case: dict, ctx: Context) -> dict:
    res = _new_result(case)
    path, body = ctx.dialect.error(case, ctx.model(case["model"]))
    r = ctx.transport.post(path, body)
    message = None
    if isinstance(r.body, dict):
        e = r.body.get("error")
        message = e.get("message") if isinstance(e, dict) else e
    variant = ctx.dialect.variant(r)
    res["error"] = {"expected": case["error"]["variant"], "status": r.status, "variant": variant,
                    "message": (str(message) if message is not None else r.text)[:300]}
    is_error = r.status >= 400 or (isinstance(r.body, dict) and "error" in r.body)
    if not is_error:
        _fault(res, "error-not-raised", f"HTTP {r.status} and no error for {case['description']}")
    elif r.status >= 500:
        _fault(res, "error-status", f"HTTP {r.status} (a server error) for a bad input: {case['description']}")
    elif variant is not None and variant != case["error"]["variant"]:
        _fault(res, "error-variant", f"variant {variant}, expected {case['error']['variant']}")
    return _finish(res)


def _finish(res: dict) -> dict:
    if res["faults"]:
        res["status"] = "fail"
    return res


CHECKS = {"generate": check_generate, "embed": check_embed, "error": check_error}


# ----------------------------------------------------------------------------- sampled cases, by statistics

STATS_SEED0 = 1000  # the statistical check's seeds: STATS_SEED0, STATS_SEED0 + 1, ...


def _first_token_key(got: Got, by_id: bool):
    if by_id:
        return int(got.tokens[0]["id"]) if got.tokens else None
    if got.tokens is not None:
        return whole_chars(got.tokens[0].get("text")) if got.tokens else ""
    return whole_chars(got.text)


def _entropy_at(step: dict, ids: Sequence[int], params: InferencingParams) -> float:
    """The entropy of SPEC 3's kept candidates at a golden step, from its top-n logits only
    (an estimate of how much a test at that step can see)."""
    from .. import sampling

    z = np.array([logprobs.penalize_one(v, t, ids, params.repeat_penalty, params.repeat_penalty_last_n_token_count)
                  for t, v in step["top"]])  # [n] the top-n, penalised
    p = sampling.softmax_with_temperature(z, params.temperature)  # [n]
    _, w = sampling.top_p_filter(*sampling.top_k_candidates(p, params.top_k), params.top_p)  # [K]
    q = np.asarray(w) / np.sum(w)
    return float(-np.sum(q * np.log(q)))


def stats_step(case: dict, params: InferencingParams, ctx: Context) -> tuple[int, str, list[int]]:
    """The step of the reference trajectory whose next-token distribution is tested: the
    one with the most spread-out kept candidates (the first token is often all but
    certain). Returns k, the prompt to send (the prompt + the reference's first k tokens'
    text, which must end on a whole character) and the ids it must tokenize to."""
    best, best_h = 0, -1.0
    tok = ctx.tokenizers.get(case["model"])
    for k, step in enumerate(case["steps"]):
        if step["eos"]:
            break
        if k:
            text = case["text"][: case["steps"][k - 1]["text_end"]]
            if tok is None or whole_chars(tok.decode(case["tokens"][:k], skip_special_tokens=True)) != text:
                continue
        h = _entropy_at(step, list(case["prompt_ids"]) + list(case["tokens"][:k]), params)
        if h > best_h + 1e-9:
            best, best_h = k, h
    text = case["text"][: case["steps"][best - 1]["text_end"]] if best else ""
    return best, case["prompt"] + text, list(case["prompt_ids"]) + list(case["tokens"][:best])


def expected_next_token(case: dict, ctx: Context, params: InferencingParams, prompt: str, ids: list[int],
                        by_id: bool) -> dict:
    """The claimed sampler's exact distribution of the token after `prompt` (tokenized as
    `ids`), keyed as the backend's answers are (id, or text in whole characters)."""
    from .. import profiles

    be = ctx.backend
    window = [] if be is not None and be.penalty == "generated-last-n" else ids  # the prompt is all it has seen
    profile = "spec" if ctx.profile == "spin" else ctx.profile
    extras = {"min_p": 0.0} if profile == "llama.cpp" else {}  # conform sends min_p 0 (or the backend has none)
    z = ctx.logits_at(case, prompt, ids).astype(np.float32)  # [V] as a float32 engine samples from
    p = profiles.distribution(profile, z, window, params, **extras)  # [V]
    nz = np.flatnonzero(p)
    if by_id:
        return {int(i): float(p[i]) for i in nz}
    out: dict = {}
    for i in nz:
        key = whole_chars(ctx.tokenizers.decode(case["model"], int(i)))
        out[key] = out.get(key, 0.0) + float(p[i])
    return out


def check_sampled_stats(case: dict, ctx: Context, res: dict, params: InferencingParams) -> dict:
    """N one-token generations under N seeds, tested against the claimed sampler (`stats`)."""
    res.update(compared_by="statistics", scored=True)
    be = ctx.backend
    if ctx.profile != "spin" and be is not None and be.sampler is None and ctx.profile != "spec":
        raise Skip(f"{be.name} documents no sampling order to test against")
    key = (case["model"], case["prompt"], tuple(sorted({**case["params"], "max_tokens": 1}.items())))
    cached = ctx.stats_done.get(key)
    if cached is not None:
        res["stats"] = cached[1]
        res["notes"].append(f"the same first-token distribution as case {cached[0]} (not asked again)")
        for f, note in cached[2]:
            _fault(res, f, note)
        return _finish(res)
    k, prompt, ids = stats_step(case, params, ctx)
    at = {**case, "prompt": prompt, "prompt_ids": ids}
    path, body = ctx.dialect.generate(at, ctx.model(case["model"]), params, first_only=True)
    probe = ctx.transport.post(path, ctx.dialect.set_seed(body, STATS_SEED0))
    if _http_failed(res, probe):
        return _finish(res)
    got0 = ctx.dialect.parse_generate(probe, case)
    by_id = got0.tokens is not None and all(t.get("id") is not None for t in got0.tokens) and bool(got0.tokens)
    expected = expected_next_token(case, ctx, params, prompt, ids, by_id)
    n = ctx.stats_n
    if n is None:
        n = 400
        for _ in range(3):  # the cells depend on N, N on the cells' df
            n = min(stats.MAX_N, stats.sample_size(len(stats.cells(expected, n)[0]) - 1))
    observed: Counter = Counter([_first_token_key(got0, by_id)])
    for i in range(1, n):
        r = ctx.transport.post(path, ctx.dialect.set_seed(body, STATS_SEED0 + i), record=False)
        if _http_failed(res, r):
            return _finish(res)
        observed[_first_token_key(ctx.dialect.parse_generate(r, case), by_id)] += 1
    t = stats.g_test(expected, observed, ctx.thresholds.get("alpha", stats.ALPHA))
    t.update(profile=ctx.profile, by="id" if by_id else "text", step=k, prompt=prompt,
             seeds=[STATS_SEED0, STATS_SEED0 + n - 1],
             power=stats.POWER, effect_w=stats.EFFECT_W)
    del t["cells"]
    res["stats"] = t
    found = []
    if t["impossible"]:
        found.append(("sampling-impossible-token",
                      f"the backend drew {sorted(t['impossible'].items())[:5]} (token: times), which the {ctx.profile} "
                      f"sampler can never draw for these parameters"))
    elif not t["passed"]:
        over = ", ".join(f"{r['key']!r} {r['observed']} vs {r['expected']:.1f}" for r in t["over"] if r["residual"] > 0)
        under = ", ".join(f"{r['key']!r} {r['observed']} vs {r['expected']:.1f}" for r in t["under"]
                          if r["residual"] < 0)
        found.append(("sampling-distribution",
                      f"the distribution of token {k} (after the reference's first {k}) over {n} seeds is not the {ctx.profile} sampler's: G = "
                      f"{t['g']:.1f}, df {t['df']}, p = {t['pvalue']:.2g} < {t['alpha']:g}; over-represented: "
                      f"{over}; under-represented: {under}"))
    for f, note in found:
        _fault(res, f, note)
    ctx.stats_done[key] = (case["name"], t, found)
    return _finish(res)
