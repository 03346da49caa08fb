"""The Spin-shaped surface: `infer`, `infer_with_options`, `generate_embeddings`.

These mirror Spin's SDKs (`spin_sdk.llm` in Python): the model is a name from the
models on disk (see `refllm.registry`), the records are those of `refllm.types`, and
failures raise the WIT's error variants from `refllm.errors`. Extensions beyond the WIT
are keyword-only and change nothing for a call that does not use them:

    seed            the sampling seed (random, and reported in `result.seed`, if absent)
    stop            stop strings: generation ends before the first one
    backend         "numpy" | "triton" (see `refllm.backend`)
    precision       "float32" (default) | "float64"
    profile         "spec" (default) | "spin": Spin 3's engine's usage and text quirks
    models_dir      the models root (else $REFLLM_MODELS_DIR, ./.spin/ai-models, cache)
    allowed_models  Spin's `ai_models` allow-list (None: every model)
    pull            True (default): a default model that is not on disk yet is pulled
                    first, as `refllm pull` does (a notice and progress on stderr)

`params` is an `InferencingParams` or a dict of some of its fields (snake_case or the
WIT's kebab-case names); the others keep the WIT defaults.

Every failure is an `LLMError`: bad arguments are `InvalidInputError`, anything that
goes wrong while loading or running a model and is not already one of the WIT's
variants is wrapped in `LLMRuntimeError` (the original exception is its `__cause__`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

from . import engine, registry
from .errors import InvalidInputError, LLMError, LLMRuntimeError
from .generate import Generation, LoadedLLM
from .types import EmbeddingsResult, InferencingParams, InferencingResult, InferencingUsage

PROFILES = ("spec", "spin")
PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(InferencingParams))


def _llm_errors(fn):
    """Let only `LLMError`s out of `fn`: any other exception becomes a runtime-error."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LLMError:
            raise
        except Exception as e:  # noqa: BLE001 - Spin's runtime-error(string) is this catch-all
            raise LLMRuntimeError(f"{type(e).__name__}: {e}") from e

    return wrapper


def _check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise InvalidInputError(f"profile={profile!r} is not one of {', '.join(PROFILES)}")


def _check_model_name(model) -> None:
    if not isinstance(model, str):
        raise InvalidInputError(f"model must be a string, got {type(model).__name__}")


def as_params(params) -> InferencingParams | None:
    """`params` as an `InferencingParams`: None stays None (the WIT defaults), a dict names
    some fields (`max_tokens` or `max-tokens`) and the rest keep their defaults."""
    if params is None or isinstance(params, InferencingParams):
        return params
    if not isinstance(params, Mapping):
        raise InvalidInputError(f"params must be an InferencingParams or a dict, got {type(params).__name__}")
    values = {}
    for key, value in params.items():
        name = key.replace("-", "_") if isinstance(key, str) else key
        if name not in PARAM_FIELDS:
            raise InvalidInputError(f"params: unknown field {key!r} (the fields are {', '.join(PARAM_FIELDS)})")
        values[name] = value
    return InferencingParams(**values)


def _model_dir(model: str, kind: str, models_dir, pull: bool):
    """The model's directory; a default model missing from disk is pulled first if `pull`."""
    if not pull:
        find = registry.find_llm if kind == "llama" else registry.find_embedding_model
        return find(model, models_dir)
    from .weights.pull import ensure_model

    return ensure_model(model, kind, models_dir)


@_llm_errors
def load_llm(model: str, *, backend: str | None = None, precision: str | None = None, models_dir=None,
             allowed_models=None, pull: bool = True) -> LoadedLLM:
    """The loaded decoder `model` (kept for reuse): what `infer` runs, with its tokenizer
    and chat template (`LoadedLLM.apply_chat_template`)."""
    _check_model_name(model)
    registry.check_allowed(model, allowed_models)
    return engine.get_llm(_model_dir(model, "llama", models_dir, pull), precision=precision, backend=backend)


def _check_prompt(prompt) -> None:
    if not isinstance(prompt, str):
        raise InvalidInputError(f"prompt must be a string, got {type(prompt).__name__}")


@_llm_errors
def infer_stream(model: str, prompt: str, params: InferencingParams | dict | None = None, *, seed: int | None = None,
                 stop: Sequence[str] = (), backend: str | None = None, precision: str | None = None,
                 models_dir=None, allowed_models=None, pull: bool = True) -> Generation:
    """Start a generation; iterate the returned `Generation` for text pieces as they are
    made, then read its `.result` (the same result `infer` returns for the same seed)."""
    _check_prompt(prompt)
    params = as_params(params)
    llm = load_llm(model, backend=backend, precision=precision, models_dir=models_dir,
                   allowed_models=allowed_models, pull=pull)
    return Generation(llm, prompt, params, seed=seed, stop=stop)


def as_profile(result: InferencingResult, prompt: str, profile: str) -> InferencingResult:
    """`result` as `profile` reports it: "spin" is Spin 3's engine, prompt + completion as
    the text and prompt + generated tokens as the prompt-token-count."""
    _check_profile(profile)
    if profile != "spin":
        return result
    usage = result.usage
    return InferencingResult(
        text=prompt + result.text,
        usage=InferencingUsage(usage.prompt_token_count + usage.generated_token_count, usage.generated_token_count),
        seed=result.seed, finish_reason=result.finish_reason,
    )


@_llm_errors
def infer(model: str, prompt: str, params: InferencingParams | dict | None = None, *, seed: int | None = None,
          stop: Sequence[str] = (), backend: str | None = None, precision: str | None = None,
          profile: str = "spec", models_dir=None, allowed_models=None, pull: bool = True) -> InferencingResult:
    """infer(model, prompt, params) -> inferencing-result (SPEC 1-2)."""
    _check_profile(profile)
    result = infer_stream(model, prompt, params, seed=seed, stop=stop, backend=backend, precision=precision,
                          models_dir=models_dir, allowed_models=allowed_models, pull=pull).run()
    return as_profile(result, prompt, profile)


def infer_with_options(model: str, prompt: str, options: InferencingParams | dict | None = None,
                       **kwargs) -> InferencingResult:
    """The Spin SDKs' name for `infer` with explicit parameters."""
    return infer(model, prompt, options, **kwargs)


@_llm_errors
def generate_embeddings(model: str, text: Sequence[str], *, backend: str | None = None, precision: str | None = None,
                        profile: str = "spec", models_dir=None, allowed_models=None,
                        pull: bool = True) -> EmbeddingsResult:
    """generate-embeddings(model, text) -> embeddings-result (SPEC 4)."""
    _check_profile(profile)
    _check_model_name(model)
    registry.check_allowed(model, allowed_models)
    path = _model_dir(model, "embedding", models_dir, pull)
    embedder = engine.get_embedder(path, precision=precision, backend=backend)
    return embedder.embed(text, profile=profile)


__all__ = ["infer", "infer_with_options", "infer_stream", "generate_embeddings", "load_llm", "as_params", "as_profile"]
