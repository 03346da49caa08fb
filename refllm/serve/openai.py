"""OpenAI's API, over refllm's models: what the `openai` package (and huggingface_hub's
`chat_completion`) speak.

    POST /v1/chat/completions   messages rendered with the model's chat template (jinja2,
                                sandboxed: `refllm.chat`), then generated as `refllm.infer`
    POST /v1/completions        a prompt (or a list of them), as `refllm.infer`
    POST /v1/embeddings         float lists, or base64 of little-endian float32 (the openai
                                package asks for base64 unless told otherwise)
    GET  /v1/models, /v1/models/<id>

Parameters map onto refllm's sampling (SPEC 3): `temperature` (default 1; 0 is greedy),
`top_p` (default 1), `max_tokens` / `max_completion_tokens` (default and maximum: the
server's token cap), `seed`, `stop` (up to 4; the text ends before it, as OpenAI's
does); vLLM-style extensions `top_k` (default all) and `repetition_penalty` (default 1,
over the whole context). So a chat request's text is `refllm.infer(model,
llm.apply_chat_template(messages), params, seed=seed, stop=stop)`'s.
`logprobs` / `top_logprobs` (chat) and `logprobs` (completions) are the log-softmax of
the logits each token was drawn from. `n` > 1, penalties other than 0, `logit_bias`,
tools and non-text response formats are refused with a 400 naming the parameter.
A list of prompts (or of embedding inputs) counts once per item against the quota and
may hold at most `--max-client-batch` items; its prompts are decoded together. An
overloaded server answers 503 with Retry-After (the openai package retries it).

Streams are `data: {json}` server-sent events ending with `data: [DONE]`; with
`stream_options: {"include_usage": true}` every chunk carries `"usage": null` and a last
chunk with no choices carries the usage. Errors are `{"error": {"message", "type",
"param", "code"}}`.
"""

from __future__ import annotations

import base64
import logging
import time
import uuid

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from .. import __version__
from ..errors import LLMError
from ..types import InferencingParams
from .core import (EMBED, GENERATE, LARGE_BODY, NO_TOP_K, SSE_DONE, SSE_HEADERS, ServeError, dumps, dumps_object_rows,
                   finished, from_llm_error, get_bool, get_float, get_int, get_str, get_str_list, invalid,
                   log_softmax_at, read_json_object, sse, top_logprobs)
from .limits import EMBEDDING, INFERENCE, authenticate, permit

router = APIRouter(prefix="/v1")
log = logging.getLogger("refllm.serve")

FINGERPRINT = f"refllm-{__version__}"
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
U64 = 2**64 - 1

_TYPES = {"rate_limited": "requests", "runtime": "server_error", "loading": "server_error",
          "forbidden": "permission_error", "overloaded": "server_error"}
_CODES = {"not_found": "model_not_found", "unauthorized": "invalid_api_key", "rate_limited": "rate_limit_exceeded",
          "too_large": "request_too_large", "model_not_supported": "model_not_supported",
          "forbidden": "model_not_allowed", "overloaded": "overloaded", "timeout": "timeout"}


def render_error(err: ServeError, status: int) -> Response:
    message = err.message
    if err.kind == "not_found" and "model" in err.extra:
        message = f"The model `{err.extra['model']}` does not exist or you do not have access to it."
    body = {"error": {"message": message, "type": _TYPES.get(err.kind, "invalid_request_error"),
                      "param": err.param, "code": _CODES.get(err.kind)}}
    return Response(dumps(body), status_code=status, media_type="application/json", headers=err.headers)


def _json(obj) -> Response:
    return Response(dumps(obj), media_type="application/json")


# ----------------------------------------------------------------------------- parameters

class Sampling:
    """The parameters chat and completions share, validated as OpenAI does."""

    def __init__(self, body: dict, limits):
        max_tokens = get_int(body, "max_completion_tokens", lo=1, hi=2**32 - 1)
        if max_tokens is not None:
            limits.check_max_tokens(max_tokens, "max_completion_tokens")
        else:
            max_tokens = get_int(body, "max_tokens", lo=1, hi=2**32 - 1)
            if max_tokens is not None:
                limits.check_max_tokens(max_tokens, "max_tokens")
        temperature = get_float(body, "temperature", 1.0)
        if not 0 <= temperature <= 2:
            raise invalid(f"`temperature` must be in [0, 2], got {temperature}", "temperature")
        top_p = get_float(body, "top_p", 1.0)
        if not 0 < top_p <= 1:
            raise invalid(f"`top_p` must be in (0, 1], got {top_p}", "top_p")
        top_k = get_int(body, "top_k", lo=-1, hi=2**32 - 1)
        if top_k == 0:
            raise invalid("`top_k` must be positive (or -1 for all)", "top_k")
        repetition_penalty = get_float(body, "repetition_penalty", 1.0)
        if repetition_penalty <= 0:
            raise invalid("`repetition_penalty` must be strictly positive", "repetition_penalty")
        if get_int(body, "n", 1, lo=1) != 1:
            raise invalid("`n` must be 1: refllm makes one choice per request", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if get_float(body, name, 0.0) != 0.0:
                raise invalid(f"`{name}` is not supported by refllm (only 0)", name)
        if body.get("logit_bias"):
            raise invalid("`logit_bias` is not supported by refllm", "logit_bias")
        self.seed = get_int(body, "seed", lo=0, hi=U64, message="`seed` must be an integer in [0, 2^64)")
        self.stop = get_str_list(body, "stop", allow_str=True, max_items=MAX_STOP)
        self.stream = get_bool(body, "stream", False)
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise invalid("`stream_options` must be an object", "stream_options")
        self.include_usage = bool(options) and get_bool(options, "include_usage", False,
                                                        name="stream_options.include_usage")
        self.params = InferencingParams(
            max_tokens=max_tokens if max_tokens is not None else limits.cap,
            repeat_penalty=repetition_penalty, repeat_penalty_last_n_token_count=2**32 - 1,
            temperature=temperature, top_k=NO_TOP_K if top_k in (None, -1) else top_k, top_p=top_p)


def _usage(gen) -> dict:
    p, c = len(gen.prompt_ids), len(gen.tokens)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _logprob_entry(llm, token: int, logits, k: int) -> dict:
    text = llm.decode([token])
    entry = {"token": text, "logprob": float(log_softmax_at(logits, [token])[0]), "bytes": list(text.encode()),
             "top_logprobs": []}
    for i, lp in top_logprobs(logits, k):
        t = llm.decode([i])
        entry["top_logprobs"].append({"token": t, "logprob": lp, "bytes": list(t.encode())})
    return entry


async def _generation(request: Request, body: dict, sampling: Sampling, prompt_of, n: int = 1):
    """Resolve, admit (`n` prompts against the quota), load, render the prompt
    (prompt_of(llm)) and make the generation."""
    engine = request.app.state.engine
    entry = engine.resolve(body.get("model"), GENERATE)
    permit(request, entry.name, INFERENCE, n)
    llm = await engine.load_llm(entry)
    prompt = await engine.off_loop(lambda: prompt_of(llm))
    gen = await engine.generation(llm, prompt, sampling.params, seed=sampling.seed, stop=sampling.stop)
    return entry, llm, prompt, gen


def _stream(chunks) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                yield sse(chunk)
        except Exception as e:  # noqa: BLE001 - the headers are sent: end the stream with an error chunk
            if isinstance(e, ServeError):
                err = e
            elif isinstance(e, LLMError):
                err = from_llm_error(e)
            else:
                log.exception("OpenAI stream failed")
                err = ServeError("runtime", f"internal error: {type(e).__name__}: {e}")
            yield sse({"error": {"message": err.message, "type": _TYPES.get(err.kind, "invalid_request_error"),
                                 "param": err.param, "code": _CODES.get(err.kind)}})
        yield SSE_DONE

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


# ----------------------------------------------------------------------------- chat

@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    engine = request.app.state.engine
    authenticate(request)
    body = await read_json_object(request, engine.limits.max_body_bytes)
    sampling = Sampling(body, engine.limits)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("`messages` must be a non-empty array", "messages")
    for name in ("tools", "functions", "tool_choice", "function_call"):
        if body.get(name) not in (None, [], "none"):
            raise invalid(f"`{name}` is not supported by refllm", name)
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise invalid("`response_format` must be {\"type\": \"text\"}", "response_format")
    want_logprobs = get_bool(body, "logprobs", False)
    k = get_int(body, "top_logprobs", 0, lo=0, hi=MAX_TOP_LOGPROBS)
    if k and not want_logprobs:
        raise invalid("`top_logprobs` requires `logprobs` to be true", "top_logprobs")

    entry, llm, _, gen = await _generation(request, body, sampling, lambda llm: llm.apply_chat_template(messages))
    cid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": entry.name,
            "system_fingerprint": FINGERPRINT}

    if sampling.stream:
        def chunk(delta: dict, finish=None, logprobs=None) -> dict:
            c = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
            if sampling.include_usage:
                c["usage"] = None
            return c

        def lp(first: int, last: int):
            if not want_logprobs:
                return None
            return {"content": [_logprob_entry(llm, gen.steps[i].token, gen.steps[i].logits, k)
                                for i in range(first, last)]}

        async def chunks():
            yield chunk({"role": "assistant", "content": ""})
            seen = 0
            async for piece, n in engine.pieces(gen, request):
                if piece:
                    yield chunk({"content": piece}, logprobs=lp(seen, n))
                    seen = n
            if not finished(gen):
                return
            tail = lp(seen, len(gen.steps)) if seen < len(gen.steps) else None  # tokens that added no text
            yield chunk({}, FINISH_REASONS[gen.finish_reason], tail)
            if sampling.include_usage:
                yield {**head, "choices": [], "usage": _usage(gen)}

        return _stream(chunks())

    if not await engine.run(gen, request):
        return Response(status_code=499)
    logprobs = None
    if want_logprobs:
        logprobs = {"content": [_logprob_entry(llm, s.token, s.logits, k) for s in gen.steps]}
    return _json({"id": cid, "object": "chat.completion", "created": created, "model": entry.name,
                  "system_fingerprint": FINGERPRINT,
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.result.text},
                               "logprobs": logprobs, "finish_reason": FINISH_REASONS[gen.finish_reason]}],
                  "usage": _usage(gen)})


# ----------------------------------------------------------------------------- completions

def _completion_logprobs(llm, gen, k: int, offset: int) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for s in gen.steps:
        text = llm.decode([s.token])
        out["tokens"].append(text)
        out["token_logprobs"].append(float(log_softmax_at(s.logits, [s.token])[0]))
        out["top_logprobs"].append({llm.decode([i]): v for i, v in top_logprobs(s.logits, k)})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


@router.post("/completions")
async def completions(request: Request) -> Response:
    engine = request.app.state.engine
    authenticate(request)
    body = await read_json_object(request, engine.limits.max_body_bytes)
    sampling = Sampling(body, engine.limits)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise invalid("`prompt` must be a string or a non-empty array of strings (token arrays are not supported)",
                      "prompt")
    echo = get_bool(body, "echo", False)
    if get_str(body, "suffix"):
        raise invalid("`suffix` is not supported by refllm", "suffix")
    if get_int(body, "best_of", 1, lo=1) != 1:
        raise invalid("`best_of` must be 1", "best_of")
    k = get_int(body, "logprobs", lo=0, hi=5)
    if sampling.stream and len(prompts) != 1:
        raise invalid("streaming takes one prompt", "prompt")
    request.app.state.engine.limits.check_client_batch(len(prompts), "prompt")

    cid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())
    if sampling.stream:
        entry, llm, _, gen = await _generation(request, body, sampling, lambda llm: prompts[0])
        head = {"id": cid, "object": "text_completion", "created": created, "model": entry.name,
                "system_fingerprint": FINGERPRINT}

        def chunk(text: str, finish=None) -> dict:
            c = {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
            if sampling.include_usage:
                c["usage"] = None
            return c

        async def chunks():
            if echo:
                yield chunk(prompts[0])
            async for piece, _ in engine.pieces(gen, request):
                if piece:
                    yield chunk(piece)
            if not finished(gen):
                return
            yield chunk("", FINISH_REASONS[gen.finish_reason])
            if sampling.include_usage:
                yield {**head, "choices": [], "usage": _usage(gen)}

        return _stream(chunks())

    entry, llm, _, first = await _generation(request, body, sampling, lambda llm: prompts[0], len(prompts))
    gens = [first] + [await engine.generation(llm, p, sampling.params, seed=sampling.seed, stop=sampling.stop)
                      for p in prompts[1:]]
    if not await engine.run_all(gens, request):  # decoded together
        return Response(status_code=499)
    choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for i, (p, gen) in enumerate(zip(prompts, gens)):
        text = (p if echo else "") + gen.result.text
        logprobs = _completion_logprobs(llm, gen, k, len(p) if echo else 0) if k is not None else None
        choices.append({"index": i, "text": text, "finish_reason": FINISH_REASONS[gen.finish_reason],
                        "logprobs": logprobs})
        for key, v in _usage(gen).items():
            usage[key] += v
    return _json({"id": cid, "object": "text_completion", "created": created, "model": entry.name,
                  "system_fingerprint": FINGERPRINT, "choices": choices, "usage": usage})


# ----------------------------------------------------------------------------- embeddings

@router.post("/embeddings")
async def embeddings(request: Request) -> Response:
    engine = request.app.state.engine
    authenticate(request)
    body = await read_json_object(request, engine.limits.max_body_bytes)
    inputs = body.get("input")
    texts = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise invalid("`input` must be a string or a non-empty array of strings (token arrays are not supported)",
                      "input")
    fmt = get_str(body, "encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise invalid("`encoding_format` must be \"float\" or \"base64\"", "encoding_format")
    dimensions = get_int(body, "dimensions", lo=1)
    engine.limits.check_client_batch(len(texts), "input")
    entry = engine.resolve(body.get("model"), EMBED)
    permit(request, entry.name, EMBEDDING, len(texts))
    embedder = await engine.load_embedder(entry)
    if dimensions is not None and dimensions != embedder.dim:
        raise invalid(f"`dimensions` must be {embedder.dim} for {entry.name}", "dimensions")
    result = await engine.embed(embedder, texts, request=request)
    if result is None:
        return Response(status_code=499)  # the client has gone

    def encode(v):
        return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii") if fmt == "base64" else v

    def body() -> bytes:  # a row at a time: a large answer is encoded in the loader pool
        n = result.usage.prompt_token_count
        return dumps_object_rows({"object": "list", "model": entry.name,
                                  "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                                           for i, v in enumerate(result.embeddings)],
                                  "usage": {"prompt_tokens": n, "total_tokens": n}}, "data")

    small = len(texts) * embedder.dim * 10 < LARGE_BODY  # ~10 bytes a number
    return Response(body() if small else await engine.off_loop(body), media_type="application/json")


# ----------------------------------------------------------------------------- models

def _model(engine, e) -> dict:
    try:
        created = int(e.path.stat().st_mtime)
    except OSError:
        created = 0
    return {"id": e.name, "object": "model", "created": created, "owned_by": "refllm",
            "task": "text-generation" if e.kind == "llama" else "feature-extraction"}


def _visible(request, engine):
    token = getattr(request.state, "token", None)
    for e in engine.models():
        try:
            engine.limits.check_model(token, e.name)
        except ServeError:
            continue
        yield e


@router.get("/models")
async def list_models(request: Request) -> Response:
    engine = request.app.state.engine
    authenticate(request)
    return _json({"object": "list", "data": [_model(engine, e) for e in _visible(request, engine)]})


@router.get("/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> Response:
    engine = request.app.state.engine
    authenticate(request)
    for e in _visible(request, engine):
        if e.name == model_id:
            return _json(_model(engine, e))
    raise ServeError("not_found", f"no model '{model_id}'", param="model", extra={"model": model_id})


__all__ = ["router", "render_error"]
