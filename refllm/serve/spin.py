"""Spin's `remote_http` LLM engine, server side: `POST /infer` and `POST /embed`.

What Spin sends (spinframework/spin, crates/llm-remote-http, `default.rs`): a JSON body
with NO content-type header and `authorization: bearer <token>`:

    POST /infer  {"model": m, "prompt": p, "options": {"maxTokens", "repeatPenalty",
                  "repeatPenaltyLastNTokenCount", "temperature", "topK", "topP"}}
             ->  {"text": t, "usage": {"promptTokenCount", "generatedTokenCount"}}
    POST /embed  {"model": m, "input": [texts]}
             ->  {"embeddings": [[f32]], "usage": {"promptTokenCount"}}

Spin reads any answer as that JSON (it does not look at the status), so a failure is a
4xx/5xx with `{"error": message, "variant": <WIT error case>}`, which Spin reports as a
runtime-error. Options missing from the body take Spin's defaults (SPEC 1); an option
Spin does not send (`max_tokens`, `top_k`: snake case is not Spin's) is refused rather
than silently ignored; `maxTokens` above the server's cap is lowered to it (the WIT:
"the backing implementation may return less tokens"). Extension: a top-level `"seed"`.
With the server's profile "spin", text and usage are those of Spin 3's local engine
(SPEC 6). An overloaded server answers 503 with Retry-After.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..types import InferencingParams, InferencingResult, InferencingUsage
from .core import (EMBED, GENERATE, LARGE_BODY, ServeError, dumps, dumps_object_rows, get_float, get_int, get_str,
                   invalid, read_json_object)
from .limits import EMBEDDING, INFERENCE, authenticate, permit

router = APIRouter()

U32 = 2**32 - 1
OPTIONS = {  # camelCase option -> (InferencingParams field, integer?)
    "maxTokens": ("max_tokens", True),
    "repeatPenalty": ("repeat_penalty", False),
    "repeatPenaltyLastNTokenCount": ("repeat_penalty_last_n_token_count", True),
    "temperature": ("temperature", False),
    "topK": ("top_k", True),
    "topP": ("top_p", False),
}
VARIANTS = {"validation": "invalid-input", "bad_request": "invalid-input", "not_found": "invalid-input",
            "forbidden": "invalid-input", "too_large": "invalid-input", "model_not_supported": "model-not-supported",
            "runtime": "runtime-error", "overloaded": "runtime-error", "timeout": "invalid-input"}


def render_error(err: ServeError, status: int) -> Response:
    body = {"error": err.message}
    if err.kind in VARIANTS:
        body["variant"] = getattr(err, "variant", VARIANTS[err.kind])
    return Response(dumps(body), status_code=status, media_type="application/json", headers=err.headers)


def json_response(obj) -> Response:
    return Response(dumps(obj), media_type="application/json")


def parse_options(options, cap: int) -> InferencingParams:
    """Spin's camelCase options -> InferencingParams (absent fields: Spin's defaults)."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise invalid("`options` must be an object", "options")
    unknown = [k for k in options if k not in OPTIONS]
    if unknown:
        raise invalid(f"unknown option `{unknown[0]}` in `options`; Spin's options are "
                      f"{', '.join(OPTIONS)} (camelCase)", f"options.{unknown[0]}")
    d = InferencingParams()
    values = {}
    for key, (field, integer) in OPTIONS.items():
        if integer:
            values[field] = get_int(options, key, getattr(d, field), lo=0, hi=U32)
        else:
            values[field] = get_float(options, key, getattr(d, field))
    values["max_tokens"] = min(values["max_tokens"], cap)
    return InferencingParams(**values)


@router.post("/infer")
async def infer(request: Request) -> Response:
    engine = request.app.state.engine
    authenticate(request)
    body = await read_json_object(request, engine.limits.max_body_bytes)
    prompt = get_str(body, "prompt")
    if prompt is None:
        raise invalid("`prompt` is required", "prompt")
    params = parse_options(body.get("options"), engine.limits.cap)
    seed = get_int(body, "seed", lo=0, hi=2**64 - 1)
    entry = engine.resolve(body.get("model"), GENERATE)
    permit(request, entry.name, INFERENCE)
    llm = await engine.load_llm(entry)
    gen = await engine.generation(llm, prompt, params, seed=seed)
    if not await engine.run(gen, request):
        return Response(status_code=499)  # the client has gone
    result = gen.result
    if engine.config.profile == "spin":  # Spin 3's engine: prompt + completion, prompt + generated tokens
        u = result.usage
        usage = InferencingUsage(u.prompt_token_count + u.generated_token_count, u.generated_token_count)
        result = InferencingResult(prompt + result.text, usage)
    return json_response({"text": result.text, "usage": {"promptTokenCount": result.usage.prompt_token_count,
                                                          "generatedTokenCount": result.usage.generated_token_count}})


@router.post("/embed")
async def embed(request: Request) -> Response:
    engine = request.app.state.engine
    authenticate(request)
    body = await read_json_object(request, engine.limits.max_body_bytes)
    texts = body.get("input")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise invalid("`input` must be a list of strings", "input")
    if not texts:
        raise invalid("`input` must not be empty", "input")
    engine.limits.check_client_batch(len(texts), "input")
    entry = engine.resolve(body.get("model"), EMBED)
    permit(request, entry.name, EMBEDDING, len(texts))
    embedder = await engine.load_embedder(entry)
    result = await engine.embed(embedder, texts, profile=engine.config.profile, request=request)
    if result is None:
        return Response(status_code=499)  # the client has gone
    out = {"embeddings": result.embeddings, "usage": {"promptTokenCount": result.usage.prompt_token_count}}
    if len(texts) * embedder.dim * 10 < LARGE_BODY:  # ~10 bytes a number
        return json_response(out)
    return Response(await engine.off_loop(lambda: dumps_object_rows(out, "embeddings")), media_type="application/json")


__all__ = ["router", "render_error", "parse_options"]
