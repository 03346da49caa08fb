"""Golden files: what refllm's reference computes for a fixed suite of cases, written so
that another project can check itself against it without refllm.

    write_golden(out_dir, models_root=None)   run the suite on the default models in
                                              float64 and write `out_dir/golden.jsonl`
    load_golden(dir)                          read it back (`Golden`: header + cases)
    builtin_golden_dir(models_root=None)      the built-in set, generated on demand
                                              into a cache directory and reused

Nothing big is committed: the built-in set is generated from the models on disk the
first time it is asked for (well under a minute to two minutes on a CPU), into
``$REFLLM_GOLDEN_CACHE`` or else ``$XDG_CACHE_HOME/refllm/golden`` (by default
``~/.cache/refllm/golden``), in a directory named after a hash of the suite, refllm's
version, the source of the modules that compute it and the models' sha256s, so that a
new refllm, a change to its arithmetic or a new model makes a new set (the newest 8
are kept).
`refllm golden --out DIR` writes one where you choose; `refllm conform` without
``--golden`` uses the cached one.

How each case is computed. Generation cases run `refllm.generate.Generation` (exactly
what `refllm.infer(..., precision="float64")` runs) on the decoder loaded in float64
with NumPy (``engine.get_llm(path, precision="float64", backend="numpy")``), recording
the float64 logits of every step before they are rounded to float32 for sampling
(SPEC 3's step 1 is float32);
the draws are SPEC 3's, ``numpy.random.Generator(PCG64(seed)).random()``, one per
sampled token. Embedding cases run the float64 encoder with the spec profile and
with Spin 3's (SPEC 6). Error cases call `refllm.infer` / `refllm.generate_embeddings`
and record the WIT error variant and message. The same models and the same refllm
give the same file, byte for byte, on the same machine (no timestamps; floats written
as the shortest text that reads back as the same float64); another BLAS or CPU may move
the float64 numbers by an ulp or so, never a token.

Format (version 1)
------------------
A golden set is a directory:

    golden.jsonl                  line 1: the header; then one case per line (JSON objects,
                                  ASCII, non-ASCII characters as \\u escapes)
    tokenizers/<model>.json       a copy of each model's tokenizer.json
    FORMAT.md                     this description

The header:

    {"format": "refllm-golden", "format_version": 1,
     "suite": "builtin", "suite_version": 1, "cases": [names...],
     "refllm_version": "0.1.0", "spec_version": "1", "precision": "float64", "backend": "numpy",
     "top_n": 20,
     "rng": "numpy.random.Generator(numpy.random.PCG64(seed)).random(), one draw per sampled token",
     "models": {"<name>": {"kind": "llama" | "embedding",
                           "files": {"<relative path>": "<sha256 hex>", ...},
                           "tokenizer": "tokenizers/<name>.json",
                           "eos_token_ids": [...], "vocab_size": V, "context_length": n}}}
                           (the last three for decoders only)

A generation case (``"kind": "generate"``):

    {"name", "kind": "generate", "description", "model", "prompt",
     "params": {"max_tokens", "repeat_penalty", "repeat_penalty_last_n_token_count",
                "temperature", "top_k", "top_p"},     # the WIT's inferencing-params
     "seed": int | null,                              # null: greedy (no draw is made)
     "sampling": bool,                                # temperature > 0
     "prompt_ids": [...],                             # tokenizer.json, specials added
     "steps": [{                                      # one per generated token
        "token": id, "text": decode([id]), "eos": bool,
        "text_end": characters of "text" (the case's) produced once this token is in,
        "u": the draw, or null on the greedy path,
        "logit": raw float64 logit of the token,
        "logprob": log_softmax(raw logits)[token],
        "logprob_penalized": log_softmax(logits after the repeat penalty)[token],
        "margin": greedy: penalised logit of the token minus the best other one (float64;
                  small or negative: a near tie); sampled: distance from u to the nearer
                  end of the token's interval,
        "u_interval": [lo, hi] (sampled only): the token is chosen for lo <= u < hi,
        "top": [[id, logit], ...]                     # the 20 largest raw float64 logits,
     }, ...],                                         # descending, ties lower id first
     "tokens": [...], "text": "...", "finish_reason": "eos" | "length" | "context",
     "usage": {"prompt_token_count", "generated_token_count"},
     "spin": {"text", "usage"}}                       # what Spin 3's engine returns

Raw logits are the model's, before the repeat penalty and the temperature.

An embedding case (``"kind": "embed"``):

    {"name", "kind": "embed", "description", "model", "texts": [...],
     "token_ids": [[...], ...],                       # per text, [CLS] ... [SEP], truncated
     "embeddings": [[float64 x H], ...], "usage": {"prompt_token_count"},
     "spin": {"embeddings": [...], "usage": {"prompt_token_count"}}}

An error case (``"kind": "error"``):

    {"name", "kind": "error", "description", "op": "infer" | "generate_embeddings",
     "model", "prompt" (infer) | "texts" (embeddings), "params" (infer),
     "error": {"variant": "invalid-input" | "model-not-supported" | "runtime-error",
               "message": "..."}}

Numbers that JSON cannot carry (in the params of error cases) are written as the
strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``. A prompt may be long (the
context-overflow case repeats a word past the model's context).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .. import SPEC_VERSION, __version__, api, engine, registry, sampling
from ..errors import LLMError
from ..generate import Generation
from ..types import InferencingParams

FORMAT = "refllm-golden"
FORMAT_VERSION = 1
SUITE = "builtin"
SUITE_VERSION = 1
TOP_N = 20
GOLDEN_FILE = "golden.jsonl"
LLM = "smollm2-135m-instruct"
EMBEDDER = "all-minilm-l6-v2"
ALL = 2**32 - 1  # a top_k that keeps every candidate (the WIT's top-k is a u32)
BACKEND = "numpy"  # the reference: NumPy, float64, on every machine
# The modules whose arithmetic the golden numbers depend on: a change to one of them (even
# one that moves results by an ulp) makes a new cached built-in set.
COMPUTE_MODULES = ("ops.py", "llama.py", "bert.py", "embeddings.py", "generate.py", "sampling.py", "config.py",
                   "checkpoint.py", "golden.py")
RNG = "numpy.random.Generator(numpy.random.PCG64(seed)).random(), one draw per sampled token"


# ----------------------------------------------------------------------------- the suite

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


# ----------------------------------------------------------------------------- JSON helpers

def encode_float(x: float):
    """A float as JSON can carry it: finite floats as numbers, the rest as strings."""
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def decode_float(x) -> float:
    return float(x) if isinstance(x, str) else x


PARAM_FIELDS = ("max_tokens", "repeat_penalty", "repeat_penalty_last_n_token_count", "temperature", "top_k", "top_p")


def params_to_json(params: InferencingParams) -> dict:
    return {f: (encode_float(getattr(params, f)) if isinstance(getattr(params, f), float) else getattr(params, f))
            for f in PARAM_FIELDS}


def params_from_json(d: dict) -> InferencingParams:
    return InferencingParams(**{f: decode_float(d[f]) for f in PARAM_FIELDS})


def _dumps(obj) -> str:
    """One JSON line: ASCII only (so no text can hold a line separator), strict (no NaN)."""
    return json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))


# ----------------------------------------------------------------------------- model files

_sha_cache: dict[tuple, str] = {}


def sha256_file(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) within this process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]


def model_files(model_dir: Path) -> dict[str, str]:
    """{relative path: sha256} of every file of a model directory, sorted."""
    files = sorted(p for p in Path(model_dir).rglob("*") if p.is_file())
    return {p.relative_to(model_dir).as_posix(): sha256_file(p) for p in files}


def _model_dirs(models_root, names: Iterable[str]) -> dict[str, tuple[str, Path]]:
    out = {}
    for name in names:
        if name == LLM:
            out[name] = ("llama", registry.find_llm(name, models_root))
        elif name == EMBEDDER:
            out[name] = ("embedding", registry.find_embedding_model(name, models_root))
    return out


# ----------------------------------------------------------------------------- running cases

class _Recording:
    """A decoder that remembers the float64 logits of every call (one per step)."""

    def __init__(self, model):
        self.model = model
        self.outputs: list[np.ndarray] = []

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self.outputs.append(np.array(out[-1], dtype=np.float64))  # [V] the last position
        return out

    def decode(self, token, cache):  # the one-token path generation takes (Llama.decode), recorded too
        out = self.model.decode(token, cache)  # [V]
        self.outputs.append(np.array(out, dtype=np.float64))
        return out

    def __getattr__(self, name):
        return getattr(self.model, name)


def _penalized64(z64: np.ndarray, ids: Sequence[int], params: InferencingParams) -> np.ndarray:  # [V] -> [V]
    """SPEC 3 step 1 in float64 on float64 logits (the margins' and logprobs' reference)."""
    z = np.array(z64, dtype=np.float64)
    if params.repeat_penalty == 1.0 or params.repeat_penalty_last_n_token_count == 0 or not ids:
        return z
    window = np.unique(np.asarray(ids[-params.repeat_penalty_last_n_token_count:], dtype=np.int64))
    zw = z[window]
    z[window] = np.where(zw >= 0, zw / params.repeat_penalty, zw * params.repeat_penalty)
    return z


def _log_softmax_at(z: np.ndarray, i: int) -> float:
    m = np.max(z)
    return float(z[i] - (m + np.log(np.sum(np.exp(z - m)))))


def top_logits(z64: np.ndarray, n: int = TOP_N) -> list[list]:  # [V] -> n x [id, logit]
    order = np.argsort(-z64, kind="stable")[:n]
    return [[int(i), float(z64[i])] for i in order]


def _step_record(llm, z64: np.ndarray, z32: np.ndarray, ids: list[int], token: int, u, params: InferencingParams,
                 text_end: int) -> dict:
    pen = _penalized64(z64, ids, params)  # [V] float64
    rec = {"token": int(token), "text": llm.decode([token]), "eos": token in llm.eos_token_ids, "text_end": text_end,
           "u": None if u is None else float(u), "logit": float(z64[token]),
           "logprob": _log_softmax_at(z64, token), "logprob_penalized": _log_softmax_at(pen, token)}
    if u is None:  # greedy: the penalised float64 logit gap to the best other token
        others = np.delete(pen, token)
        rec["margin"] = float(pen[token] - np.max(others))
    else:  # sampled: where u falls in the chosen token's interval (SPEC 3 on the float32 logits)
        zp = sampling.apply_repeat_penalty(z32, ids, params.repeat_penalty, params.repeat_penalty_last_n_token_count)
        p = sampling.softmax_with_temperature(zp, params.temperature)
        kept, probs = sampling.top_p_filter(*sampling.top_k_candidates(p, params.top_k), params.top_p)
        cum = np.cumsum(probs)
        i = int(np.nonzero(kept == token)[0][0])
        lo, hi = (cum[i - 1] if i else 0.0) / cum[-1], cum[i] / cum[-1]
        rec["u_interval"] = [float(lo), float(hi)]
        rec["margin"] = float(min(u - lo, hi - u))
    rec["top"] = top_logits(z64)
    return rec


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def run_generate(spec: CaseSpec, models_root) -> dict:
    llm = engine.get_llm(registry.find_llm(spec.model, models_root), precision="float64", backend=BACKEND)
    rec_model = _Recording(llm.model)
    gen = Generation(dataclasses.replace(llm, model=rec_model), spec.prompt, spec.params,
                     seed=spec.seed if spec.seed is not None else 0)
    result = gen.run()
    ids = list(gen.prompt_ids)
    steps = []
    for i, step in enumerate(gen.steps):
        z64 = rec_model.outputs[i]  # [V] float64, what step i was sampled from
        if not np.array_equal(z64.astype(np.float32), step.logits):
            raise AssertionError(f"{spec.name}: step {i}'s recorded logits are not the ones sampled from")
        text_end = _common_prefix(llm.decode(gen.tokens[: i + 1]), result.text)
        steps.append(_step_record(llm, z64, step.logits, ids, step.token, step.u, spec.params, text_end))
        ids.append(step.token)
    usage = {"prompt_token_count": result.usage.prompt_token_count,
             "generated_token_count": result.usage.generated_token_count}
    return {
        "name": spec.name, "kind": "generate", "description": spec.description, "model": spec.model,
        "prompt": spec.prompt, "params": params_to_json(spec.params), "seed": spec.seed,
        "sampling": sampling.needs_draw(spec.params), "prompt_ids": list(map(int, gen.prompt_ids)),
        "steps": steps, "tokens": list(map(int, gen.tokens)), "text": result.text,
        "finish_reason": result.finish_reason, "usage": usage,
        "spin": {"text": spec.prompt + result.text,
                 "usage": {"prompt_token_count": usage["prompt_token_count"] + usage["generated_token_count"],
                           "generated_token_count": usage["generated_token_count"]}},
    }


def run_embed(spec: CaseSpec, models_root) -> dict:
    embedder = engine.get_embedder(registry.find_embedding_model(spec.model, models_root), precision="float64",
                                   backend=BACKEND)
    texts = list(spec.texts)
    vectors, n = embedder.embed_array(texts, profile="spec", return_usage=True)
    spin_vectors, spin_n = embedder.embed_array(texts, profile="spin", return_usage=True)
    return {
        "name": spec.name, "kind": "embed", "description": spec.description, "model": spec.model, "texts": texts,
        "token_ids": [list(map(int, t)) for t in embedder.tokenize(texts)],
        "embeddings": np.asarray(vectors, dtype=np.float64).tolist(), "usage": {"prompt_token_count": int(n)},
        "spin": {"embeddings": np.asarray(spin_vectors, dtype=np.float64).tolist(),
                 "usage": {"prompt_token_count": int(spin_n)}},
    }


def run_error(spec: CaseSpec, models_root) -> dict:
    out = {"name": spec.name, "kind": "error", "description": spec.description, "op": spec.op, "model": spec.model}
    try:
        if spec.op == "infer":
            out.update(prompt=spec.prompt, params=params_to_json(spec.params))
            api.infer(spec.model, spec.prompt, spec.params, seed=0, precision="float64", backend=BACKEND,
                      models_dir=models_root)
        else:
            out["texts"] = list(spec.texts)
            api.generate_embeddings(spec.model, list(spec.texts), precision="float64", backend=BACKEND,
                                    models_dir=models_root)
    except LLMError as e:
        out["error"] = {"variant": e.variant, "message": e.message}
        return out
    raise AssertionError(f"golden case {spec.name}: refllm raised no error")


RUNNERS = {"generate": run_generate, "embed": run_embed, "error": run_error}


# ----------------------------------------------------------------------------- writing

def _format_doc() -> str:
    doc = __doc__
    start = doc.index("Format (version 1)")
    return "# refllm golden set: the format\n\n" + doc[start:].strip() + "\n"


def build_header(models_root, specs: Sequence[CaseSpec]) -> dict:
    names = sorted({s.model for s in specs if s.model in (LLM, EMBEDDER)})
    models = {}
    for name, (kind, path) in _model_dirs(models_root, names).items():
        entry = {"kind": kind, "files": model_files(path), "tokenizer": f"tokenizers/{name}.json"}
        if kind == "llama":
            llm = engine.get_llm(path, precision="float64", backend=BACKEND)
            entry.update(eos_token_ids=sorted(llm.eos_token_ids), vocab_size=int(llm.model.config.vocab_size),
                         context_length=int(llm.context_length))
        models[name] = entry
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "suite": SUITE, "suite_version": SUITE_VERSION,
            "cases": [s.name for s in specs], "refllm_version": __version__, "spec_version": SPEC_VERSION,
            "precision": "float64", "backend": BACKEND, "top_n": TOP_N, "rng": RNG, "models": models}


def write_golden(out_dir, models_root=None, *, cases: Iterable[str] | None = None, progress: bool = False) -> Path:
    """Run the built-in suite (or the named `cases` of it) and write a golden set into
    `out_dir`; returns the path of `golden.jsonl`. The models are found under
    `models_root` (SPEC 5's order when None)."""
    specs = select(cases)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = registry.models_root(models_root)
    t0 = time.monotonic()
    header = build_header(root, specs)
    lines = [_dumps(header)]
    for i, spec in enumerate(specs):
        t = time.monotonic()
        lines.append(_dumps(RUNNERS[spec.kind](spec, root)))
        if progress:
            print(f"golden: [{i + 1}/{len(specs)}] {spec.name} ({time.monotonic() - t:.1f} s)", file=sys.stderr)
    (out_dir / "tokenizers").mkdir(exist_ok=True)
    for name, (kind, path) in _model_dirs(root, header["models"]).items():
        shutil.copyfile(path / "tokenizer.json", out_dir / "tokenizers" / f"{name}.json")
    (out_dir / "FORMAT.md").write_text(_format_doc(), encoding="utf-8")
    target = out_dir / GOLDEN_FILE
    tmp = target.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    if progress:
        print(f"golden: {len(specs)} cases in {time.monotonic() - t0:.1f} s -> {target}", file=sys.stderr)
    return target


# ----------------------------------------------------------------------------- reading

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


# ----------------------------------------------------------------------------- the built-in set, cached

def golden_cache_root() -> Path:
    env = os.environ.get("REFLLM_GOLDEN_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "refllm" / "golden"


def builtin_key(models_root=None, cases: Iterable[str] | None = None) -> str:
    """A short hash naming the built-in set for these models, cases and refllm (its version
    and the source of the modules that compute it)."""
    specs = select(cases)
    root = registry.models_root(models_root)
    shas = {name: model_files(path) for name, (kind, path) in
            _model_dirs(root, sorted({s.model for s in specs})).items()}
    here = Path(__file__).parent.parent
    code = {m: hashlib.sha256((here / m).read_bytes()).hexdigest() for m in COMPUTE_MODULES if (here / m).is_file()}
    blob = _dumps({"format_version": FORMAT_VERSION, "suite_version": SUITE_VERSION, "refllm": __version__,
                   "spec": SPEC_VERSION, "cases": [repr(s) for s in specs], "models": shas, "code": code})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def builtin_golden_dir(models_root=None, cases: Iterable[str] | None = None, *, cache_dir=None,
                       progress: bool = False) -> Path:
    """The directory of the built-in golden set (or of the named `cases`) for the models
    under `models_root`, generated into the cache on first use."""
    cases = None if cases is None else list(cases)
    root = Path(cache_dir) if cache_dir is not None else golden_cache_root()
    target = root / f"{SUITE}-v{SUITE_VERSION}-{builtin_key(models_root, cases)}"
    if (target / GOLDEN_FILE).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        write_golden(tmp, models_root, cases=cases, progress=progress)
        try:
            os.replace(tmp, target)
        except OSError:  # another process got there first
            if not (target / GOLDEN_FILE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _prune(root, keep=KEEP_CACHED)
    return target


KEEP_CACHED = 8  # built-in sets kept in the cache (the most recently written)


def _prune(root: Path, keep: int) -> None:
    """Remove all but the `keep` newest built-in sets from the cache."""
    sets = sorted((d for d in root.glob(f"{SUITE}-v*") if (d / GOLDEN_FILE).is_file()),
                  key=lambda d: (d / GOLDEN_FILE).stat().st_mtime, reverse=True)
    for d in sets[keep:]:
        shutil.rmtree(d, ignore_errors=True)


__all__ = ["write_golden", "load_golden", "builtin_golden_dir", "Golden", "CaseSpec", "BUILTIN", "QUICK",
           "params_to_json", "params_from_json", "encode_float", "decode_float", "golden_cache_root"]
