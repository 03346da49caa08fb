"""The records of Spin's `fermyon:spin/llm@2.0.0` WIT interface, as Python dataclasses.

Field names are the snake_case of the WIT's kebab-case names, and the defaults of
`InferencingParams` are the ones Spin uses when `params` is absent (SPEC.md section 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class InferencingParams:
    """inferencing-params: the knobs of one `infer` call."""

    max_tokens: int = 100
    repeat_penalty: float = 1.1
    repeat_penalty_last_n_token_count: int = 64
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9


@dataclass(frozen=True)
class InferencingUsage:
    """inferencing-usage."""

    prompt_token_count: int  # prompt tokens, BOS included
    generated_token_count: int  # sampled tokens, an EOS included


@dataclass(frozen=True)
class InferencingResult:
    """inferencing-result: the generated text only (not the prompt) and its usage."""

    text: str
    usage: InferencingUsage
    seed: int | None = field(default=None, compare=False)  # extension: the seed used
    finish_reason: str | None = field(default=None, compare=False)  # "eos" | "length" | "context" | "stop"


@dataclass(frozen=True)
class EmbeddingsUsage:
    """embeddings-usage."""

    prompt_token_count: int  # real tokens over all texts, specials included


@dataclass(frozen=True)
class EmbeddingsResult:
    """embeddings-result: one L2-normalised vector per input text, in input order."""

    embeddings: list[list[float]]
    usage: EmbeddingsUsage
