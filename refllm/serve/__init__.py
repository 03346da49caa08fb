"""refllm's HTTP server: Spin's remote engine, Hugging Face's Inference API / TGI, and
OpenAI's API, over the same models (SPEC.md section 7).

    config.py   ServerConfig: one field per `refllm serve` option
    core.py     the engine: models, loading, a request's work through the scheduler
    scheduler.py  continuous batching: decode steps over the batch, embedding chunks
                between them, the bounded queue, cancellation
    errors.py   ServeError and its kinds;  bodies.py  reading and writing bodies
    cache.py    x-use-cache;  protocol.py  uvicorn's h11 with a header read timeout
    limits.py   bearer tokens, allow-lists, quotas, the token and client-batch caps
    spin.py     POST /infer, POST /embed
    hf.py       POST /, /models/<id>, /generate, /generate_stream, GET /info
    openai.py   /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models
    app.py      create_app, run, ServerThread, and `refllm serve`'s options

Needs the `serve` extra (fastapi, uvicorn); importing this package does not.
"""

from .core import ServerConfig  # noqa: F401


def create_app(config=None):
    from .app import create_app as _create_app

    return _create_app(config)


__all__ = ["ServerConfig", "create_app"]
