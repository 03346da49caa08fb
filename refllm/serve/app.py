"""The server: one FastAPI app speaking three dialects over one `Engine`, run by uvicorn.

    create_app(ServerConfig(...))      the ASGI app (routes of spin.py, hf.py, openai.py,
                                       GET /health), errors rendered in each dialect's shape
    run(config, host, port)            serve it with uvicorn until interrupted
    ServerThread(config).start()       serve it from a background thread (tests, notebooks)
    add_serve_arguments(parser)        `refllm serve`'s options, on an argparse parser
    serve_from_args(args)              build the config from those options and run

Which dialect renders an error is decided by the path: /v1/... is OpenAI's, /infer and
/embed are Spin's, everything else is Hugging Face's.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Sequence

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import LLMError
from ..malloc import retain_freed_memory
from . import hf, openai, spin
from .core import DEFAULT_EMBEDDING_MODEL, DEFAULT_LLM, STATUS, Engine, ServeError, ServerConfig, dumps, from_llm_error
from .limits import FERMYON_EMBEDDING_QUOTA, FERMYON_INFERENCE_QUOTA, FERMYON_MAX_TOKENS
from .protocol import h11_with_header_timeout
from .scheduler import BATCH_MODES

log = logging.getLogger("refllm.serve")


def dialect_of(path: str):
    """The module whose `render_error` answers for `path`."""
    if path == "/v1" or path.startswith("/v1/"):
        return openai
    if path in ("/infer", "/embed"):
        return spin
    return hf


def render(request: Request, err: ServeError, status: int | None = None) -> Response:
    return dialect_of(request.url.path).render_error(err, status or STATUS[err.kind])


def create_app(config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    engine = Engine(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if config.preload:
            engine.preload()
        yield
        engine.close()

    app = FastAPI(title="refllm", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, err: ServeError):
        return render(request, err)

    @app.exception_handler(LLMError)
    async def _llm_error(request: Request, err: LLMError):
        return render(request, from_llm_error(err))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else "bad_request"
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = f"no route for {request.method} {request.url.path}"
        return render(request, ServeError(kind, message), exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug: say so in the dialect's shape
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return render(request, ServeError("runtime", f"internal error: {type(exc).__name__}: {exc}"))

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health(request: Request) -> Response:
        """Answers at once, whatever the model is doing (no auth: it is for load balancers)."""
        s = engine.scheduler
        return Response(dumps({"status": "ok", "loading": sorted(engine.loading), "queued": s.queued,
                               "running": len(s.running), "embedding": len(s.embedding)}),
                        media_type="application/json")

    app.include_router(spin.router)
    app.include_router(openai.router)
    app.include_router(hf.router)
    app.add_middleware(BatchModeHeader, mode=config.batch_mode)
    return app


class BatchModeHeader:
    """Every answer says `x-batch-mode: invariant` (each answer is refllm.infer's, bit for
    bit) or `throughput` (answers may differ from it by float rounding).

    A plain ASGI middleware: it touches only `send`, so the request's receive channel
    (and with it `watch_disconnect`) is the server's own."""

    def __init__(self, app, mode: str):
        self.app, self.header = app, (b"x-batch-mode", mode.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


# ----------------------------------------------------------------------------- running

def uvicorn_config(app, config: ServerConfig, host: str, port: int, log_level: str, **kw) -> uvicorn.Config:
    """uvicorn's settings for `config`: X-Forwarded-For trusted only from
    `forwarded_allow_ips` (uvicorn trusts 127.0.0.1 by default, which let any local
    client pick its quota's address), and the header read timeout."""
    trusted = config.forwarded_allow_ips
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=h11_with_header_timeout(
        config.header_timeout_s), proxy_headers=trusted is not None, forwarded_allow_ips=trusted or "", **kw)


def run(config: ServerConfig | None = None, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    """Serve until interrupted."""
    config = config or ServerConfig()
    uvicorn.Server(uvicorn_config(create_app(config), config, host, port, log_level, timeout_graceful_shutdown=5)).run()


class ServerThread:
    """uvicorn in a background thread, on `host`:`port` (0: any free port).

        with ServerThread(ServerConfig(...)) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, config: ServerConfig | None = None, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning"):
        config = config or ServerConfig()
        self.app = create_app(config)
        self.server = uvicorn.Server(uvicorn_config(self.app, config, host, port, log_level,
                                                    timeout_graceful_shutdown=2, lifespan="on"))
        self.host = host
        self.thread = threading.Thread(target=self.server.run, name="refllm-serve", daemon=True)

    @property
    def engine(self) -> Engine:
        return self.app.state.engine

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------------------------------- command line

def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _quota(s: str) -> tuple[int, int]:
    try:
        inference, embedding = (int(x) for x in s.split(","))
        if inference < 1 or embedding < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected INFERENCE,EMBEDDING counts, e.g. 75,200; got {s!r}") from None
    return inference, embedding


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`refllm serve`'s options (the CLI calls this on its `serve` subparser)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default: 8080)")
    parser.add_argument("--models-dir", help="models root (default: $REFLLM_MODELS_DIR, ./.spin/ai-models, cache)")
    parser.add_argument("--default-model", default=DEFAULT_LLM,
                        help=f"text-generation model of requests naming none, 'dummy' or 'tgi' ({DEFAULT_LLM})")
    parser.add_argument("--default-embedding-model", default=DEFAULT_EMBEDDING_MODEL,
                        help=f"embedding model for requests that name none (default: {DEFAULT_EMBEDDING_MODEL})")
    g = parser.add_argument_group("limits (Fermyon Serverless AI's, as options)")
    g.add_argument("--token", action="append", default=[], metavar="TOKEN",
                   help="accept `authorization: bearer TOKEN` (repeatable; none given: no auth)")
    g.add_argument("--token-file", help="read more tokens from a file, one a line")
    g.add_argument("--token-models", nargs=2, action="append", default=[], metavar=("TOKEN", "MODELS"),
                   help="allow TOKEN only the comma-separated MODELS (repeatable)")
    g.add_argument("--ai-models", type=_names, metavar="MODELS",
                   help="Spin's ai_models: the comma-separated models any caller may use (default: all)")
    g.add_argument("--quota", type=_quota, nargs="?", const=(FERMYON_INFERENCE_QUOTA, FERMYON_EMBEDDING_QUOTA),
                   metavar="INFERENCE,EMBEDDING",
                   help=f"per-token requests per window (alone: Fermyon Cloud's "
                        f"{FERMYON_INFERENCE_QUOTA},{FERMYON_EMBEDDING_QUOTA}); answered 429 with Retry-After")
    g.add_argument("--quota-window", type=float, default=3600.0, metavar="SECONDS", help="quota window (default: 3600)")
    g.add_argument("--max-tokens-cap", type=_positive_int, default=FERMYON_MAX_TOKENS,
                   help=f"generated tokens a request may ask for (default: {FERMYON_MAX_TOKENS})")
    g.add_argument("--max-body-bytes", type=_positive_int, default=ServerConfig.max_body_bytes,
                   help=f"request body limit (default: {ServerConfig.max_body_bytes})")
    g.add_argument("--max-client-batch", type=_positive_int, default=ServerConfig.max_client_batch,
                   help=f"prompts or input texts in one request (default: {ServerConfig.max_client_batch}); "
                        f"each counts against the quota")
    g.add_argument("--forwarded-allow-ips", metavar="ADDRESSES",
                   help="trust X-Forwarded-For from these comma-separated proxy addresses or networks "
                        "('*': any); default: trust no proxy header")
    g.add_argument("--header-timeout", type=float, default=ServerConfig.header_timeout_s, metavar="SECONDS",
                   help=f"the request line and headers must arrive within this "
                        f"(default: {ServerConfig.header_timeout_s:g}); else 408")
    g.add_argument("--body-timeout", type=float, default=ServerConfig.body_timeout_s, metavar="SECONDS",
                   help=f"the body must arrive within this (default: {ServerConfig.body_timeout_s:g}); else 408")
    g = parser.add_argument_group("engine")
    g.add_argument("--max-batch", type=_positive_int, default=ServerConfig.max_batch,
                   help=f"sequences decoded together, continuous batching (default: {ServerConfig.max_batch})")
    g.add_argument("--max-queue", type=int, default=ServerConfig.max_queue,
                   help=f"requests waiting for the batch before the server answers overloaded: TGI 429, "
                        f"OpenAI and Spin 503 with Retry-After (default: {ServerConfig.max_queue})")
    g.add_argument("--batch-mode", choices=BATCH_MODES, default=ServerConfig.batch_mode,
                   help="'invariant' (default): every answer is bit for bit refllm.infer's, whatever it is "
                        "batched with; 'throughput': one matrix product for the batch, answers may differ "
                        "by float rounding")
    g.add_argument("--cache-size", type=int, default=256, help="x-use-cache responses kept (0: none; default: 256)")
    g.add_argument("--profile", choices=("spec", "spin"), default="spec",
                   help="'spin': Spin 3's engine's text and usage on /infer and /embed")
    g.add_argument("--backend", choices=("numpy", "triton"))
    g.add_argument("--precision", choices=("float32", "float64"))
    g.add_argument("--preload", action="store_true", help="load the default models at startup (503 meanwhile)")
    g.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    tokens = list(args.token)
    if args.token_file:
        tokens += [t.strip() for t in Path(args.token_file).read_text().splitlines() if t.strip()]
    token_models = {}
    for token, models in args.token_models:
        if token not in tokens:
            tokens.append(token)
        token_models[token] = _names(models)
    inference_quota, embedding_quota = args.quota if args.quota else (None, None)
    return ServerConfig(
        models_dir=args.models_dir, default_llm=args.default_model,
        default_embedding_model=args.default_embedding_model,
        tokens=tuple(dict.fromkeys(tokens)), token_models=token_models, allowed_models=args.ai_models,
        inference_quota=inference_quota, embedding_quota=embedding_quota, quota_window_s=args.quota_window,
        max_tokens_cap=args.max_tokens_cap, max_body_bytes=args.max_body_bytes, max_batch=args.max_batch,
        max_queue=args.max_queue, max_client_batch=args.max_client_batch, batch_mode=args.batch_mode,
        forwarded_allow_ips=args.forwarded_allow_ips, header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout, cache_size=args.cache_size, profile=args.profile, backend=args.backend,
        precision=args.precision, preload=args.preload)


def serve_from_args(args: argparse.Namespace) -> int:
    """Run the server the options describe; returns the exit code."""
    config = config_from_args(args)
    retain_freed_memory()  # a process-wide allocator setting: the server's call (refllm.malloc)
    auth = f"{len(config.tokens)} token(s)" if config.tokens else "no auth"
    print(f"refllm {__version__} serving Spin (/infer, /embed), Hugging Face (/, /models/<id>, /generate) and "
          f"OpenAI (/v1) on http://{args.host}:{args.port} ({auth})", file=sys.stderr)
    run(config, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_serve_arguments(argparse.ArgumentParser(prog="python -m refllm.serve",
                                                         description="Serve refllm's models over HTTP."))
    return serve_from_args(parser.parse_args(argv))


__all__ = ["create_app", "run", "ServerThread", "add_serve_arguments", "config_from_args", "serve_from_args", "main"]
