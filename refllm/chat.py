"""Chat templates: the model's own Jinja template, rendered in a sandbox.

Hugging Face tokenizers carry a `chat_template` (in tokenizer_config.json) that turns
a list of `{"role", "content"}` messages into the prompt the model was tuned on. We
render it as transformers' `apply_chat_template` does: jinja2's immutable sandbox,
`trim_blocks` and `lstrip_blocks`, a `raise_exception` helper, and the special-token
strings as variables.
"""

from __future__ import annotations

from functools import lru_cache

from .errors import InvalidInputError, LLMRuntimeError


class TemplateError(Exception):
    pass


def _raise_exception(message):
    raise TemplateError(message)


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
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


def render_chat(template: str | None, messages, add_generation_prompt: bool = True, **special_tokens) -> str:
    """The prompt text for `messages` under the model's chat template."""
    if not template:
        raise InvalidInputError("this model has no chat template")
    messages = validate_messages(messages)
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens)
    except TemplateError as e:
        raise InvalidInputError(f"chat template: {e}") from e
    except Exception as e:  # a template bug is the model's problem, not the caller's
        raise LLMRuntimeError(f"the model's chat template failed: {e}") from e
