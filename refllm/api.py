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
"""

from __future__ import annotations

from typing import Sequence

from . import engine, registry
from .errors import InvalidInputError
from .generate import Generation
from .types import EmbeddingsResult, InferencingParams, InferencingResult, InferencingUsage

PROFILES = ("spec", "spin")


def _check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise InvalidInputError(f"profile={profile!r} is not one of {', '.join(PROFILES)}")


def _llm(model: str, models_dir, allowed_models, backend, precision):
    if not isinstance(model, str):
        raise InvalidInputError(f"model must be a string, got {type(model).__name__}")
    registry.check_allowed(model, allowed_models)
    return engine.get_llm(registry.find_llm(model, models_dir), precision=precision, backend=backend)


def _check_prompt(prompt) -> None:
    if not isinstance(prompt, str):
        raise InvalidInputError(f"prompt must be a string, got {type(prompt).__name__}")


def infer_stream(model: str, prompt: str, params: InferencingParams | None = None, *, seed: int | None = None,
                 stop: Sequence[str] = (), backend: str | None = None, precision: str | None = None,
                 models_dir=None, allowed_models=None) -> Generation:
    """Start a generation; iterate the returned `Generation` for text pieces as they are
    made, then read its `.result` (the same result `infer` returns for the same seed)."""
    _check_prompt(prompt)
    llm = _llm(model, models_dir, allowed_models, backend, precision)
    return Generation(llm, prompt, params, seed=seed, stop=stop)


def infer(model: str, prompt: str, params: InferencingParams | None = None, *, seed: int | None = None,
          stop: Sequence[str] = (), backend: str | None = None, precision: str | None = None,
          profile: str = "spec", models_dir=None, allowed_models=None) -> InferencingResult:
    """infer(model, prompt, params) -> inferencing-result (SPEC 1-2)."""
    _check_profile(profile)
    result = infer_stream(model, prompt, params, seed=seed, stop=stop, backend=backend, precision=precision,
                          models_dir=models_dir, allowed_models=allowed_models).run()
    if profile == "spin":  # Spin 3's engine: prompt + completion, and prompt + generated tokens
        usage = result.usage
        return InferencingResult(
            text=prompt + result.text,
            usage=InferencingUsage(usage.prompt_token_count + usage.generated_token_count, usage.generated_token_count),
            seed=result.seed, finish_reason=result.finish_reason,
        )
    return result


def infer_with_options(model: str, prompt: str, options: InferencingParams | None = None, **kwargs) -> InferencingResult:
    """The Spin SDKs' name for `infer` with explicit parameters."""
    return infer(model, prompt, options, **kwargs)


def generate_embeddings(model: str, text: Sequence[str], *, backend: str | None = None, precision: str | None = None,
                        profile: str = "spec", models_dir=None, allowed_models=None) -> EmbeddingsResult:
    """generate-embeddings(model, text) -> embeddings-result (SPEC 4)."""
    _check_profile(profile)
    if not isinstance(model, str):
        raise InvalidInputError(f"model must be a string, got {type(model).__name__}")
    registry.check_allowed(model, allowed_models)
    embedder = engine.get_embedder(registry.find_embedding_model(model, models_dir), precision=precision, backend=backend)
    return embedder.embed(text, profile=profile)


__all__ = ["infer", "infer_with_options", "infer_stream", "generate_embeddings"]
