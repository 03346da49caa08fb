"""`ServerConfig`: everything `create_app` needs, one field per `refllm serve` option."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

DEFAULT_LLM = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"


@dataclass
class ServerConfig:
    """The defaults serve the models on disk with no auth, no quotas, Fermyon Cloud's
    1,024-token cap, a 4 MiB body limit, batches of 8 and a queue of 128."""

    models_dir: str | os.PathLike | None = None  # None: refllm.registry's order of roots
    default_llm: str = DEFAULT_LLM  # what no model, "dummy" and "tgi" mean for text generation
    default_embedding_model: str = DEFAULT_EMBEDDING_MODEL  # ... and for embeddings
    tokens: Sequence[str] = ()  # accepted bearer tokens; empty: no auth
    token_models: Mapping[str, Sequence[str]] = field(default_factory=dict)  # per-token allow-lists
    allowed_models: Sequence[str] | None = None  # Spin's `ai_models` for every caller; None: all
    inference_quota: int | None = None  # prompts per token (or address) per window; Fermyon Cloud: 75
    embedding_quota: int | None = None  # input texts likewise; Fermyon Cloud: 200
    quota_window_s: float = 3600.0
    max_tokens_cap: int = 1024  # generated tokens a request may ask for (Fermyon Cloud: 1,024)
    max_body_bytes: int = 4 * 1024 * 1024
    max_batch: int = 8  # sequences decoded together in one step (continuous batching)
    max_queue: int = 128  # requests waiting for a place in the batch; more: "overloaded"
    max_client_batch: int = 2048  # prompts or input texts in one request (OpenAI's embeddings: 2,048)
    batch_mode: str = "invariant"  # decode_batch's mode: "invariant" rows = refllm.infer's bits
    forwarded_allow_ips: str | None = None  # trust X-Forwarded-For from these addresses; None: from none
    header_timeout_s: float = 10.0  # the request line and headers must arrive within this
    body_timeout_s: float = 60.0  # ... and the body within this, once the headers are in
    cache_size: int = 256  # x-use-cache entries kept (0: no cache)
    profile: str = "spec"  # "spin": Spin 3's engine's text/usage on POST /infer and /embed
    backend: str | None = None
    precision: str | None = None
    preload: bool = False  # load the two default models in the background at startup
