"""The `error` variant of Spin's llm WIT, one exception per case.

    variant error { model-not-supported, runtime-error(string), invalid-input(string) }

Every exception refllm raises on purpose is an `LLMError`; `.variant` is the WIT case
name, so a caller can map it to Spin's error, an HTTP status, or an exit code.
"""

from __future__ import annotations


class LLMError(Exception):
    """Base of the three WIT error variants."""

    variant: str = ""

    def __init__(self, message: str = ""):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.variant}: {self.message}" if self.message else self.variant


class ModelNotSupportedError(LLMError):
    """model-not-supported: the model exists but not for this operation/architecture."""

    variant = "model-not-supported"


class LLMRuntimeError(LLMError):
    """runtime-error(string): the model could not be run (unreadable or inconsistent files, ...)."""

    variant = "runtime-error"


class InvalidInputError(LLMError):
    """invalid-input(string): the request is wrong (bad parameter, unknown model, ...)."""

    variant = "invalid-input"
