"""Hugging Face's Inference API and Text Generation Inference (TGI), over refllm's models.

Routes (the shapes follow TGI's router, `huggingface/text-generation-inference`
router/src/server.rs, and the Serverless Inference API it fronts):

    POST /                  {"inputs", "parameters", "stream"}  text generation, default model
                            {"inputs", "normalize", "truncate"} feature extraction, default model
                            (huggingface_hub posts both here when given a base_url; a body with
                            "parameters" or "stream" is text generation, any other one features)
    POST /models/<id>       the task is the model's: a decoder generates, an encoder embeds
    POST /generate          TGI: one object, not a list
    POST /generate_stream   TGI: server-sent events, one `data: {json}` per token
    GET  /info              TGI's model info

Text generation answers `[{"generated_text"}]` on / and /models/<id> (TGI's
`compat_generate` wraps it in a list "to match api-inference") and `{"generated_text",
"details"}` on /generate. Feature extraction answers `[[...]]`, one vector per input.

TGI's parameters map onto refllm's sampling (SPEC 3) as follows; the text is then the
text `refllm.infer(model, inputs, params, seed=seed, stop=stop)` returns:

    sampling       do_sample, or any warper set (temperature != 1, top_k, top_p < 1), as TGI
    greedy         temperature = 0 (refllm's greedy path; no draw consumed)
    temperature    as given, else 1.0          top_k   as given, else all (2^32 - 1)
    top_p          as given, else 1.0          repeat_penalty  repetition_penalty, else 1.0,
    max_tokens     max_new_tokens, else 100    over the whole context (last_n = context length)
    seed, stop     as given; TGI keeps the stop string at the end of the text, so we append it
    truncate       keep the last N prompt tokens; return_full_text: inputs + text

`details` gives finish_reason ("length" | "eos_token" | "stop_sequence"),
generated_tokens, seed (when sampling) and per-token logprobs: the log-softmax of the
logits each token was drawn from (`Step.logits`, before penalty and temperature);
`top_n_tokens` the n most likely alternatives likewise. `decoder_input_details` lists
the prompt tokens with null logprobs (refllm keeps only the last position's logits).

Errors: `{"error", "error_type"}`; validation errors are 422 with error_type
"validation". While a model is being loaded, 503 `{"error": "Model <id> is currently
loading", "estimated_time"}`, unless `x-wait-for-model: true` (or the legacy body
`"options": {"wait_for_model": true}`). Identical deterministic requests (seeded, or
greedy, and every embedding) are answered from a response cache unless `x-use-cache: 0`
(or `"options": {"use_cache": false}`); answers say `x-cache: hit` or `miss`.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from .. import __version__
from ..config import read_json
from ..errors import LLMError
from ..types import InferencingParams
from .core import (EMBED, GENERATE, LARGE_BODY, NO_TOP_K, PLACEHOLDER_MODELS, SSE_HEADERS, ServeError, dumps,
                   dumps_rows, finished, get_bool, get_float, get_int, get_str, get_str_list, header_true, invalid,
                   log_softmax_at, read_json_object, sse, top_logprobs)
from .limits import EMBEDDING, INFERENCE, authenticate, permit

router = APIRouter()
log = logging.getLogger("refllm.serve")

FINISH_REASONS = {"eos": "eos_token", "length": "length", "context": "length", "stop": "stop_sequence"}
DEFAULT_MAX_NEW_TOKENS = 100
MAX_STOP_SEQUENCES = 4  # TGI's default --max-stop-sequences
MAX_TOP_N_TOKENS = 5  # TGI's default --max-top-n-tokens
U64 = 2**64 - 1


def render_error(err: ServeError, status: int) -> Response:
    if err.kind == "validation":
        status = 422
    if err.kind == "loading":
        body = {"error": err.message, "estimated_time": err.extra.get("estimated_time", 1.0)}
    elif err.kind == "not_found" and "model" in err.extra:
        body = {"error": f"Model {err.extra['model']} does not exist"}
    elif err.kind == "not_found":  # a route: say so
        body = {"error": err.message}
    elif err.kind == "overloaded":  # TGI's router: InferError::Overloaded
        status, body = 429, {"error": "Model is overloaded", "error_type": "overloaded"}
    else:
        body = {"error": ("Input validation error: " + err.message) if err.kind == "validation" else err.message}
        error_type = {"validation": "validation", "bad_request": "validation", "too_large": "validation",
                      "model_not_supported": "validation", "runtime": "generation", "timeout": "timeout"}.get(err.kind)
        if error_type:
            body["error_type"] = error_type
    return Response(dumps(body), status_code=status, media_type="application/json", headers=err.headers)


# ----------------------------------------------------------------------------- parsing

class GenerateRequest:
    """A TGI request, validated as TGI's router does, mapped to refllm's parameters."""

    def __init__(self, body: dict, cap: int, force_stream: bool | None = None):
        inputs = body.get("inputs")
        if not isinstance(inputs, str):
            raise invalid("`inputs` must be a string", "inputs")
        if not inputs:
            raise invalid("`inputs` cannot be empty", "inputs")
        p = body.get("parameters")
        if p is None:
            p = {}
        if not isinstance(p, dict):
            raise invalid("`parameters` must be an object", "parameters")
        self.inputs = inputs
        self.stream = get_bool(body, "stream", False) if force_stream is None else force_stream

        best_of = get_int(p, "best_of", 1, lo=1)
        if best_of != 1:
            raise invalid("`best_of` != 1 is not supported by refllm", "best_of")
        typical_p = get_float(p, "typical_p")
        if typical_p is not None and typical_p != 1.0:
            raise invalid("`typical_p` is not supported by refllm", "typical_p")
        if get_float(p, "frequency_penalty", 0.0) != 0.0:
            raise invalid("`frequency_penalty` is not supported by refllm", "frequency_penalty")
        if get_bool(p, "watermark", False):
            raise invalid("`watermark` is not supported by refllm", "watermark")
        for name in ("grammar", "adapter_id"):
            if p.get(name) is not None:
                raise invalid(f"`{name}` is not supported by refllm", name)

        temperature = get_float(p, "temperature")
        if temperature is not None and temperature <= 0:
            raise invalid("`temperature` must be strictly positive", "temperature")
        repetition_penalty = get_float(p, "repetition_penalty")
        if repetition_penalty is not None and repetition_penalty <= 0:
            raise invalid("`repetition_penalty` must be strictly positive", "repetition_penalty")
        top_k = get_int(p, "top_k", lo=1, hi=2**32 - 1, message="`top_k` must be strictly positive")
        top_p = get_float(p, "top_p")
        if top_p is not None and not 0 < top_p < 1:
            raise invalid("`top_p` must be > 0.0 and < 1.0", "top_p")
        max_new_tokens = get_int(p, "max_new_tokens", lo=1, hi=2**32 - 1,
                                 message="`max_new_tokens` must be strictly positive")
        if max_new_tokens is not None:
            if max_new_tokens > cap:
                raise invalid(f"`max_new_tokens` must be <= {cap}. Given: {max_new_tokens}", "max_new_tokens")
        else:
            max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, cap)
        self.seed = get_int(p, "seed", lo=0, hi=U64, message="`seed` must be an integer in [0, 2^64)")
        self.stop = get_str_list(p, "stop", max_items=MAX_STOP_SEQUENCES)
        self.details = get_bool(p, "details", False)
        self.decoder_input_details = get_bool(p, "decoder_input_details", False)
        self.return_full_text = get_bool(p, "return_full_text", False)
        self.top_n_tokens = get_int(p, "top_n_tokens", 0, lo=0, hi=MAX_TOP_N_TOKENS,
                                    message=f"`top_n_tokens` must be <= {MAX_TOP_N_TOKENS}")
        self.truncate = get_int(p, "truncate", lo=1, message="`truncate` must be strictly positive")
        do_sample = get_bool(p, "do_sample", False)

        # TGI's NextTokenChooser: sample if asked to, or if any warper is set
        self.sampling = bool(do_sample or (temperature is not None and temperature != 1.0) or top_k is not None
                             or (top_p is not None and top_p < 1.0))
        self.params = InferencingParams(
            max_tokens=max_new_tokens,
            repeat_penalty=repetition_penalty if repetition_penalty is not None else 1.0,
            repeat_penalty_last_n_token_count=2**32 - 1,  # TGI penalises every token of the context
            temperature=(temperature if temperature is not None else 1.0) if self.sampling else 0.0,
            top_k=top_k if top_k is not None else NO_TOP_K,
            top_p=top_p if top_p is not None else 1.0,
        )

    @property
    def deterministic(self) -> bool:
        return not self.sampling or self.seed is not None

    def cache_key(self, model: str, route: str) -> tuple:
        return ("tgi", route, model, self.inputs, vars(self.params), self.seed, self.stop, self.details,
                self.decoder_input_details, self.return_full_text, self.top_n_tokens, self.truncate)


def is_generation_body(body: dict) -> bool:
    """POST /'s rule: "parameters" or "stream" (and a string input) mean text generation."""
    if isinstance(body.get("inputs"), list):
        return False
    return "parameters" in body or "stream" in body


def _options(body: dict) -> dict:
    o = body.get("options")
    return o if isinstance(o, dict) else {}


def wait_for_model(request: Request, body: dict) -> bool:
    v = header_true(request.headers.get("x-wait-for-model"))
    if v is None:
        v = _options(body).get("wait_for_model") is True
    return v


def use_cache(request: Request, body: dict) -> bool:
    v = header_true(request.headers.get("x-use-cache"))
    if v is None:
        v = _options(body).get("use_cache") is not False
    return v


def check_loading(request: Request, entry, body: dict) -> None:
    eta = request.app.state.engine.loading_eta(entry)
    if eta is not None and not wait_for_model(request, body):
        raise ServeError("loading", f"Model {entry.name} is currently loading", extra={"estimated_time": eta})


# ----------------------------------------------------------------------------- text generation

def _token(llm, token: int, text: str, logits) -> dict:
    return {"id": token, "text": text, "logprob": float(log_softmax_at(logits, [token])[0]),
            "special": token in llm.eos_token_ids}


def _top_tokens(llm, logits, n: int) -> list[dict]:
    return [{"id": i, "text": llm.decode([i]), "logprob": lp, "special": i in llm.eos_token_ids}
            for i, lp in top_logprobs(logits, n)]


def _headers(gen) -> dict:  # as TGI's
    return {"x-compute-type": "cpu", "x-prompt-tokens": str(len(gen.prompt_ids)),
            "x-generated-tokens": str(len(gen.tokens))}


async def text_generation(request: Request, body: dict, model: str | None, route: str,
                          force_stream: bool | None = None) -> Response:
    engine = request.app.state.engine
    req = GenerateRequest(body, engine.limits.cap, force_stream)
    entry = engine.resolve(model, GENERATE)
    check_loading(request, entry, body)
    permit(request, entry.name, INFERENCE)
    key = None
    if not req.stream and req.deterministic and use_cache(request, body):
        key = engine.cache.key(*req.cache_key(entry.name, route))
        hit = engine.cache.get(key)
        if hit is not None:
            content, headers = hit
            return Response(content, media_type="application/json", headers={**headers, "x-cache": "hit"})

    llm = await engine.load_llm(entry)
    prompt_ids = None
    if req.truncate is not None:
        prompt_ids = (await engine.off_loop(lambda: llm.encode(req.inputs)))[-req.truncate:]
    gen = await engine.generation(llm, req.inputs, req.params, seed=req.seed, stop=req.stop, prompt_ids=prompt_ids)
    seed = gen.seed if req.sampling else None
    prefix = req.inputs if req.return_full_text else ""

    def details_of(tokens: list[dict], top: list[list[dict]]) -> dict:
        d = {"finish_reason": FINISH_REASONS[gen.finish_reason], "generated_tokens": len(gen.tokens), "seed": seed,
             "prefill": [], "tokens": tokens}
        if req.decoder_input_details:
            d["prefill"] = [{"id": i, "text": llm.decode([i]), "logprob": None} for i in gen.prompt_ids]
        if req.top_n_tokens:
            d["top_tokens"] = top
        return d

    def stop_suffix() -> str:
        return gen.stop_sequence if gen.finish_reason == "stop" and gen.stop_sequence else ""

    if req.stream:
        async def events():
            try:
                async for ev in engine.token_events(gen, request):
                    text = ev.text + (stop_suffix() if ev.last else "")
                    msg = {"index": ev.index + 1, "token": _token(llm, ev.token, text, ev.logits),
                           "generated_text": None, "details": None}
                    if req.top_n_tokens:
                        msg["top_tokens"] = _top_tokens(llm, ev.logits, req.top_n_tokens)
                    if ev.last:
                        msg["generated_text"] = prefix + gen.result.text + stop_suffix()
                        if req.details:
                            msg["details"] = {"finish_reason": FINISH_REASONS[gen.finish_reason],
                                              "generated_tokens": len(gen.tokens), "seed": seed}
                    yield sse(msg)
            except (ServeError, LLMError) as e:
                yield sse({"error": e.message, "error_type": "generation"})
            except Exception as e:  # noqa: BLE001 - a bug: end the stream with TGI's error event
                log.exception("text generation stream failed")
                yield sse({"error": f"internal error: {type(e).__name__}: {e}", "error_type": "generation"})

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    tokens, top = [], []
    async for ev in engine.token_events(gen, request):
        text = ev.text + (stop_suffix() if ev.last else "")
        if req.details:
            tokens.append(_token(llm, ev.token, text, ev.logits))
            if req.top_n_tokens:
                top.append(_top_tokens(llm, ev.logits, req.top_n_tokens))
    if not finished(gen):
        return Response(status_code=499)  # the client has gone
    out = {"generated_text": prefix + gen.result.text + stop_suffix()}
    if req.details:
        out["details"] = details_of(tokens, top)
    content = dumps([out] if route == "compat" else out)
    headers = _headers(gen)
    if key is not None:
        engine.cache.put(key, (content, dict(headers)))
    if key is not None:
        headers["x-cache"] = "miss"
    return Response(content, media_type="application/json", headers=headers)


# ----------------------------------------------------------------------------- feature extraction

async def feature_extraction(request: Request, body: dict, model: str | None) -> Response:
    engine = request.app.state.engine
    inputs = body.get("inputs")
    single = isinstance(inputs, str)
    texts = [inputs] if single else inputs
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise invalid("`inputs` must be a string or a list of strings", "inputs")
    if not texts:
        raise invalid("`inputs` cannot be empty", "inputs")
    if get_bool(body, "normalize", True) is False:
        raise invalid("`normalize` = false is not supported: refllm's embeddings are L2-normalised (SPEC 4)",
                      "normalize")
    get_bool(body, "truncate")  # refllm always truncates to the model's maximum sequence length
    direction = get_str(body, "truncation_direction", "right")
    if direction.lower() != "right":
        raise invalid("`truncation_direction` must be \"right\"", "truncation_direction")
    if body.get("prompt_name") is not None:
        raise invalid("`prompt_name` is not supported by refllm", "prompt_name")
    if get_str(body, "encoding_format", "float") != "float":
        raise invalid("`encoding_format` must be \"float\"", "encoding_format")
    dimensions = get_int(body, "dimensions", lo=1)
    engine.limits.check_client_batch(len(texts), "inputs")

    entry = engine.resolve(model, EMBED)
    check_loading(request, entry, body)
    permit(request, entry.name, EMBEDDING, len(texts))
    key = engine.cache.key("features", entry.name, texts) if use_cache(request, body) else None
    if key is not None and (hit := engine.cache.get(key)) is not None:
        return Response(hit, media_type="application/json", headers={"x-cache": "hit"})
    embedder = await engine.load_embedder(entry)
    if dimensions is not None and dimensions != embedder.dim:
        raise invalid(f"`dimensions` must be {embedder.dim} for model {entry.name}", "dimensions")
    result = await engine.embed(embedder, texts, request=request)
    if result is None:
        return Response(status_code=499)  # the client has gone
    small = len(texts) * embedder.dim * 10 < LARGE_BODY  # ~10 bytes a number
    content = dumps(result.embeddings) if small else await engine.encode_rows(result.embeddings)
    if key is not None:
        engine.cache.put(key, content)
    return Response(content, media_type="application/json", headers={"x-cache": "miss"} if key else {})


# ----------------------------------------------------------------------------- routes

async def _body(request: Request) -> dict:
    authenticate(request)
    return await read_json_object(request, request.app.state.engine.limits.max_body_bytes)


@router.post("/")
async def compat(request: Request) -> Response:
    body = await _body(request)
    if is_generation_body(body):
        return await text_generation(request, body, None, "compat")
    return await feature_extraction(request, body, None)


@router.post("/models/{model_id:path}")
async def models(request: Request, model_id: str) -> Response:
    body = await _body(request)
    if model_id in PLACEHOLDER_MODELS:
        task = GENERATE if is_generation_body(body) else EMBED
    else:
        task = {"llama": GENERATE, "embedding": EMBED}[request.app.state.engine.resolve(model_id, None).kind]
    if task == GENERATE:
        return await text_generation(request, body, model_id, "compat")
    return await feature_extraction(request, body, model_id)


@router.post("/pipeline/{task}/{model_id:path}")
async def pipeline(request: Request, task: str, model_id: str) -> Response:
    body = await _body(request)
    if task == "text-generation":
        return await text_generation(request, body, model_id, "compat")
    if task == "feature-extraction":
        return await feature_extraction(request, body, model_id)
    raise ServeError("not_found", f"task '{task}' is not served (text-generation, feature-extraction)")


@router.post("/generate")
async def generate(request: Request) -> Response:
    return await text_generation(request, await _body(request), None, "generate", force_stream=False)


@router.post("/generate_stream")
async def generate_stream(request: Request) -> Response:
    return await text_generation(request, await _body(request), None, "generate", force_stream=True)


@router.get("/info")
async def info(request: Request) -> Response:
    engine = request.app.state.engine
    authenticate(request)
    name = engine.config.default_llm
    context = None
    entry = next((e for e in engine.models() if e.name == name and e.kind == "llama"), None)
    if entry is not None:
        try:
            context = read_json(entry.path / "config.json").get("max_position_embeddings")
        except LLMError:
            context = None
    return Response(dumps({
        "model_id": name, "model_sha": None, "model_dtype": engine.config.precision or "float32",
        "model_device_type": engine.config.backend or "cpu", "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": engine.config.max_batch + engine.config.max_queue, "max_best_of": 1,
        "max_stop_sequences": MAX_STOP_SEQUENCES, "max_input_tokens": context, "max_total_tokens": context,
        "max_new_tokens_cap": engine.limits.cap, "max_batch_size": engine.config.max_batch,
        "max_waiting_requests": engine.config.max_queue, "batch_mode": engine.config.batch_mode,
        "validation_workers": 1, "max_client_batch_size": engine.limits.max_client_batch, "router": "refllm",
        "version": __version__, "sha": None, "docker_label": None,
    }), media_type="application/json")


__all__ = ["router", "render_error", "GenerateRequest", "is_generation_body"]
