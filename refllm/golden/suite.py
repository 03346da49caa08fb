"""Suites: the cases a golden set is made of, before they are run.

    BUILTIN, QUICK          the built-in suite (on the default models) and its quick subset
    select(names)           built-in cases by name
    load_suite(path, llm, embedder)
                            a user's suite: one JSON object a line (SUITE.md beside this
                            file, and the JSON Schema suite.schema.json), each line
                            a prompt or chat messages with the WIT params and one or more
                            seeds, an embedding input, or an input refllm must refuse

A `CaseSpec` says what to run, not what it gives; `refllm.golden.record` runs one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..types import InferencingParams
from .reader import NON_FINITE, PARAM_FIELDS

SUITE = "builtin"
SUITE_VERSION = 1  # the built-in suite's
SUITE_FORMAT_VERSION = 1  # the format of a user's suite file (SUITE.md)
SUITE_SCHEMA = Path(__file__).with_name("suite.schema.json")
LLM = "smollm2-135m-instruct"
EMBEDDER = "all-minilm-l6-v2"
ALL = 2**32 - 1  # a top_k that keeps every candidate (the WIT's top-k is a u32)
VARIANTS = ("invalid-input", "model-not-supported", "runtime-error")  # the WIT's error variants


@dataclass(frozen=True)
class CaseSpec:
    """One case of a suite: what to run, not what it gives."""

    name: str
    kind: str  # "generate" | "embed" | "error"
    description: str
    model: str
    prompt: str | None = None
    params: InferencingParams | None = None
    seed: int | None = None
    texts: tuple[str, ...] | None = None
    op: str = "infer"  # error cases: "infer" | "generate_embeddings"
    quick: bool = False  # in QUICK, the small subset the tests replay
    messages: tuple[dict, ...] | None = None  # chat messages, rendered with the model's template into the prompt
    expect_error: str | None = None  # error cases of a user suite: the WIT variant refllm must raise


def _p(**kw) -> InferencingParams:
    return InferencingParams(**kw)


FRANCE = "The capital of France is"
COUNTING = "1, 2, 3, 1, 2, 3, 1, 2, 3,"
STORY = "Once upon a time"
UNICODE = "Grüße aus Köln — 東京 🙂"
CHAT_EOS = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of France is"
CHAT_EOS_FIRST = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How can I help you today?"
BATCH = ("A short one.",
         "A considerably longer sentence, with many more word pieces in it, so that the batch is padded.",
         "A sentence of middling length, padded in its batch.", "", "Grüße 🙂")

BUILTIN: tuple[CaseSpec, ...] = (
    # --- greedy
    CaseSpec("greedy", "generate", "greedy decoding, no penalty", LLM, FRANCE,
             _p(max_tokens=8, temperature=0.0, repeat_penalty=1.0), quick=True),
    CaseSpec("greedy-repeat-penalty", "generate",
             "greedy with a strong repeat penalty over a repetitive prompt (the window holds prompt tokens)",
             LLM, COUNTING, _p(max_tokens=6, temperature=0.0, repeat_penalty=1.5), quick=True),
    CaseSpec("greedy-penalty-window", "generate", "repeat penalty over the last token only (last-n = 1)",
             LLM, COUNTING, _p(max_tokens=4, temperature=0.0, repeat_penalty=1.5,
                               repeat_penalty_last_n_token_count=1)),
    # --- the WIT defaults, several seeds
    CaseSpec("wit-defaults", "generate", "the WIT's defaults (1.1, 64, 0.8, 40, 0.9), max-tokens lowered to 6",
             LLM, FRANCE, _p(max_tokens=6), seed=1, quick=True),
    CaseSpec("wit-defaults-seed-2", "generate", "the WIT's defaults, another seed (draws an EOS)", LLM, FRANCE,
             _p(max_tokens=4), seed=2),
    CaseSpec("wit-defaults-seed-7", "generate", "the WIT's defaults, another seed", LLM, FRANCE,
             _p(max_tokens=4), seed=7),
    # --- each knob alone, then together
    CaseSpec("temperature", "generate", "temperature 0.6 alone (no top-k, no top-p, no penalty)", LLM, STORY,
             _p(max_tokens=6, temperature=0.6, top_k=ALL, top_p=1.0, repeat_penalty=1.0), seed=5),
    CaseSpec("top-k", "generate", "top-k 3 alone at temperature 1", LLM, STORY,
             _p(max_tokens=6, temperature=1.0, top_k=3, top_p=1.0, repeat_penalty=1.0), seed=11),
    CaseSpec("top-p", "generate", "top-p 0.5 alone at temperature 1", LLM, STORY,
             _p(max_tokens=6, temperature=1.0, top_k=ALL, top_p=0.5, repeat_penalty=1.0), seed=13),
    CaseSpec("all-knobs", "generate", "every knob at once: T 0.7, top-k 10, top-p 0.8, penalty 1.3 over 16",
             LLM, STORY, _p(max_tokens=6, temperature=0.7, top_k=10, top_p=0.8, repeat_penalty=1.3,
                            repeat_penalty_last_n_token_count=16), seed=5, quick=True),
    # --- edges
    CaseSpec("unicode", "generate", "non-ASCII prompt; the last token ends inside a UTF-8 character",
             LLM, UNICODE, _p(max_tokens=6, temperature=0.0)),
    CaseSpec("chat-eos", "generate", "stops on the EOS after 2 tokens; the EOS is counted, not in the text",
             LLM, CHAT_EOS, _p(max_tokens=8, temperature=0.0), quick=True),
    CaseSpec("eos-first", "generate", "the first token is the EOS: empty text, 1 generated", LLM, CHAT_EOS_FIRST,
             _p(max_tokens=4, temperature=0.0)),
    CaseSpec("one-token-prompt", "generate", "a prompt of a single token", LLM, "a",
             _p(max_tokens=2, temperature=0.0)),
    CaseSpec("max-tokens-0", "generate", "max-tokens 0: empty text, 0 generated", LLM, FRANCE,
             _p(max_tokens=0), seed=1, quick=True),
    # --- embeddings
    CaseSpec("embed-single", "embed", "one text (no padding)", EMBEDDER, texts=("Hello, world!",), quick=True),
    CaseSpec("embed-batch", "embed", "texts of different lengths in one batch, an empty one among them",
             EMBEDDER, texts=BATCH, quick=True),
    # --- every bad input
    CaseSpec("err-repeat-penalty-zero", "error", "repeat-penalty 0", LLM, FRANCE,
             _p(max_tokens=1, repeat_penalty=0.0), quick=True),
    CaseSpec("err-repeat-penalty-negative", "error", "repeat-penalty -1", LLM, FRANCE,
             _p(max_tokens=1, repeat_penalty=-1.0), quick=True),
    CaseSpec("err-top-k-zero", "error", "top-k 0", LLM, FRANCE, _p(max_tokens=1, top_k=0), quick=True),
    CaseSpec("err-temperature-nan", "error", "temperature NaN", LLM, FRANCE,
             _p(max_tokens=1, temperature=math.nan), quick=True),
    CaseSpec("err-temperature-inf", "error", "temperature +infinity", LLM, FRANCE,
             _p(max_tokens=1, temperature=math.inf), quick=True),
    CaseSpec("err-top-p-nan", "error", "top-p NaN", LLM, FRANCE, _p(max_tokens=1, top_p=math.nan), quick=True),
    CaseSpec("err-repeat-penalty-inf", "error", "repeat-penalty +infinity", LLM, FRANCE,
             _p(max_tokens=1, repeat_penalty=math.inf), quick=True),
    CaseSpec("err-empty-prompt", "error", "a prompt that tokenizes to zero tokens", LLM, "",
             _p(max_tokens=1), quick=True),
    CaseSpec("err-prompt-too-long", "error", "a prompt longer than the model's context", LLM, "hi " * 9000,
             _p(max_tokens=1), quick=True),
    CaseSpec("err-unknown-model", "error", "a model name with no directory", "no-such-model", FRANCE,
             _p(max_tokens=1), quick=True),
    CaseSpec("err-infer-embedding-model", "error", "infer with an embedding model", EMBEDDER, FRANCE,
             _p(max_tokens=1), quick=True),
    CaseSpec("err-embed-empty", "error", "generate-embeddings of an empty list", EMBEDDER, texts=(),
             op="generate_embeddings", quick=True),
    CaseSpec("err-embed-unknown-model", "error", "generate-embeddings with an unknown model", "no-such-model",
             texts=("x",), op="generate_embeddings", quick=True),
    CaseSpec("err-embed-llm", "error", "generate-embeddings with a text-generation model", LLM, texts=("x",),
             op="generate_embeddings", quick=True),
)

QUICK: tuple[str, ...] = tuple(c.name for c in BUILTIN if c.quick)


def select(names: Iterable[str] | None) -> list[CaseSpec]:
    """The built-in cases named (in suite order), or all of them for None."""
    if names is None:
        return list(BUILTIN)
    names = list(names)
    known = {c.name for c in BUILTIN}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown golden case(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return [c for c in BUILTIN if c.name in names]


# ----------------------------------------------------------------------------- a user's suite

LINE_KEYS = {"name", "description", "prompt", "messages", "input", "params", "seed", "seeds", "error", "model"}
INT_PARAMS = ("max_tokens", "repeat_penalty_last_n_token_count", "top_k")
FLOAT_PARAMS = ("repeat_penalty", "temperature", "top_p")


class SuiteError(ValueError):
    """A suite file that cannot be run; the message names the file and the line."""


def load_suite(path, llm: str, embedder: str | None = None) -> list[CaseSpec]:
    """The cases of the suite file at `path`, in file order (a line with several seeds
    becomes one case per seed, named NAME-seed-S). `llm` names the decoder the
    generation cases run on, `embedder` the encoder of the embedding cases (None: the
    suite may hold none). Raises `SuiteError` naming the line of the first problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SuiteError(f"cannot read the suite {path}: {e}") from e
    specs: list[CaseSpec] = []
    names: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line, parse_constant=_refuse_constant)
        except ValueError as e:
            raise SuiteError(f"{where}: not a JSON object ({e})") from e
        for spec in _parse_line(obj, where, llm, embedder):
            if spec.name in names:
                raise SuiteError(f"{where}: case name {spec.name!r} is also on line {names[spec.name]}")
            names[spec.name] = lineno
            specs.append(spec)
    if not specs:
        raise SuiteError(f"the suite {path} holds no case")
    return specs


def _refuse_constant(name):
    raise ValueError(f"{name} is not JSON; write the string {name!r} (error cases only)")


def _parse_line(obj, where: str, llm: str, embedder: str | None) -> list[CaseSpec]:
    def fail(msg):
        raise SuiteError(f"{where}: {msg}")

    if not isinstance(obj, dict):
        fail("a suite line is a JSON object")
    unknown = sorted(set(obj) - LINE_KEYS)
    if unknown:
        fail(f"unknown key(s) {', '.join(unknown)}; a line has {', '.join(sorted(LINE_KEYS))}")
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        fail("every line needs a \"name\" (a non-empty string)")
    description = obj.get("description", "")
    if not isinstance(description, str):
        fail("\"description\" is a string")
    inputs = [k for k in ("prompt", "messages", "input") if k in obj]
    if len(inputs) != 1:
        fail("a line holds exactly one of \"prompt\", \"messages\" (a chat) and \"input\" (texts to embed); "
             f"this one has {', '.join(inputs) or 'none'}")
    kind_input = inputs[0]
    error = obj.get("error")
    if error is not None and error not in VARIANTS:
        fail(f"\"error\" is the WIT variant refllm must raise: one of {', '.join(VARIANTS)}, not {error!r}")
    if "model" in obj and error is None:
        fail("\"model\" (another model name to ask for) is for error cases only")
    model = obj.get("model")
    if model is not None and not isinstance(model, str):
        fail("\"model\" is a string")

    if kind_input == "input":
        texts = obj["input"]
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            fail("\"input\" is a string or a list of strings")
        for key in ("params", "seed", "seeds"):
            if key in obj:
                fail(f"an embedding line has no \"{key}\"")
        if model is None and embedder is None:
            fail("an embedding case needs an embedding model (--embedding-model PATH)")
        target = model or embedder
        if error is not None:
            return [CaseSpec(name, "error", description, target, texts=tuple(texts), op="generate_embeddings",
                             expect_error=error)]
        if not texts:
            fail("an empty \"input\" is an error case: add \"error\": \"invalid-input\"")
        return [CaseSpec(name, "embed", description, target, texts=tuple(texts))]

    prompt, messages = obj.get("prompt"), None
    if kind_input == "prompt" and not isinstance(prompt, str):
        fail("\"prompt\" is a string")
    if kind_input == "messages":
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            fail("\"messages\" is a non-empty list of {\"role\": string, \"content\": string} objects")
        messages = tuple(dict(m) for m in messages)
    params = _parse_params(obj.get("params", {}), fail, allow_non_finite=error is not None)
    if "seed" in obj and "seeds" in obj:
        fail("give \"seed\" or \"seeds\", not both")
    seeds = obj.get("seeds", [obj["seed"]] if "seed" in obj else [])
    if not isinstance(seeds, list) or not all(_is_u64(s) for s in seeds):
        fail("seeds are integers in [0, 2^64)")
    target = model or llm
    if error is not None:
        if seeds:
            fail("an error case has no seeds")
        return [CaseSpec(name, "error", description, target, prompt, params, op="infer", messages=messages,
                         expect_error=error)]
    sampled = isinstance(params.temperature, (int, float)) and params.temperature > 0
    if sampled and not seeds:
        fail(f"temperature {params.temperature} samples: give \"seed\" or \"seeds\" "
             f"(or \"temperature\": 0 for greedy decoding)")
    if not sampled and seeds:
        fail("greedy decoding (temperature 0) draws nothing: leave out the seeds")
    if not seeds:
        return [CaseSpec(name, "generate", description, target, prompt, params, messages=messages)]
    if "seed" in obj:
        return [CaseSpec(name, "generate", description, target, prompt, params, seed=seeds[0], messages=messages)]
    if len(set(seeds)) != len(seeds):
        fail("a seed is listed twice")
    return [CaseSpec(f"{name}-seed-{s}", "generate", description, target, prompt, params, seed=s, messages=messages)
            for s in seeds]


def _is_u64(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**64


def _parse_params(d, fail, allow_non_finite: bool) -> InferencingParams:
    """The WIT params of a line: missing ones take the WIT's defaults (`InferencingParams`)."""
    if not isinstance(d, dict):
        fail("\"params\" is an object of the WIT's inferencing-params (snake_case names)")
    unknown = sorted(set(d) - set(PARAM_FIELDS))
    if unknown:
        fail(f"unknown param(s) {', '.join(unknown)}; the WIT's are {', '.join(PARAM_FIELDS)}")
    out = {}
    for k, v in d.items():
        if k in INT_PARAMS:
            if isinstance(v, float) and v.is_integer():  # 8.0 is JSON's integer 8 too
                v = int(v)
            if not isinstance(v, int) or isinstance(v, bool):
                fail(f"params.{k} is an integer")
        elif isinstance(v, str) and allow_non_finite and v in NON_FINITE:
            v = NON_FINITE[v]
        elif isinstance(v, str):
            fail(f"params.{k} = {v!r}: the strings NaN, Infinity and -Infinity are for error cases only")
        elif not isinstance(v, (int, float)) or isinstance(v, bool):
            fail(f"params.{k} is a number")
        else:
            v = float(v)
        out[k] = v
    return InferencingParams(**out)


def describe(spec: CaseSpec) -> str:
    """One line for `refllm golden --list`."""
    return f"{spec.name:<30} {spec.kind:<9} {'quick ' if spec.quick else '      '}{spec.description}"


__all__ = ["CaseSpec", "BUILTIN", "QUICK", "select", "load_suite", "SuiteError", "LLM", "EMBEDDER", "SUITE",
           "SUITE_VERSION", "SUITE_FORMAT_VERSION", "SUITE_SCHEMA", "VARIANTS", "describe"]
