"""Reading a golden set: the directory's files and the JSON helpers of its format.

    golden = load_golden("golden/")       # Golden: .dir, .header, .cases (plain dicts)
    golden.case("greedy")["tokens"]
    params_from_json(case["params"])      # the WIT's InferencingParams

This module needs no model, no NumPy and nothing else of refllm beyond its records
(`refllm.types`): a golden set is plain JSON lines, specified in FORMAT.md beside this
file (and copied into every golden set), so any project can read one without refllm.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..types import InferencingParams

FORMAT = "refllm-golden"
FORMAT_VERSION = 1
GOLDEN_FILE = "golden.jsonl"
FORMAT_DOC = Path(__file__).with_name("FORMAT.md")  # copied into every golden set
PARAM_FIELDS = ("max_tokens", "repeat_penalty", "repeat_penalty_last_n_token_count", "temperature", "top_k", "top_p")
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode_float(x: float):
    """A float as JSON can carry it: finite floats as numbers, the rest as strings."""
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def decode_float(x) -> float:
    """The inverse of `encode_float` (a number passes through)."""
    if isinstance(x, str):
        if x not in NON_FINITE:
            raise ValueError(f"{x!r} is not a number (the strings allowed are {', '.join(NON_FINITE)})")
        return NON_FINITE[x]
    return x


def params_to_json(params: InferencingParams) -> dict:
    return {f: (encode_float(getattr(params, f)) if isinstance(getattr(params, f), float) else getattr(params, f))
            for f in PARAM_FIELDS}


def params_from_json(d: dict) -> InferencingParams:
    return InferencingParams(**{f: decode_float(d[f]) for f in PARAM_FIELDS})


def dumps(obj) -> str:
    """One JSON line: ASCII only (so no text can hold a line separator), strict (no NaN),
    floats as the shortest text that reads back as the same float64 (Python's repr)."""
    return json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))


@dataclass
class Golden:
    """A golden set read back: its header and its cases (plain JSON objects)."""

    dir: Path
    header: dict
    cases: list[dict] = field(default_factory=list)

    def case(self, name: str) -> dict:
        for c in self.cases:
            if c["name"] == name:
                return c
        raise KeyError(name)

    def tokenizer_path(self, model: str) -> Path | None:
        rel = self.header.get("models", {}).get(model, {}).get("tokenizer")
        return self.dir / rel if rel else None


def load_golden(path) -> Golden:
    """Read a golden set from its directory (or its golden.jsonl)."""
    path = Path(path)
    file = path / GOLDEN_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no golden set at {path} (no {GOLDEN_FILE} there)")
    lines = [ln for ln in file.read_text(encoding="utf-8").split("\n") if ln.strip()]
    if not lines:
        raise ValueError(f"{file} is empty")
    header = json.loads(lines[0])
    if header.get("format") != FORMAT:
        raise ValueError(f"{file} is not a refllm golden set (format {header.get('format')!r})")
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file} is format version {header.get('format_version')}; this refllm reads {FORMAT_VERSION}")
    return Golden(dir=file.parent, header=header, cases=[json.loads(ln) for ln in lines[1:]])


__all__ = ["FORMAT", "FORMAT_VERSION", "GOLDEN_FILE", "FORMAT_DOC", "PARAM_FIELDS", "Golden", "load_golden",
           "encode_float", "decode_float", "params_to_json", "params_from_json", "dumps"]
