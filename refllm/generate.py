"""Text generation: a loaded model, prefill, decode, stop, stream (SPEC.md section 2).

    prompt --tokenize--> ids --prefill--> logits --sample--> token --decode_one--> ...

`prefill` runs the whole prompt through the model once, filling the KV cache;
`decode_one` runs one new token. `generate_steps` is the loop, yielding one `Step`
(the token, the draw `u` that chose it, the logits it was chosen from) per sampled
token until a stop condition; `Generation` turns those steps into streamed text and
usage. Nothing here knows about HTTP or Spin's error names beyond `InvalidInputError`.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import sampling
from .chat import ChatText, render_chat
from .config import read_json
from .errors import InvalidInputError, LLMRuntimeError
from .llama import Llama
from .types import InferencingParams, InferencingResult, InferencingUsage


@dataclass
class LoadedLLM:
    """A decoder with everything generation needs beside the weights."""

    name: str
    model: Llama
    tokenizer: "tokenizers.Tokenizer"  # noqa: F821
    eos_token_ids: frozenset[int]
    context_length: int
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ...

    @classmethod
    def from_dir(cls, model_dir, dtype=np.float32, backend: str | None = None, name: str | None = None) -> "LoadedLLM":
        from tokenizers import Tokenizer

        from .weights.pull import local_model_dir

        model_dir = local_model_dir(model_dir)  # a .gguf file: its converted directory
        model = Llama.from_pretrained(model_dir, dtype=dtype, backend=backend)
        try:
            tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        except Exception as e:
            raise LLMRuntimeError(f"{model_dir / 'tokenizer.json'}: cannot load the tokenizer ({e})") from e
        tok_config = read_json(model_dir / "tokenizer_config.json") if (model_dir / "tokenizer_config.json").is_file() else {}
        special = {k: _token_str(tok_config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        special = {k: v for k, v in special.items() if v is not None}
        _honour_bos_eos_flags(tokenizer, tok_config, special, model_dir)
        return cls(
            name=name or model_dir.name,
            model=model,
            tokenizer=tokenizer,
            eos_token_ids=_eos_ids(model_dir, model.config.eos_token_id, tokenizer, special.get("eos_token")),
            context_length=model.config.max_position_embeddings,
            chat_template=tok_config.get("chat_template") if isinstance(tok_config.get("chat_template"), str) else None,
            special_tokens=special,
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens (the BOS) added by the tokenizer, except to
        a chat template's text (`ChatText`, which writes its own: SPEC 2.1)."""
        if not isinstance(text, str):
            raise InvalidInputError(f"prompt must be a string, got {type(text).__name__}")
        try:  # encode_batch releases the GIL (encode does not): a 2 MB prompt must not stall a server's loop
            return self.tokenizer.encode_batch([text], add_special_tokens=not isinstance(text, ChatText))[0].ids
        except (TypeError, ValueError) as e:  # e.g. a lone surrogate, which is not UTF-8
            raise InvalidInputError(f"prompt is not valid Unicode text ({e})") from e

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> ChatText:
        return render_chat(self.chat_template, messages, add_generation_prompt, **self.special_tokens)


def _token_str(t):
    if isinstance(t, dict):  # AddedToken serialised as {"content": ...}
        t = t.get("content")
    return t if isinstance(t, str) else None


LLAMA_TOKENIZER_CLASSES = {"LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast"}


def _honour_bos_eos_flags(tokenizer, tok_config: dict, special: dict, model_dir: Path) -> None:
    """tokenizer_config.json's `add_bos_token` / `add_eos_token`, as transformers' fast
    Llama tokenizer reads them.

    For a `LlamaTokenizer(Fast)` class, transformers 4's `LlamaTokenizerFast.__init__`
    rebuilds tokenizer.json's post-processor from the two flags (absent: BOS yes, EOS
    no) with `update_post_processor`; llama.cpp's converter copies the same flags into
    the GGUF. So a Llama 2 fine-tune saying `"add_eos_token": true` gets `</s>` appended,
    one saying `"add_bos_token": false` no `<s>`. Any other class keeps tokenizer.json's
    post-processor. (transformers 5 drops both flags whenever a tokenizer.json exists:
    `tokenization_utils_base.from_pretrained`; it agrees with this wherever the flags
    agree with the file, as in Llama 2's and Mistral's own repositories.)
    """
    from tokenizers import processors

    if tok_config.get("tokenizer_class") not in LLAMA_TOKENIZER_CLASSES:
        return
    bos = special.get("bos_token") if tok_config.get("add_bos_token", True) else None
    eos = special.get("eos_token") if tok_config.get("add_eos_token", False) else None
    tokens = [(t, tokenizer.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    for t, i in tokens:
        if i is None:
            raise LLMRuntimeError(f"{model_dir / 'tokenizer_config.json'}: special token {t!r} is not in the vocabulary")
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=tokens)


def _eos_ids(model_dir: Path, from_config, tokenizer, eos_token: str | None) -> frozenset[int]:
    """The ids that end a generation (SPEC 2.3): generation_config.json's eos_token_id
    (an int or a list; Llama-3-Instruct's `<|eot_id|>` is only there), else config.json's,
    else the tokenizer's EOS token (tokenizer_config.json's `eos_token`, else `</s>`)."""
    ids = None
    if (model_dir / "generation_config.json").is_file():
        ids = read_json(model_dir / "generation_config.json").get("eos_token_id")
    if ids is None:
        ids = from_config
    if ids is None:
        ids = tokenizer.token_to_id(eos_token or "</s>")
    if ids is None:
        raise LLMRuntimeError(f"{model_dir}: no eos_token_id in generation_config.json or config.json, "
                              f"and no {eos_token or '</s>'} token")
    ids = [ids] if isinstance(ids, int) else ids
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise LLMRuntimeError(f"{model_dir}: eos_token_id must be an int or a list of ints, got {ids!r}")
    return frozenset(ids)


# ------------------------------------------------------------------ validation

def validate_params(params: InferencingParams) -> None:
    """SPEC 2.2: invalid-input naming the field and the value."""
    for name in ("repeat_penalty", "temperature", "top_p"):
        value = getattr(params, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInputError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise InvalidInputError(f"{name} must be finite, got {value!r}")
    for name in ("max_tokens", "repeat_penalty_last_n_token_count", "top_k"):
        value = getattr(params, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**32:
            raise InvalidInputError(f"{name} must be an integer in [0, 2^32), got {value!r}")
    with np.errstate(over="ignore"):  # 1e39 becomes inf: a valid (if extreme) penalty
        as_float32 = np.float32(params.repeat_penalty)
    if not as_float32 > 0:  # SPEC 2.2: the float32 it becomes (5e-324 is 0 there)
        raise InvalidInputError(f"repeat_penalty must be > 0 as a float32, got {params.repeat_penalty!r}")
    if params.top_k == 0:
        raise InvalidInputError("top_k must be > 0, got 0")


def validate_prompt(llm: LoadedLLM, prompt_ids: Sequence[int]) -> None:
    if len(prompt_ids) == 0:
        raise InvalidInputError("prompt tokenizes to zero tokens")
    if len(prompt_ids) > llm.context_length:
        raise InvalidInputError(
            f"prompt is {len(prompt_ids)} tokens, longer than the model's context of {llm.context_length} tokens"
        )


# ------------------------------------------------------------------ the loop

@dataclass
class Step:
    token: int  # the sampled token id
    u: float | None  # the draw that chose it (None on the greedy path)
    logits: np.ndarray  # [V] float32, the model's logits it was chosen from (before the penalty)


def prefill(model, prompt_ids, cache):  # [T] -> [V]
    """Run the whole prompt, filling the cache; the logits of the last position."""
    return model(prompt_ids, cache, last_only=True)[0]


def decode_one(model, token: int, cache):  # () -> [V]
    """Run one new token at position cache.pos; its logits (`Llama.decode`)."""
    return model.decode(token, cache)


class Decoding:
    """One sequence between model calls: `generate_steps`, a step at a time.

        seq = Decoding(llm, prompt_ids, params, rng)
        logits = seq.prefill()                    # [V], the cache now holds the prompt
        step = seq.sample(logits)                 # a Step; seq.done after the last one
        logits = decode_one(llm.model, step.token, seq.cache)   # ... or one row of a batch

    `generate_steps` drives one alone; a scheduler drives many and runs their decode
    steps together (`refllm.serve.scheduler`). The sampling state (the ids so far, the
    draws of `rng`) lives here, so both give the same tokens.
    """

    def __init__(self, llm: LoadedLLM, prompt_ids: Sequence[int], params: InferencingParams, rng):
        self.llm, self.params, self.rng = llm, params, rng
        self.ids = list(prompt_ids)  # the prompt, then every sampled token
        self.cache = None  # made by prefill
        self.sampled = 0
        self.done = params.max_tokens == 0

    def prefill(self):  # -> [V]
        """Make the cache and run the prompt; the logits of its last position."""
        self.cache = self.llm.model.new_cache(min(self.llm.context_length, len(self.ids) + self.params.max_tokens))
        return prefill(self.llm.model, self.ids, self.cache)

    def sample(self, logits) -> Step:
        """The next token, sampled from `logits` [V]; `done` once a stop condition holds
        (an EOS, max_tokens sampled, the context full). One draw of `rng` is consumed
        per token on the sampling path, none when greedy."""
        logits = np.asarray(logits, dtype=np.float32)  # [V]
        u = self.rng.random() if sampling.needs_draw(self.params) else None
        token = sampling.sample_token(logits, self.ids, self.params, u)
        self.ids.append(token)
        self.sampled += 1
        self.done = (token in self.llm.eos_token_ids or self.sampled == self.params.max_tokens
                     or len(self.ids) >= self.llm.context_length)
        return Step(token, u, logits)


def generate_steps(llm: LoadedLLM, prompt_ids: Sequence[int], params: InferencingParams, rng) -> Iterator[Step]:
    """Sample up to max_tokens tokens; stop after an EOS or when the context is full.

    One draw of `rng` is consumed per token on the sampling path, none when greedy.
    """
    return decode_steps(Decoding(llm, prompt_ids, params, rng))


def decode_steps(seq: Decoding) -> Iterator[Step]:
    """`seq`'s steps, each model call made alone."""
    if seq.done:
        return
    logits = seq.prefill()
    while True:
        step = seq.sample(logits)
        yield step
        if seq.done:
            return
        logits = decode_one(seq.llm.model, step.token, seq.cache)


class Generation:
    """One `infer` call: iterate it for text pieces, then read `.result`.

    Pieces never split a UTF-8 character (a piece is emitted only once the decoded
    text no longer ends in a partial character), never show the start of a stop
    string that may still complete, and concatenate to `result.text`.
    """

    def __init__(self, llm: LoadedLLM, prompt: str, params: InferencingParams | None = None, *,
                 seed: int | None = None, stop: Sequence[str] = (), prompt_ids: Sequence[int] | None = None):
        self.llm = llm
        self.params = params or InferencingParams()
        validate_params(self.params)
        if isinstance(stop, str):
            stop = [stop]
        if any(not isinstance(s, str) or not s for s in stop):
            raise InvalidInputError("stop strings must be non-empty strings")
        self.stop = list(stop)
        self.prompt_ids = list(prompt_ids) if prompt_ids is not None else llm.encode(prompt)
        validate_prompt(llm, self.prompt_ids)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise InvalidInputError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed) if seed is not None else secrets.randbits(64)
        self.steps: list[Step] = []
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None
        self._text = ""  # decoded text of the tokens so far (up to a stop string)
        self._emitted = 0  # characters of _text already yielded
        self._done = False
        # perf_counter() when iteration began, when the first token was sampled (the prompt
        # prefilled) and when it ended: the CLI's --verbose tokens/s
        self.started_at = self.first_token_at = self.finished_at = None

    def __iter__(self) -> Iterator[str]:
        if self._done:
            return
        for step in decode_steps(self.decoding()):
            piece = self.accept(step)
            if piece:
                yield piece
            if self.finish_reason == "stop":
                break
        tail = self.finish()
        if tail:
            yield tail

    # `__iter__` in two halves, for a scheduler that samples the steps itself from
    # `decoding()`: `accept` each step, then `finish` once the decoding is done or a
    # stop string was found (finish_reason "stop").

    def decoding(self) -> Decoding:
        """This generation's loop, a step at a time, with its seeded generator."""
        if self.started_at is None:
            self.started_at = time.perf_counter()
        return Decoding(self.llm, self.prompt_ids, self.params, sampling.make_rng(self.seed))

    def accept(self, step: Step) -> str:
        """Take one sampled step; the text it releases ("" while some is held back)."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.steps.append(step)
        self.tokens.append(step.token)
        text = self.llm.decode(self.tokens)
        if step.token in self.llm.eos_token_ids:
            self.finish_reason = "eos"
        cut = self._find_stop(text)
        if cut is not None:
            self._text, self.finish_reason = text[:cut], "stop"
            return ""
        self._text = text
        if text.endswith("\ufffd"):  # a partial UTF-8 character: wait for its other bytes
            return ""
        hold = max((len(s) for s in self.stop), default=1) - 1  # chars a stop string could still claim
        safe = len(text) - hold
        if safe <= self._emitted:
            return ""
        piece, self._emitted = text[self._emitted : safe], safe
        return piece

    def finish(self) -> str:
        """End the generation: its finish reason, and the text still held back."""
        if self.finish_reason is None:
            self.finish_reason = "length" if len(self.tokens) >= self.params.max_tokens else "context"
        tail, self._emitted = self._text[self._emitted :], len(self._text)
        self.finished_at = time.perf_counter()
        self._done = True
        return tail

    def _find_stop(self, text: str) -> int | None:
        hits = [(i, s) for s in self.stop if (i := text.find(s)) >= 0]
        if not hits:
            return None
        i, s = min(hits)
        self.stop_sequence = s
        return i

    def run(self) -> InferencingResult:
        for _ in self:
            pass
        return self.result

    @property
    def result(self) -> InferencingResult:
        if not self._done:
            raise RuntimeError("the generation has not finished: iterate it or call run() first")
        usage = InferencingUsage(prompt_token_count=len(self.prompt_ids), generated_token_count=len(self.tokens))
        return InferencingResult(text=self._text, usage=usage, seed=self.seed, finish_reason=self.finish_reason)
