"""What each backend reads and does, written down as data (`BACKENDS`).

conform sends a case by its backend's entry and scores the answer by it:

    params        the request field the backend reads for each knob (None: it has none)
    neutral       the explicit values conform sends so that the backend's own defaults
                  cannot act: penalty 1.0, top-k off, min-p 0, top-p 1 (a backend that
                  reads a field it is not sent applies its default, silently)
    top_k_off     the value that switches top-k off (None: leave the field out)
    eos_counted   whether a generation that stops on the EOS counts it in the usage
                  (None: not documented, either is accepted)
    penalty       the repeat penalty's window:
                  "last-n"            the last n ids of prompt + generated (SPEC 3), n per request
                  "whole"             every id of prompt + generated, no n
                  "generated-last-n"  the last n GENERATED ids only, n fixed when the server starts
                  None                no multiplicative repeat penalty at all
    returns       what a completion carries: "ids", "logprobs" (of the raw logits), "text"
    sampler       the order it samples in: a key of `refllm.profiles.PROFILES`
                  (None: undocumented, sampled cases are reported, not scored)
    known         behaviours of the engine itself that conform reports but expects:
                  (case, fault) -> the cause, the README's table

Sources, read for this table (2025):

* refllm: SPEC.md and refllm/serve (this repository).
* llama-cpp-python 0.3.x (abetlen/llama-cpp-python, ``llama_cpp/server/types.py``:
  ``CreateCompletionRequest``; ``llama_cpp/llama.py``: ``_init_sampler``, ``generate``,
  ``_create_completion``). Defaults top_k 40, top_p 0.95, min_p 0.05, temperature 0.8,
  repeat_penalty 1.1; the penalty sampler is built per generation and only the
  generated tokens are ``accept``-ed into it, over ``last_n_tokens_size`` (64, a server
  setting); the chain is penalties -> top_k -> typical -> top_p -> min_p -> temp -> dist
  (temperature 0: penalties -> greedy). Completion logprobs are of ``Llama._scores``,
  the raw logits; token texts are decoded one by one with ``errors="ignore"``; an EOS
  ends the loop before it is appended, so it is not counted.
* llama.cpp's C++ ``llama-server`` (ggml-org/llama.cpp ``tools/server/README.md``):
  ``repeat_penalty`` (1.0), ``repeat_last_n`` (64; -1 the context), ``top_k`` (40),
  ``top_p`` (0.95), ``min_p`` (0.05), ``typical_p``, ``temperature`` (0.8); the prompt
  tokens are accepted into the sampler, so the window spans prompt and generated ids;
  the common sampler's chain (`refllm.profiles`, llama.cpp).
* Text Generation Inference (``docs/source/reference/api_reference.md``,
  ``server/text_generation_server/utils/tokens.py``): ``repetition_penalty``
  (None = off, whole sequence), ``top_k`` / ``top_p`` (None = off), ``do_sample``,
  ``seed``, ``details`` gives ids and logprobs; transformers' processor order.
* vLLM (``vllm/sampling_params.py``): ``repetition_penalty`` (1.0, prompt + output),
  ``top_k`` (0 or -1 = off), ``top_p`` (1.0), ``min_p`` (0.0), ``seed``; penalties,
  then temperature, then top-k and top-p on the renormalised mass (transformers' order).
* OpenAI (platform.openai.com/docs/api-reference/completions): ``temperature``,
  ``top_p``, ``seed`` (best effort), ``logprobs``; no top-k, no multiplicative penalty,
  no documented sampling order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Backend", "BACKENDS", "backend_for", "DEFAULT_BACKEND"]


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    params: dict  # knob -> request field name (or None)
    neutral: dict  # field -> value always sent
    top_k_off: object  # the value meaning "top-k off", or None: leave the field out
    eos_counted: bool | None
    penalty: str | None
    returns: tuple[str, ...]
    sampler: str | None
    known: dict = field(default_factory=dict)  # (case, fault) -> cause
    penalty_last_n: int | None = None  # a window length fixed when the server starts (not per request)

    def field(self, knob: str) -> str | None:
        return self.params.get(knob)


_OPENAI_NAMES = {"max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed"}

# The llama.cpp behaviours conform expects (the README's table, section "Checking llama.cpp").
LLAMA_CPP_PYTHON_KNOWN = {  # each seen against llama-cpp-python 0.3.36 (README, "Checking llama.cpp")
    ("unicode", "max-tokens"):
        "llama-cpp-python keeps generating past max_tokens while its text ends inside a UTF-8 character "
        "(_create_completion holds back incomplete characters and its loop does not stop at max_tokens then)",
    ("err-temperature-nan", "error-not-raised"):
        "llama-cpp-python does not validate the temperature (a plain float field): NaN is accepted",
    ("err-temperature-inf", "error-not-raised"):
        "llama-cpp-python does not validate the temperature (a plain float field): infinity is accepted",
    ("err-repeat-penalty-zero", "error-not-raised"):
        "llama-cpp-python's repeat_penalty bound is >= 0: 0 is accepted",
    ("err-repeat-penalty-inf", "error-not-raised"):
        "llama-cpp-python's repeat_penalty bound is >= 0 only: infinity is accepted",
    ("err-top-k-zero", "error-not-raised"):
        "top_k 0 means 'off' in llama.cpp, not an error",
    ("err-repeat-penalty-negative", "error-status"):
        "llama-cpp-python rejects repeat_penalty -1 (pydantic: >= 0) but its RouteErrorHandler answers the "
        "RequestValidationError with HTTP 500, not 4xx",
    ("err-top-p-nan", "error-status"):
        "llama-cpp-python rejects top_p NaN (pydantic: <= 1) but its RouteErrorHandler answers the "
        "RequestValidationError with HTTP 500, not 4xx",
    ("err-empty-prompt", "error-status"):
        "llama-cpp-python answers an empty prompt with HTTP 500: zero prompt tokens reach Llama.sample, whose "
        "`assert self.n_tokens > 0` fails",
    ("err-unknown-model", "error-not-raised"):
        "llama-cpp-python serves every model name with its one loaded model",
    ("err-infer-embedding-model", "error-not-raised"):
        "llama-cpp-python serves every model name with its one loaded model",
}

BACKENDS: dict[str, Backend] = {
    "refllm": Backend(
        "refllm", "refllm's own server (`refllm serve`): SPEC 2-4 in every dialect",
        params={**_OPENAI_NAMES, "repeat_penalty": "repetition_penalty", "top_k": "top_k", "min_p": None,
                "last_n": None},
        neutral={}, top_k_off=None, eos_counted=True, penalty="whole", returns=("ids", "logprobs", "text"),
        sampler="spec"),  # penalty: over TGI and OpenAI the whole sequence; the Spin dialect carries last-n itself
    "llama-cpp-python": Backend(
        "llama-cpp-python", "llama-cpp-python 0.3.x's OpenAI-compatible server (python -m llama_cpp.server)",
        params={**_OPENAI_NAMES, "repeat_penalty": "repeat_penalty", "top_k": "top_k", "min_p": "min_p",
                "last_n": None},
        neutral={"repeat_penalty": 1.0, "min_p": 0.0, "top_p": 1.0, "typical_p": 1.0, "frequency_penalty": 0.0,
                 "presence_penalty": 0.0},
        top_k_off=0, eos_counted=False, penalty="generated-last-n", returns=("logprobs", "text"),
        sampler="llama.cpp", known=LLAMA_CPP_PYTHON_KNOWN, penalty_last_n=64),  # --last_n_tokens_size
    "llama-server": Backend(
        "llama-server", "llama.cpp's C++ llama-server (documented API; its OpenAI /v1/completions)",
        params={**_OPENAI_NAMES, "repeat_penalty": "repeat_penalty", "top_k": "top_k", "min_p": "min_p",
                "last_n": "repeat_last_n"},
        neutral={"repeat_penalty": 1.0, "min_p": 0.0, "top_p": 1.0, "typical_p": 1.0, "frequency_penalty": 0.0,
                 "presence_penalty": 0.0, "xtc_probability": 0.0, "dry_multiplier": 0.0, "top_n_sigma": -1.0},
        top_k_off=0, eos_counted=None, penalty="last-n", returns=("logprobs", "text"), sampler="llama.cpp"),
    "tgi": Backend(
        "tgi", "Text Generation Inference (POST /generate)",
        params={"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed",
                "repeat_penalty": "repetition_penalty", "top_k": "top_k", "min_p": None, "last_n": None},
        neutral={}, top_k_off=None, eos_counted=True, penalty="whole", returns=("ids", "logprobs", "text"),
        sampler="hf"),
    "vllm": Backend(
        "vllm", "vLLM's OpenAI-compatible server",
        params={**_OPENAI_NAMES, "repeat_penalty": "repetition_penalty", "top_k": "top_k", "min_p": "min_p",
                "last_n": None},
        neutral={"repetition_penalty": 1.0, "min_p": 0.0, "top_p": 1.0, "frequency_penalty": 0.0,
                 "presence_penalty": 0.0},
        top_k_off=-1, eos_counted=True, penalty="whole", returns=("logprobs", "text"), sampler="hf"),
    "openai": Backend(
        "openai", "OpenAI's completions API",
        params={**_OPENAI_NAMES, "repeat_penalty": None, "top_k": None, "min_p": None, "last_n": None},
        neutral={"top_p": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0},
        top_k_off=None, eos_counted=None, penalty=None, returns=("logprobs", "text"), sampler=None),
}

# The backend a profile means when no --backend is given, per dialect.
DEFAULT_BACKEND = {("llama.cpp", "openai"): "llama-cpp-python", ("hf", "tgi"): "tgi", ("hf", "openai"): "vllm"}


def backend_for(profile: str, dialect: str, name: str | None = None) -> Backend:
    """The entry named `name`, else the one `profile` means in `dialect` (refllm's otherwise)."""
    if name is None:
        name = DEFAULT_BACKEND.get((profile, dialect), "refllm")
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    return BACKENDS[name]
