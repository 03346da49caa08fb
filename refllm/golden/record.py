"""Running one case of a suite: what refllm's float64 reference computes for it.

    record(spec, models) -> dict     the case's line of golden.jsonl (FORMAT.md), as JSON
                                     objects and lists of Python ints, floats and strings

Generation cases run `refllm.generate.Generation` (exactly what `refllm.infer(...,
precision="float64")` runs) on the decoder loaded in float64 with NumPy, recording the
float64 logits of every step before they are rounded to float32 for sampling (SPEC 3's
step 1 is float32). The draws are SPEC 3's: ``numpy.random.Generator(PCG64(seed))
.random()``, one per sampled token. Embedding cases run the float64 encoder with the
spec profile and with Spin 3's (SPEC 6). Error cases call `refllm.infer` /
`refllm.generate_embeddings` and record the WIT error variant and message.

The numbers a step reports beside its token (log-probabilities, the margin, the top-n
and the interval of ``u``) come from `refllm.logprobs`, the one home of that arithmetic
that `refllm conform` and `refllm trace` use too.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import api, logprobs, sampling
from ..errors import LLMError
from ..generate import Generation
from ..types import InferencingParams
from .models import BACKEND, PRECISION, Models
from .reader import params_to_json
from .suite import CaseSpec

TOP_N = 20  # the largest raw logits kept per step


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


def top_logits(z64: np.ndarray, n: int = TOP_N) -> list[list]:  # [V] -> n x [id, logit]
    return [[i, z] for i, z in logprobs.top_n(z64, n)]


def step_record(llm, z64: np.ndarray, z32: np.ndarray, ids: list[int], token: int, u, params: InferencingParams,
                text_end: int) -> dict:
    """One entry of a generation case's "steps" (FORMAT.md)."""
    rp, last_n = params.repeat_penalty, params.repeat_penalty_last_n_token_count
    pen = logprobs.penalize(z64, ids, rp, last_n)  # [V] float64
    rec = {"token": int(token), "text": llm.decode([token]), "eos": token in llm.eos_token_ids, "text_end": text_end,
           "u": None if u is None else float(u), "logit": float(z64[token]),
           "logprob": float(logprobs.log_softmax_at(z64, [token])[0]),
           "logprob_penalized": float(logprobs.log_softmax_at(pen, [token])[0])}
    if u is None:  # greedy: the penalised float64 logit gap to the best other token
        rec["margin"] = float(pen[token] - np.max(np.delete(pen, token)))
    else:  # sampled: where u falls in the chosen token's interval (SPEC 3 on the float32 logits)
        lo, hi = logprobs.u_interval(z32, ids, params, token)
        rec["u_interval"] = [lo, hi]
        rec["margin"] = float(min(u - lo, hi - u))
    rec["top"] = top_logits(z64)
    return rec


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _prompt(spec: CaseSpec, llm) -> str:
    """The case's prompt: given, or its chat messages rendered with the model's template
    into the text a Spin app would pass to `infer`. It is a plain prompt from then on:
    the tokenizer adds its BOS as to any prompt (the WIT's infer takes text only, and
    `refllm conform` replays the case as that text), not a chat route's `ChatText`."""
    if spec.messages is None:
        return spec.prompt
    return str(llm.apply_chat_template(list(spec.messages)))  # [str subclass -> str]


def _head(spec: CaseSpec) -> dict:
    out = {"name": spec.name, "kind": spec.kind, "description": spec.description, "model": spec.model}
    if spec.messages is not None:
        out["messages"] = [dict(m) for m in spec.messages]
    return out


def run_generate(spec: CaseSpec, models: Models) -> dict:
    llm = models.llm(spec.model)
    prompt = _prompt(spec, llm)
    rec_model = _Recording(llm.model)
    gen = Generation(dataclasses.replace(llm, model=rec_model), prompt, spec.params,
                     seed=spec.seed if spec.seed is not None else 0)
    result = gen.run()
    ids = list(gen.prompt_ids)
    steps = []
    for i, step in enumerate(gen.steps):
        z64 = rec_model.outputs[i]  # [V] float64, what step i was sampled from
        if not np.array_equal(z64.astype(np.float32), step.logits):
            raise AssertionError(f"{spec.name}: step {i}'s recorded logits are not the ones sampled from")
        text_end = _common_prefix(llm.decode(gen.tokens[: i + 1]), result.text)
        steps.append(step_record(llm, z64, step.logits, ids, step.token, step.u, spec.params, text_end))
        ids.append(step.token)
    usage = {"prompt_token_count": result.usage.prompt_token_count,
             "generated_token_count": result.usage.generated_token_count}
    return {
        **_head(spec), "prompt": prompt, "params": params_to_json(spec.params), "seed": spec.seed,
        "sampling": sampling.needs_draw(spec.params), "prompt_ids": list(map(int, gen.prompt_ids)),
        "steps": steps, "tokens": list(map(int, gen.tokens)), "text": result.text,
        "finish_reason": result.finish_reason, "usage": usage,
        "spin": {"text": prompt + result.text,
                 "usage": {"prompt_token_count": usage["prompt_token_count"] + usage["generated_token_count"],
                           "generated_token_count": usage["generated_token_count"]}},
    }


def run_embed(spec: CaseSpec, models: Models) -> dict:
    embedder = models.embedder(spec.model)
    texts = list(spec.texts)
    vectors, n = embedder.embed_array(texts, profile="spec", return_usage=True)
    spin_vectors, spin_n = embedder.embed_array(texts, profile="spin", return_usage=True)
    return {
        **_head(spec), "texts": texts,
        "token_ids": [list(map(int, t)) for t in embedder.tokenize(texts)],
        "embeddings": np.asarray(vectors, dtype=np.float64).tolist(), "usage": {"prompt_token_count": int(n)},
        "spin": {"embeddings": np.asarray(spin_vectors, dtype=np.float64).tolist(),
                 "usage": {"prompt_token_count": int(spin_n)}},
    }


def run_error(spec: CaseSpec, models: Models) -> dict:
    out = {**_head(spec), "op": spec.op}
    try:
        if spec.op == "infer":
            out.update(prompt=spec.prompt, params=params_to_json(spec.params))
            if spec.messages is not None:  # rendered with the run's decoder (null if that fails)
                out["prompt"] = _prompt(spec, models.llm(models.llm_name))
            api.infer(spec.model, out["prompt"], spec.params, seed=0, precision=PRECISION, backend=BACKEND,
                      models_dir=models.root)
        else:
            out["texts"] = list(spec.texts)
            api.generate_embeddings(spec.model, list(spec.texts), precision=PRECISION, backend=BACKEND,
                                    models_dir=models.root)
    except LLMError as e:
        if spec.expect_error is not None and e.variant != spec.expect_error:
            raise CaseError(f"case {spec.name}: refllm raises {e.variant} ({e.message}), "
                            f"not the {spec.expect_error} the suite expects") from e
        out["error"] = {"variant": e.variant, "message": e.message}
        return out
    raise CaseError(f"case {spec.name}: refllm raises no error for it (the suite expects "
                    f"{spec.expect_error or 'one'})")


class CaseError(Exception):
    """A case that cannot be recorded as the suite states it (e.g. an expected error that
    refllm does not raise)."""


# The modules whose arithmetic the golden numbers depend on: a change to one of them, even
# one that moves a result by an ulp, makes a new cached built-in set, and a Ray worker
# whose refllm differs from the driver's is refused. By import name (found, not imported).
COMPUTE_MODULES = ("refllm.ops", "refllm.llama", "refllm.llama_loader", "refllm.half_weights", "refllm.checkpoint",
                   "refllm.config", "refllm.bert", "refllm.embeddings", "refllm.generate", "refllm.sampling",
                   "refllm.logprobs", "refllm.chat", "refllm.golden.record", "refllm.golden.models",
                   "refllm.weights.gguf_to_hf", "refllm.weights.gguf_tokenizer")


def compute_digest() -> dict:
    """refllm's version and the sha256 of the source of each module in COMPUTE_MODULES."""
    import hashlib
    import importlib.util
    from pathlib import Path

    from .. import __version__

    out = {"refllm": __version__}
    for name in COMPUTE_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and Path(spec.origin).is_file():
            out[name] = hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()
    return out


RUNNERS = {"generate": run_generate, "embed": run_embed, "error": run_error}


def record(spec: CaseSpec, models: Models) -> dict:
    """The golden line of one case. A generation or embedding case that refllm refuses
    raises `CaseError` naming the case (a suite marks inputs it means to be refused
    with "error")."""
    try:
        return RUNNERS[spec.kind](spec, models)
    except LLMError as e:
        raise CaseError(f"case {spec.name}: refllm refuses it: {e.variant}: {e.message} (a case meant to be "
                        f"refused says so with \"error\": \"{e.variant}\")") from e


__all__ = ["record", "compute_digest", "COMPUTE_MODULES", "step_record", "top_logits", "CaseError", "RUNNERS", "TOP_N"]
