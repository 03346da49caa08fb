"""conform's dialects: how a golden case becomes a request, and an answer becomes `Got`.

    spin     POST /infer {"model","prompt","options":{camelCase WIT params},"seed"}
             POST /embed {"model","input"}              (the seed is refllm's extension)
    tgi      POST /generate {"inputs","parameters":{max_new_tokens, details: true,
             do_sample, temperature, top_k, top_p, repetition_penalty, seed}};
             embeddings and model-specific errors via POST /models/<model>
    openai   POST /v1/completions {"model","prompt","max_tokens","temperature","top_p",
             "seed","logprobs":1, and the backend's own names for top-k, the repeat
             penalty and min-p (`backends.BACKENDS`), with every default neutralised};
             POST /v1/embeddings {"model","input","encoding_format":"float"}

A case a dialect or backend cannot express raises `Skip`, which says why: a penalty
window the backend cannot hold (`backends.Backend.penalty`), max-tokens 0, a
temperature above OpenAI's 2, a knob the backend does not read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..golden import Golden, params_from_json
from ..types import InferencingParams
from .backends import BACKENDS, Backend
from .transport import Response

TOP_K_ALL = 2**31  # a top_k at or above this (or the vocabulary) keeps every candidate


class Skip(Exception):
    """The case cannot be expressed in this dialect or by this backend."""


@dataclass
class Got:
    """What a backend answered to a generation request."""

    text: str
    tokens: list[dict] | None = None  # per token: "id" and/or "text", maybe "logprob"
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    finish_reason: str | None = None  # "stop" | "length" (normalised), None if not given


def penalty_mode(case: dict, params: InferencingParams) -> str:
    """"none", "whole" (the window covers the whole sequence) or "window" (it does not)."""
    if params.repeat_penalty == 1.0 or params.repeat_penalty_last_n_token_count == 0:
        return "none"
    if params.repeat_penalty_last_n_token_count >= len(case["prompt_ids"]) + params.max_tokens:
        return "whole"
    return "window"


class Dialect:
    name = ""

    def __init__(self, golden: Golden, backend: Backend | None = None):
        self.golden = golden
        self.backend = backend or BACKENDS["refllm"]

    def vocab_size(self, model: str) -> int:
        return int(self.golden.header.get("models", {}).get(model, {}).get("vocab_size") or TOP_K_ALL)

    def variant(self, r: Response) -> str | None:
        return None

    @staticmethod
    def set_seed(body: dict, seed: int) -> dict:
        """The request `body` with another sampling seed (the statistical check's draws)."""
        return {**body, "seed": seed}


class SpinDialect(Dialect):
    """Spin's remote_http engine."""

    name = "spin"

    @staticmethod
    def options(p: InferencingParams) -> dict:
        return {"maxTokens": p.max_tokens, "repeatPenalty": p.repeat_penalty,
                "repeatPenaltyLastNTokenCount": p.repeat_penalty_last_n_token_count, "temperature": p.temperature,
                "topK": p.top_k, "topP": p.top_p}

    def generate(self, case: dict, model: str, params: InferencingParams, first_only: bool = False):
        if first_only:
            params = dataclasses.replace(params, max_tokens=1)
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

    def generate(self, case: dict, model: str, params: InferencingParams, first_only: bool = False):
        if params.max_tokens == 0:
            raise Skip("TGI needs max_new_tokens >= 1")
        mode = penalty_mode(case, params)
        if mode == "window":
            raise Skip("TGI penalises the whole sequence; this case's penalty window is shorter")
        p: dict = {"max_new_tokens": 1 if first_only else params.max_tokens, "details": True, "decoder_input_details": False}
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

    @staticmethod
    def set_seed(body: dict, seed: int) -> dict:
        return {**body, "parameters": {**body["parameters"], "seed": seed}}

    def parse_generate(self, r: Response, case: dict) -> Got:
        body = r.body[0] if isinstance(r.body, list) else r.body
        details = body.get("details") or {}
        tokens = [{"id": t.get("id"), "text": t.get("text"), "logprob": t.get("logprob")}
                  for t in details.get("tokens") or []] if "tokens" in details else None
        prompt = r.headers.get("x-prompt-tokens")
        finish = {"eos_token": "stop", "stop_sequence": "stop"}.get(details.get("finish_reason"),
                                                                     details.get("finish_reason"))
        return Got(body["generated_text"], tokens, int(prompt) if prompt and prompt.isdigit() else None,
                   details.get("generated_tokens"), finish)

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
    """OpenAI's completions and embeddings, in the backend's own names (`backends`)."""

    name = "openai"

    def _sampling_fields(self, case: dict, model: str, params: InferencingParams, first_only: bool) -> dict:
        """The fields every generation request carries: the backend's defaults neutralised,
        then the case's knobs under the backend's names."""
        be = self.backend
        body: dict = dict(be.neutral)
        mode = penalty_mode(case, params)
        pen = be.field("repeat_penalty")
        if mode != "none":
            if pen is None:
                raise Skip(f"{be.name} has no multiplicative repeat penalty")
            if be.penalty == "whole" and mode == "window":
                raise Skip(f"{be.name} penalises the whole sequence; this case's penalty window is shorter")
            if be.penalty == "generated-last-n" and not first_only and not case.get("window_immaterial"):
                raise Skip(f"{be.name}'s penalty window holds only the generated tokens (its last-n is fixed when "
                           f"the server starts); this case's window holds prompt tokens")
            body[pen] = params.repeat_penalty
            if be.penalty == "last-n" and be.field("last_n"):
                body[be.field("last_n")] = params.repeat_penalty_last_n_token_count
        elif pen is not None:
            body[pen] = 1.0
        top_k = be.field("top_k")
        if params.temperature > 0:
            if params.top_p <= 0:
                raise Skip("OpenAI needs 0 < top_p")
            body.update(temperature=params.temperature, seed=case["seed"], top_p=min(params.top_p, 1.0))
            if params.top_k < min(TOP_K_ALL, self.vocab_size(model)):
                if top_k is None:
                    raise Skip(f"{be.name} has no top-k")
                body[top_k] = params.top_k
            elif top_k is not None and be.top_k_off is not None:
                body[top_k] = be.top_k_off
        else:
            body["temperature"] = 0
            if top_k is not None and be.top_k_off is not None:
                body[top_k] = be.top_k_off
        return body

    def generate(self, case: dict, model: str, params: InferencingParams, first_only: bool = False):
        if params.max_tokens == 0:
            raise Skip("OpenAI needs max_tokens >= 1")
        if params.temperature > 2:
            raise Skip("OpenAI caps the temperature at 2")
        body: dict = {"model": model, "prompt": case["prompt"], "max_tokens": 1 if first_only else params.max_tokens,
                      "logprobs": 1}
        body.update(self._sampling_fields(case, model, params, first_only))
        return "/v1/completions", body

    def parse_generate(self, r: Response, case: dict) -> Got:
        choice = r.body["choices"][0]
        lp = choice.get("logprobs")
        tokens = None
        if lp and lp.get("tokens") is not None:
            tokens = [{"text": t, "logprob": v} for t, v in zip(lp["tokens"], lp.get("token_logprobs") or [])]
        u = r.body.get("usage") or {}
        return Got(choice.get("text", ""), tokens, u.get("prompt_tokens"), u.get("completion_tokens"),
                   choice.get("finish_reason"))

    def embed(self, case: dict, model: str):
        return "/v1/embeddings", {"model": model, "input": case["texts"], "encoding_format": "float"}

    def parse_embed(self, r: Response):
        data = sorted(r.body["data"], key=lambda d: d.get("index", 0))
        return [d["embedding"] for d in data], (r.body.get("usage") or {}).get("prompt_tokens")

    def error(self, case: dict, model: str):
        if case["op"] == "infer":
            p = params_from_json(case["params"])
            body = {"model": model, "prompt": case["prompt"], "max_tokens": max(1, p.max_tokens),
                    "temperature": p.temperature, "top_p": p.top_p, "seed": 0}
            for knob, value in (("top_k", p.top_k), ("repeat_penalty", p.repeat_penalty)):
                name = self.backend.field(knob)
                if name is not None:
                    body[name] = value
            return "/v1/completions", body
        return "/v1/embeddings", {"model": model, "input": case["texts"], "encoding_format": "float"}


DIALECT_CLASSES = {"spin": SpinDialect, "tgi": TgiDialect, "openai": OpenAIDialect}
