"""The response cache of deterministic requests (Hugging Face's `x-use-cache`)."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any


class ResponseCache:
    """A small LRU of finished responses, keyed by the canonical request (x-use-cache)."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[str, Any] = OrderedDict()

    @staticmethod
    def key(*parts: Any) -> str:
        return json.dumps(parts, sort_keys=True, ensure_ascii=False)

    def get(self, key: str):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def put(self, key: str, value: Any) -> None:
        if self.size <= 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)


def header_true(value: str | None) -> bool | None:
    """x-wait-for-model / x-use-cache: "1", "true", "yes" -> True; "0", "false", "no" -> False."""
    if value is None:
        return None
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    return None
