"""Service limits, as options of the server: Fermyon Serverless AI's, and a body limit.

    authenticate   bearer tokens (`authorization: bearer <token>`, scheme case-insensitive,
                   as Spin's remote_http engine sends it); no tokens configured: no auth
    check_model    Spin's `ai_models` allow-list, for every caller and per token, denied
                   with Spin's own message
    take           per-caller hourly quotas (Fermyon Cloud: 75 inference and 200 embedding
                   requests an hour), a sliding window; over it: 429 with Retry-After
    cap            generated tokens a request may ask for (Fermyon Cloud: 1,024)
    check_client_batch  prompts or texts one request may carry (--max-client-batch)
    max_body_bytes the request body limit (413), enforced while the body is read

Quotas are counted per token, or per client address when auth is off, for each request
that reaches a model (after auth, parsing and model checks, before any compute), and
an array request counts once per prompt or input text (issue 14, D2: one call with 20
prompts is 20 calls' work). The client address is the socket's peer: uvicorn's proxy
headers are off unless `--forwarded-allow-ips` names the proxies to trust (D3).
"""

from __future__ import annotations

import hmac
import math
import re
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from .core import ServeError

if TYPE_CHECKING:
    from .core import ServerConfig

FERMYON_INFERENCE_QUOTA = 75  # requests an hour (Fermyon Cloud, Serverless AI)
FERMYON_EMBEDDING_QUOTA = 200
FERMYON_MAX_TOKENS = 1024  # generated tokens a request

INFERENCE, EMBEDDING = "inference", "embedding"

_BEARER = re.compile(r"^\s*bearer\s+(\S+)\s*$", re.IGNORECASE)


def denial(model: str) -> str:
    """Spin's message when a component's `ai_models` does not list `model`."""
    return (f"The component does not have access to use '{model}'. To give the component access, "
            f"add '{model}' to the 'ai_models' key for the component in your spin.toml manifest")


class Limits:
    def __init__(self, config: "ServerConfig", clock=time.monotonic):
        self.tokens = tuple(config.tokens)
        self.token_models = {t: frozenset(m) for t, m in dict(config.token_models).items()}
        unknown = set(self.token_models) - set(self.tokens)
        if unknown:
            raise ValueError(f"allow-lists given for {len(unknown)} token(s) that are not among the server's tokens")
        self.allowed_models = None if config.allowed_models is None else frozenset(config.allowed_models)
        self.quotas = {INFERENCE: config.inference_quota, EMBEDDING: config.embedding_quota}
        self.window_s = float(config.quota_window_s)
        self.cap = int(config.max_tokens_cap)
        self.max_body_bytes = int(config.max_body_bytes)
        self.max_client_batch = int(config.max_client_batch)
        self.clock = clock
        self._seen: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    @property
    def auth_enabled(self) -> bool:
        return bool(self.tokens)

    def authenticate(self, authorization: str | None) -> str | None:
        """The caller's token (None when auth is off); 401 without a valid one."""
        if not self.tokens:
            return None
        m = _BEARER.match(authorization or "")
        if m is None:
            raise ServeError("unauthorized", "missing bearer token: send `authorization: bearer <token>`",
                             headers={"www-authenticate": "Bearer"})
        given = m.group(1).encode()
        found = None
        for t in self.tokens:  # compare with every token, in constant time each
            if hmac.compare_digest(given, t.encode()):
                found = t
        if found is None:
            raise ServeError("unauthorized", "invalid bearer token", headers={"www-authenticate": "Bearer"})
        return found

    def check_model(self, token: str | None, model: str) -> None:
        """403 with Spin's denial unless the server's and the token's allow-lists both allow `model`."""
        if self.allowed_models is not None and model not in self.allowed_models:
            raise ServeError("forbidden", denial(model), param="model")
        allowed = self.token_models.get(token) if token is not None else None
        if allowed is not None and model not in allowed:
            raise ServeError("forbidden", denial(model), param="model")

    def take(self, who: str, kind: str, n: int = 1) -> None:
        """Count `n` `kind` requests for `who` (an array request's prompts or inputs);
        429 with Retry-After if they do not all fit in the quota (then none is counted)."""
        limit = self.quotas.get(kind)
        if limit is None:
            return
        now = self.clock()
        with self._lock:
            seen = self._seen.setdefault((who, kind), deque())
            while seen and seen[0] <= now - self.window_s:
                seen.popleft()
            if len(seen) + n > limit:
                free = limit - len(seen)
                # the oldest entries that must expire before n fit (n > limit: never; say a window)
                retry = self.window_s if n > limit else max(1, math.ceil(seen[n - free - 1] + self.window_s - now))
                more = f" ({n} in this request)" if n > 1 else ""
                raise ServeError(
                    "rate_limited",
                    f"quota exceeded: {limit} {kind} requests per {self.window_s:g} s{more}; retry in {retry:g} s",
                    headers={"retry-after": str(math.ceil(retry))})
            seen.extend([now] * n)

    def remaining(self, who: str, kind: str) -> int | None:
        limit = self.quotas.get(kind)
        if limit is None:
            return None
        now = self.clock()
        with self._lock:
            seen = self._seen.get((who, kind), ())
            return max(0, limit - sum(1 for t in seen if t > now - self.window_s))

    def check_client_batch(self, n: int, name: str) -> None:
        """An array of more than `max_client_batch` prompts or inputs is a validation error."""
        if n > self.max_client_batch:
            raise ServeError("validation", f"`{name}` has {n} items, more than this server's limit of "
                                           f"{self.max_client_batch} a request (max_client_batch_size)", param=name)

    def check_max_tokens(self, n: int, name: str) -> None:
        """An explicit request for more than the cap is a validation error."""
        if n > self.cap:
            raise ServeError("validation", f"`{name}` must be <= {self.cap}. Given: {n}", param=name)


def caller(request, token: str | None) -> str:
    """Whom a quota counts: the token, else the client's address."""
    if token is not None:
        return "token:" + token
    client = request.client
    return "client:" + (client.host if client else "unknown")


def authenticate(request) -> str | None:
    """Step 1 of every handler: the caller's token (401 without a valid one)."""
    token = request.app.state.engine.limits.authenticate(request.headers.get("authorization"))
    request.state.token = token
    return token


def permit(request, model: str, kind: str, n: int = 1) -> None:
    """Step 2, once the model is known: the allow-lists (403), then the quota (429) for
    the request's `n` prompts or inputs."""
    limits = request.app.state.engine.limits
    token = getattr(request.state, "token", None)
    limits.check_model(token, model)
    limits.take(caller(request, token), kind, n)
