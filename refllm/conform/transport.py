"""conform's transport: POST JSON to the backend and keep what it answered.

Every exchange is recorded (`Transport.exchanges`: path, request body, status and the raw
response text) so that the JSON report carries the evidence for each verdict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


class Unreachable(Exception):
    """The backend could not be reached at all."""


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
        self.exchanges: list[dict] = []  # the last exchanges since `take_exchanges`
        try:
            import httpx
        except ImportError:
            httpx = None
        self._httpx = httpx
        self._client = httpx.Client(timeout=timeout) if httpx else None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def take_exchanges(self) -> list[dict]:
        """The exchanges recorded since the last call (a case's evidence), and forget them."""
        out, self.exchanges = self.exchanges, []
        return out

    def post(self, path: str, body: Any, record: bool = True) -> Response:
        r = self._post(path, body)
        if record:
            self.exchanges.append({"path": path, "request": body, "status": r.status, "response": r.text})
        return r

    def _post(self, path: str, body: Any) -> Response:
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
