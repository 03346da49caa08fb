"""Chat templates: the model's own Jinja template, rendered in a sandbox.

Hugging Face tokenizers carry a `chat_template` (in tokenizer_config.json) that turns
a list of `{"role", "content"}` messages into the prompt the model was tuned on. We
render it as transformers' `apply_chat_template` does
(`transformers/utils/chat_template_utils.py`, `_cached_compile_jinja_template`):
jinja2's immutable sandbox, `trim_blocks` and `lstrip_blocks`, the loop controls, the
special-token strings as variables, and the same helpers:

    raise_exception(message)   the template rejects the conversation (invalid input here)
    strftime_now(format)       the local time now, formatted (Llama 3.1's "Today Date")
    x | tojson                 json.dumps without HTML escaping (jinja2's own escapes <, >, &, ')

The rendered text is a `ChatText`: the template has written its own BOS (Llama 2/3,
Mistral write `{{ bos_token }}`), so it is tokenized without adding special tokens
(SPEC.md section 2.1, as `apply_chat_template(tokenize=True)`).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from .errors import InvalidInputError, LLMRuntimeError


class ChatText(str):
    """Text rendered by a chat template: tokenized WITHOUT adding special tokens."""


class TemplateError(Exception):
    pass


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise LLMRuntimeError(f"the model's chat template does not compile: {e}") from e


def validate_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidInputError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidInputError(f"messages[{i}] must be an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: keep the text ones
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidInputError(f"messages[{i}].content[{j}]: only text parts are supported")
                parts.append(part["text"])
            content = "".join(parts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise InvalidInputError(f"messages[{i}].content must be a string")
        out.append({**m, "content": content})
    return out


def render_chat(template: str | None, messages, add_generation_prompt: bool = True, **special_tokens) -> ChatText:
    """The prompt text for `messages` under the model's chat template."""
    if not template:
        raise InvalidInputError("this model has no chat template")
    messages = validate_messages(messages)
    try:
        return ChatText(_compile(template).render(messages=messages, tools=None, documents=None,  # as transformers
                                                  add_generation_prompt=add_generation_prompt, **special_tokens))
    except TemplateError as e:
        raise InvalidInputError(f"chat template: {e}") from e
    except Exception as e:  # a template bug is the model's problem, not the caller's
        raise LLMRuntimeError(f"the model's chat template failed: {e}") from e
