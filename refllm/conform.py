"""Conformance: replay a golden set against a running backend over HTTP and say, case by
case, where it parts from the reference.

    code = conform("http://127.0.0.1:3000", dialect="spin")          # the built-in set
    code = conform(url, "tgi", golden_dir="golden/", report="r.json")
    refllm conform --against URL --dialect spin|tgi|openai [--golden DIR] [--token T]
                   [--report FILE] [--profile spec|spin|hf|llama.cpp] [--case NAME ...]

What is sent (per dialect; `--token T` adds ``authorization: bearer T``):

    spin     POST /infer {"model","prompt","options":{camelCase WIT params},"seed"}
             POST /embed {"model","input"}              (the seed is refllm's extension)
    tgi      POST /generate {"inputs","parameters":{max_new_tokens, details: true,
             do_sample, temperature, top_k, top_p, repetition_penalty, seed}};
             embeddings and model-specific errors via POST /models/<model>
    openai   POST /v1/completions {"model","prompt","max_tokens","temperature","top_p",
             "seed","logprobs":1, "top_k","repetition_penalty" (vLLM's extensions)};
             POST /v1/embeddings {"model","input","encoding_format":"float"}

A case a dialect cannot express is skipped and says why: TGI and OpenAI penalise the
whole sequence, so a case whose penalty window (last-n) is shorter than its prompt plus
its tokens is skipped there; they need at least one new token (max-tokens 0 is
skipped); OpenAI caps the temperature at 2.

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
  convention: of the raw logits, or of the logits after the repeat penalty).
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

Every generated token, text and usage must match otherwise (a near tie ends the
comparison of that case with a warning). Sampled cases need the backend to draw ``u``
as SPEC 3 does from the request's seed; they are scored under ``--profile spec`` and
reported but not scored under the other profiles, whose engines draw from their own
RNGs (``sampled="strict" | "info" | "skip"`` overrides). Exit codes: 0 every scored
case passed (warnings allowed), 1 some failed, 2 the backend or the golden set could
not be used.

Profiles (``--profile``, the behaviour the backend claims, SPEC 6 and `refllm.profiles`):

    spec       SPEC 2-4 (the default)
    spin       Spin 3's engine: text = prompt + completion, prompt-token-count = prompt
               + generated; embeddings pooled without the mask, tanh GELU, usage = the
               padded batch length (the golden set's "spin" expectations)
    hf         transformers/TGI: the penalty covers the whole sequence (cases with a
               shorter window are skipped); sampled cases are reported, not scored
    llama.cpp  llama.cpp's chain: greedy cases as spec; sampled cases reported, not scored

Faults named in the report (``faults``): repeat-penalty (the backend picked the
unpenalised argmax: its penalty is missing, or its window leaves out the prompt),
token-mismatch, stopped-early, did-not-stop, max-tokens, detokenize (same tokens,
other text), text-includes-prompt, text-without-prompt, logprobs (the backend's
logits differ from the reference), usage-spin3 (usage counted like Spin 3),
usage-not-spin3, usage-prompt, usage-generated, usage, embeddings,
embeddings-padding (the padded texts of a batch are off while the longest is right:
padding leaks through the attention mask or the pooling), embeddings-not-normalised,
embeddings-count, error-not-raised, error-status (a bad input answered with a 5xx),
error-variant, http-error, transport.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

import numpy as np

from .errors import LLMError
from .golden import Golden, builtin_golden_dir, load_golden, params_from_json
from .types import InferencingParams

THRESHOLDS = {"tie_logit": 2e-3, "tie_u": 1e-4, "logprob": 2e-3, "cosine": 0.99999, "norm": 1e-3}
DIALECTS = ("spin", "tgi", "openai")
PROFILES = ("spec", "spin", "hf", "llama.cpp")
REPORT_VERSION = 1
TOP_K_ALL = 2**31  # a top_k at or above this (or the vocabulary) keeps every candidate: not sent


class Unreachable(Exception):
    """The backend could not be reached at all."""


class Skip(Exception):
    """The case cannot be expressed in this dialect or profile."""


# ----------------------------------------------------------------------------- HTTP

@dataclass
class Response:
    status: int
    headers: dict  # lower-case names
    body: Any  # parsed JSON, or None
    text: str


class Transport:
    """POST JSON to the backend: httpx if installed, else urllib. Non-finite floats are
    sent as the NaN/Infinity literals (the only way to send them; a strict JSON parser
    refuses them, which is an error too)."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 600.0):
        self.base_url = base_url.rstrip("/")
        self.headers = {"content-type": "application/json", "accept": "application/json"}
        if token:
            self.headers["authorization"] = f"bearer {token}"
        self.timeout = timeout
        self.requests = 0
        try:
            import httpx
        except ImportError:
            httpx = None
        self._httpx = httpx
        self._client = httpx.Client(timeout=timeout) if httpx else None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def post(self, path: str, body: Any) -> Response:
        data = json.dumps(body, ensure_ascii=False, allow_nan=True).encode("utf-8")
        url = self.base_url + path
        self.requests += 1
        if self._client is not None:
            try:
                r = self._client.post(url, content=data, headers=self.headers)
            except self._httpx.ConnectError as e:
                raise Unreachable(f"cannot connect to {url}: {e}") from e
            return _response(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.text)
        import urllib.error
        import urllib.request

        req = urllib.request.Request(url, data=data, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                text = r.read().decode("utf-8", "replace")
                return _response(r.status, {k.lower(): v for k, v in r.headers.items()}, text)
        except urllib.error.HTTPError as e:
            return _response(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode("utf-8", "replace"))
        except urllib.error.URLError as e:
            raise Unreachable(f"cannot connect to {url}: {e.reason}") from e


def _response(status: int, headers: dict, text: str) -> Response:
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    return Response(status, headers, body, text)


# ----------------------------------------------------------------------------- dialects

@dataclass
class Got:
    """What a backend answered to a generation request."""

    text: str
    tokens: list[dict] | None = None  # per token: "id" and/or "text", maybe "logprob"
    prompt_tokens: int | None = None
    generated_tokens: int | None = None


def penalty_mode(case: dict, params: InferencingParams) -> str:
    """"none", "whole" (the window covers the whole sequence) or "window" (it does not)."""
    if params.repeat_penalty == 1.0 or params.repeat_penalty_last_n_token_count == 0:
        return "none"
    if params.repeat_penalty_last_n_token_count >= len(case["prompt_ids"]) + params.max_tokens:
        return "whole"
    return "window"


class Dialect:
    name = ""

    def __init__(self, golden: Golden):
        self.golden = golden

    def vocab_size(self, model: str) -> int:
        return int(self.golden.header.get("models", {}).get(model, {}).get("vocab_size") or TOP_K_ALL)

    def variant(self, r: Response) -> str | None:
        return None


class SpinDialect(Dialect):
    """Spin's remote_http engine."""

    name = "spin"

    @staticmethod
    def options(p: InferencingParams) -> dict:
        return {"maxTokens": p.max_tokens, "repeatPenalty": p.repeat_penalty,
                "repeatPenaltyLastNTokenCount": p.repeat_penalty_last_n_token_count, "temperature": p.temperature,
                "topK": p.top_k, "topP": p.top_p}

    def generate(self, case: dict, model: str, params: InferencingParams):
        body = {"model": model, "prompt": case["prompt"], "options": self.options(params)}
        if case.get("seed") is not None:
            body["seed"] = case["seed"]
        return "/infer", body

    def parse_generate(self, r: Response, case: dict) -> Got:
        u = r.body.get("usage") or {}
        return Got(r.body["text"], None, u.get("promptTokenCount"), u.get("generatedTokenCount"))

    def embed(self, case: dict, model: str):
        return "/embed", {"model": model, "input": case["texts"]}

    def parse_embed(self, r: Response):
        return r.body["embeddings"], (r.body.get("usage") or {}).get("promptTokenCount")

    def error(self, case: dict, model: str):
        if case["op"] == "infer":
            return "/infer", {"model": model, "prompt": case["prompt"],
                              "options": self.options(params_from_json(case["params"]))}
        return "/embed", {"model": model, "input": case["texts"]}

    def variant(self, r: Response) -> str | None:
        return r.body.get("variant") if isinstance(r.body, dict) else None


class TgiDialect(Dialect):
    """Text Generation Inference / Hugging Face's Inference API."""

    name = "tgi"

    def generate(self, case: dict, model: str, params: InferencingParams):
        if params.max_tokens == 0:
            raise Skip("TGI needs max_new_tokens >= 1")
        mode = penalty_mode(case, params)
        if mode == "window":
            raise Skip("TGI penalises the whole sequence; this case's penalty window is shorter")
        p: dict = {"max_new_tokens": params.max_tokens, "details": True, "decoder_input_details": False}
        if mode == "whole":
            p["repetition_penalty"] = params.repeat_penalty
        if params.temperature > 0:
            if params.top_p <= 0:
                raise Skip("TGI needs 0 < top_p")
            p.update(do_sample=True, seed=case["seed"], temperature=params.temperature)
            if params.top_k < min(TOP_K_ALL, self.vocab_size(model)):
                p["top_k"] = params.top_k
            if params.top_p < 1.0:
                p["top_p"] = params.top_p
        else:
            p["do_sample"] = False
        return "/generate", {"inputs": case["prompt"], "parameters": p}

    def parse_generate(self, r: Response, case: dict) -> Got:
        body = r.body[0] if isinstance(r.body, list) else r.body
        details = body.get("details") or {}
        tokens = [{"id": t.get("id"), "text": t.get("text"), "logprob": t.get("logprob")}
                  for t in details.get("tokens") or []] if "tokens" in details else None
        prompt = r.headers.get("x-prompt-tokens")
        return Got(body["generated_text"], tokens, int(prompt) if prompt and prompt.isdigit() else None,
                   details.get("generated_tokens"))

    def embed(self, case: dict, model: str):
        return f"/models/{model}", {"inputs": case["texts"]}

    def parse_embed(self, r: Response):
        return r.body, None

    def error(self, case: dict, model: str):
        if case["op"] == "infer":
            if case["name"] == "err-infer-embedding-model":
                raise Skip("the Hugging Face API picks the task from the model")
            p = params_from_json(case["params"])
            parameters = {"max_new_tokens": max(1, p.max_tokens), "do_sample": True, "seed": 0,
                          "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p,
                          "repetition_penalty": p.repeat_penalty}
            path = "/generate" if case["name"] != "err-unknown-model" else f"/models/{model}"
            return path, {"inputs": case["prompt"], "parameters": parameters}
        if case["name"] == "err-embed-llm":
            raise Skip("the Hugging Face API picks the task from the model")
        return f"/models/{model}", {"inputs": case["texts"]}


class OpenAIDialect(Dialect):
    """OpenAI's completions and embeddings (with vLLM's top_k / repetition_penalty)."""

    name = "openai"

    def generate(self, case: dict, model: str, params: InferencingParams):
        if params.max_tokens == 0:
            raise Skip("OpenAI needs max_tokens >= 1")
        if params.temperature > 2:
            raise Skip("OpenAI caps the temperature at 2")
        mode = penalty_mode(case, params)
        if mode == "window":
            raise Skip("OpenAI-compatible servers penalise the whole sequence; this case's window is shorter")
        body: dict = {"model": model, "prompt": case["prompt"], "max_tokens": params.max_tokens, "logprobs": 1}
        if mode == "whole":
            body["repetition_penalty"] = params.repeat_penalty
        if params.temperature > 0:
            if params.top_p <= 0:
                raise Skip("OpenAI needs 0 < top_p")
            body.update(temperature=params.temperature, seed=case["seed"], top_p=min(params.top_p, 1.0))
            if params.top_k < min(TOP_K_ALL, self.vocab_size(model)):
                body["top_k"] = params.top_k
        else:
            body["temperature"] = 0
        return "/v1/completions", body

    def parse_generate(self, r: Response, case: dict) -> Got:
        choice = r.body["choices"][0]
        lp = choice.get("logprobs")
        tokens = None
        if lp and lp.get("tokens") is not None:
            tokens = [{"text": t, "logprob": v} for t, v in zip(lp["tokens"], lp.get("token_logprobs") or [])]
        u = r.body.get("usage") or {}
        return Got(choice.get("text", ""), tokens, u.get("prompt_tokens"), u.get("completion_tokens"))

    def embed(self, case: dict, model: str):
        return "/v1/embeddings", {"model": model, "input": case["texts"], "encoding_format": "float"}

    def parse_embed(self, r: Response):
        data = sorted(r.body["data"], key=lambda d: d.get("index", 0))
        return [d["embedding"] for d in data], (r.body.get("usage") or {}).get("prompt_tokens")

    def error(self, case: dict, model: str):
        if case["op"] == "infer":
            p = params_from_json(case["params"])
            return "/v1/completions", {"model": model, "prompt": case["prompt"], "max_tokens": max(1, p.max_tokens),
                                       "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k,
                                       "repetition_penalty": p.repeat_penalty, "seed": 0}
        return "/v1/embeddings", {"model": model, "input": case["texts"], "encoding_format": "float"}


DIALECT_CLASSES = {"spin": SpinDialect, "tgi": TgiDialect, "openai": OpenAIDialect}


# ----------------------------------------------------------------------------- reference arithmetic

def _penalize(logit: float, token: int, ids: Sequence[int], params: InferencingParams) -> float:
    """SPEC 3 step 1 for one token, in float64."""
    if params.repeat_penalty == 1.0 or params.repeat_penalty_last_n_token_count == 0:
        return logit
    if token not in set(ids[-params.repeat_penalty_last_n_token_count:]):
        return logit
    return logit / params.repeat_penalty if logit >= 0 else logit * params.repeat_penalty


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

    def model(self, name: str) -> str:
        return self.model_map.get(name, name)


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
        res["scored"] = ctx.sampled == "strict"
    if ctx.profile == "hf" and params.repeat_penalty != 1.0 and penalty_mode(case, params) != "whole":
        raise Skip("under the hf profile the penalty covers the whole sequence; this case's window does not")
    path, body = ctx.dialect.generate(case, ctx.model(case["model"]), params)
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

    # -- the exact-match length
    n = len(steps)
    if got.tokens is not None and all(t.get("id") is not None for t in got.tokens):
        how = "id"
        got_ids = [int(t["id"]) for t in got.tokens]
        m = next((i for i in range(min(n, len(got_ids))) if got_ids[i] != case["tokens"][i]), min(n, len(got_ids)))
    elif got.tokens is not None:
        how = "token-text"
        m = next((i for i in range(min(n, len(got.tokens))) if got.tokens[i].get("text") != steps[i]["text"]),
                 min(n, len(got.tokens)))
    else:
        how = "text"
        m = 0
        while m < n and completion.startswith(want[: steps[m]["text_end"]]) and \
                not (steps[m]["eos"] and len(completion) > steps[m]["text_end"]):
            m += 1
    if how != "text" and m == len(got.tokens) == n - 1 and steps[-1]["eos"] and completion == want:
        m = n  # the backend stopped on the EOS but leaves it out of its token list
        res["notes"].append("the backend's token list leaves out the EOS")
    res["compared_by"] = how
    res["match"] = m
    n_got = len(got.tokens) if got.tokens is not None else got.generated_tokens
    near_tie = False
    if m < n:
        near_tie = _divergence(res, case, ctx, params, got, completion, m, how)
    elif n_got is not None and n_got > n:
        _fault(res, "max-tokens" if not (steps and steps[-1]["eos"]) else "did-not-stop",
               f"the backend generated {n_got} tokens where the reference stopped after {n}")
    elif completion != want:
        _fault(res, "detokenize", f"same tokens, other text: {completion[:60]!r} vs {want[:60]!r}")

    # -- log-probabilities, where the dialect returns them
    if got.tokens is not None and any(t.get("logprob") is not None for t in got.tokens):
        _check_logprobs(res, case, ctx, params, got, m)

    # -- usage
    _check_usage(res, case, ctx, got, full=(m == n and not near_tie))
    if near_tie and not res["faults"]:
        res["status"] = "warn"
    return _finish(res)


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
    if not case["sampling"] and penalty_mode(case, params) != "none" and gid == raw_argmax != s["token"]:
        _fault(res, "repeat-penalty", desc + " - the backend chose the unpenalised argmax: its repeat penalty is "
                                             "missing, or its window leaves out the prompt")
    elif got_tok.get("end") and not s["eos"]:
        _fault(res, "stopped-early", desc + " - the backend stopped here")
    elif s["eos"]:
        _fault(res, "did-not-stop", desc + " - the reference stops here (EOS)")
    else:
        _fault(res, "token-mismatch", desc)
    return False


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
        _fault(res, "logprobs", f"log-probabilities differ from the reference by up to {worst[conv]:.3g} "
                                f"(> {ctx.thresholds['logprob']:g}): the backend's logits are not the model's")


def _check_usage(res: dict, case: dict, ctx: Context, got: Got, full: bool) -> None:
    spec_u = case["usage"]
    exp = case["spin"]["usage"] if ctx.profile == "spin" else spec_u
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
    if full and got.generated_tokens is not None and got.generated_tokens != exp["generated_token_count"]:
        ok = False
        _fault(res, "usage-generated", f"generated-token-count {got.generated_tokens}, expected "
                                       f"{exp['generated_token_count']}")
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


# ----------------------------------------------------------------------------- the run

def run_checks(golden: Golden, ctx: Context, names: Iterable[str] | None = None, progress: TextIO | None = None):
    names = None if names is None else list(names)
    cases = golden.cases if names is None else [c for c in golden.cases if c["name"] in names]
    if names is not None:
        missing = sorted(set(names) - {c["name"] for c in cases})
        if missing:
            raise ValueError(f"no such case(s) in the golden set: {', '.join(missing)}")
    results = []
    for case in cases:
        try:
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
        results.append(res)
        if progress is not None:
            print(f"conform: {case['name']}: {res['status']}", file=progress)
    return results


def summarize(results: list[dict]) -> dict:
    counts = {k: 0 for k in ("pass", "warn", "fail", "skip", "info")}
    faults: dict[str, list[str]] = {}
    for r in results:
        if r["status"] == "skip":
            counts["skip"] += 1
        elif not r["scored"]:
            counts["info"] += 1
        else:
            counts[r["status"]] += 1
        if r["scored"]:
            for f in r["faults"]:
                faults.setdefault(f, []).append(r["name"])
    return {**counts, "faults": faults, "exit_code": 1 if counts["fail"] else 0}


def _cell(r: dict) -> tuple[str, str, str]:
    if r["kind"] == "generate":
        match = f"{r['match']}/{r['steps']}" if r.get("match") is not None else ""
        d = r.get("divergence")
        div = ""
        if d:
            g = d["got"]
            got = "end" if g.get("end") and g.get("id") is None else f"{g.get('id', '?')} {g.get('text')!r}"
            div = f"step {d['step']}: {d['expected']['id']} {d['expected']['text']!r} vs {got}, " \
                  f"margin {d['margin']:.3g}{'u' if d['margin_kind'] == 'u' else ''}"
        u = r.get("usage") or {}
        usage = {True: "ok", False: "DIFF", None: "n/a"}[u.get("equal")] if u else ""
        return match, div, usage
    if r["kind"] == "embed":
        c = r.get("cosine_min")
        u = r.get("usage") or {}
        usage = {True: "ok", False: "DIFF", None: "n/a"}[u.get("equal")] if u else ""
        return (f"cos {c:.7f}" if c is not None else ""), "", usage
    e = r.get("error") or {}
    return (f"HTTP {e.get('status')}" if e else ""), (e.get("variant") or ""), ""


def print_table(results: list[dict], summary: dict, out: TextIO) -> None:
    rows = [("case", "kind", "result", "match", "first divergence / detail", "usage", "faults")]
    for r in results:
        status = r["status"] if r["scored"] or r["status"] == "skip" else f"info:{r['status']}"
        match, div, usage = _cell(r)
        if r["status"] == "skip":
            div = r["notes"][0] if r["notes"] else ""
        rows.append((r["name"], r["kind"], status.upper() if status == "fail" else status, match, div, usage,
                     ",".join(r["faults"])))
    widths = [min(max(len(row[i]) for row in rows), 60) for i in range(len(rows[0]))]
    for j, row in enumerate(rows):
        print("  ".join(c[:60].ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)
        if j == 0:
            print("  ".join("-" * w for w in widths), file=out)
    for r in results:
        if r["faults"] or (r["status"] == "warn"):
            for note in r["notes"]:
                print(f"  {r['name']}: {note}", file=out)
    print(f"\n{summary['pass']} passed, {summary['warn']} passed with a near tie, {summary['fail']} failed, "
          f"{summary['info']} reported only, {summary['skip']} skipped", file=out)
    for f, names in summary["faults"].items():
        print(f"fault {f}: {', '.join(names)}", file=out)
    print(f"exit {summary['exit_code']}", file=out)


def _jsonable(x):
    """Non-finite floats as strings ("NaN", "Infinity"), so the report is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def conform(against_url: str, dialect: str = "spin", golden_dir=None, token: str | None = None,
            profile: str = "spec", report=None, *, cases: Iterable[str] | None = None, models_root=None,
            sampled: str | None = None, timeout: float = 600.0, thresholds: dict | None = None,
            model_map: dict | None = None, out: TextIO | None = None, progress: bool = False) -> int:
    """Replay a golden set (the built-in one when `golden_dir` is None, generated into the
    cache from the models under `models_root` on first use) against the backend at
    `against_url`; print a summary table to `out` (stdout), write the JSON report to
    `report` if given, and return the exit code (0 pass, 1 fail, 2 unusable)."""
    out = out or sys.stdout
    if dialect not in DIALECTS:
        raise ValueError(f"dialect {dialect!r} is not one of {', '.join(DIALECTS)}")
    if profile not in PROFILES:
        raise ValueError(f"profile {profile!r} is not one of {', '.join(PROFILES)}")
    if sampled is None:
        sampled = "strict" if profile == "spec" else "info"
    if sampled not in ("strict", "info", "skip"):
        raise ValueError(f"sampled={sampled!r} is not one of strict, info, skip")
    try:
        gdir = Path(golden_dir) if golden_dir is not None else builtin_golden_dir(models_root, progress=progress)
        golden = load_golden(gdir)
    except (OSError, ValueError, LLMError) as e:  # LLMError: no local models to build the built-in set
        print(f"conform: cannot use the golden set: {e}", file=out)
        return 2
    th = {**THRESHOLDS, **(thresholds or {})}
    transport = Transport(against_url, token=token, timeout=timeout)
    ctx = Context(golden, DIALECT_CLASSES[dialect](golden), transport, profile, sampled, th, _Tokenizers(golden),
                  dict(model_map or {}))
    try:
        results = run_checks(golden, ctx, cases, progress=sys.stderr if progress else None)
    except Unreachable as e:
        print(f"conform: {e}", file=out)
        return 2
    finally:
        transport.close()
    summary = summarize(results)
    print_table(results, summary, out)
    if report is not None:
        doc = {"report_version": REPORT_VERSION, "against": against_url, "dialect": dialect, "profile": profile,
               "sampled": sampled, "thresholds": th, "requests": transport.requests,
               "golden": {"dir": str(golden.dir), **{k: golden.header.get(k) for k in
                                                     ("suite", "suite_version", "refllm_version", "spec_version")}},
               "summary": summary, "cases": results}
        Path(report).write_text(json.dumps(_jsonable(doc), ensure_ascii=False, indent=1, allow_nan=False) + "\n",
                                encoding="utf-8")
    return summary["exit_code"]


__all__ = ["conform", "run_checks", "summarize", "print_table", "THRESHOLDS", "DIALECTS", "PROFILES", "Transport",
           "SpinDialect", "TgiDialect", "OpenAIDialect", "Unreachable"]
