"""refllm: a from-scratch NumPy reference for Spin's Serverless AI interface.

    import refllm
    result = refllm.infer("smollm2-135m-instruct", "Why is the sky blue?")
    vectors = refllm.generate_embeddings("all-minilm-l6-v2", ["hello", "world"])

See SPEC.md for the behaviour contract; `refllm.sampling.sample_token` is the
sampling pipeline on its own, for checking another backend's logits.
"""

__version__ = "0.1.0"
SPEC_VERSION = "1"

from .api import generate_embeddings, infer, infer_stream, infer_with_options  # noqa: E402
from .errors import InvalidInputError, LLMError, LLMRuntimeError, ModelNotSupportedError  # noqa: E402
from .bert import Bert  # noqa: E402
from .llama import KVCache, Llama  # noqa: E402
from .types import (  # noqa: E402
    EmbeddingsResult,
    EmbeddingsUsage,
    InferencingParams,
    InferencingResult,
    InferencingUsage,
)


__all__ = [
    "infer", "infer_with_options", "infer_stream", "generate_embeddings",
    "InferencingParams", "InferencingResult", "InferencingUsage", "EmbeddingsResult", "EmbeddingsUsage",
    "LLMError", "ModelNotSupportedError", "LLMRuntimeError", "InvalidInputError",
    "Llama", "KVCache", "Bert",
]
