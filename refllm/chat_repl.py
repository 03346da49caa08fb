"""`refllm chat`: an interactive conversation under the model's chat template.

    >>> What is RoPE?
    Rotary position embeddings rotate each query and key ...
    >>> And why rotate?
    ...

Each turn appends the user's line to the messages, renders the whole conversation with
the model's chat template (`LoadedLLM.apply_chat_template`, with the generation prompt),
streams the assistant's answer, and appends it to the messages: the model sees every
earlier turn, as ollama's and llama.cpp's chat modes do. The conversation is prefilled
from the start each turn (no KV cache is kept between turns: simple, and what the HTTP
chat route does too).

Commands: `/exit` (or Ctrl-D) leaves, `/clear` forgets the conversation, `/help`.
Ctrl-C stops the answer being generated (what was generated stays in the conversation).
A turn that fails (the conversation grew past the context, say) is dropped with one line
on stderr, and the chat goes on. An answer cut short by max-tokens or by the context says
so on stderr ("[stopped: max-tokens 100]"); one that ends at the end-of-sequence token
does not.

With `seed`, turn i (from 0) samples with seed + i, so a replayed session answers alike.
"""

from __future__ import annotations

import sys
from typing import Sequence

from .errors import LLMError
from .generate import Generation, LoadedLLM
from .types import InferencingParams

PROMPT = ">>> "
HELP = "/exit or Ctrl-D: leave   /clear: forget the conversation   /help: this   Ctrl-C: stop an answer"


def _read_line(prompt: str, stdin, stdout) -> str:
    """One line from the user; EOFError at the end of input (Ctrl-D)."""
    if stdin is sys.stdin and stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # pragma: no cover - not on every platform
            pass
        return input(prompt)
    stdout.write(prompt)
    stdout.flush()
    line = stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def run_chat(llm: LoadedLLM, params: InferencingParams, *, system: str | None = None, seed: int | None = None,
             stop: Sequence[str] = (), verbose: bool = False, stdin=None, stdout=None, stderr=None) -> int:
    """The read-answer loop; returns the exit code (0)."""
    from .cli import stop_reason, timings

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    turn = 0
    print(f"refllm chat with {llm.name} ({HELP})", file=stderr)
    while True:
        try:
            line = _read_line(PROMPT, stdin, stdout)
        except EOFError:
            stdout.write("\n")
            return 0
        except KeyboardInterrupt:
            stdout.write("\n")
            print("(use /exit or Ctrl-D to leave)", file=stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return 0
        if text == "/clear":
            messages = list(start)
            print("(conversation cleared)", file=stderr)
            continue
        if text in ("/help", "/?"):
            print(HELP, file=stderr)
            continue
        messages.append({"role": "user", "content": line})
        try:
            prompt = llm.apply_chat_template(messages)  # tokenized without adding specials (SPEC 2.1)
            gen = Generation(llm, prompt, params, seed=None if seed is None else (seed + turn) % 2**64, stop=stop)
        except LLMError as e:
            messages.pop()
            print(f"refllm: error: {e}" + (" (/clear starts over)" if len(messages) > len(start) else ""),
                  file=stderr)
            continue
        turn += 1
        answer = []
        try:
            for piece in gen:
                answer.append(piece)
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            stdout.write("\n")
            print("[stopped: interrupted]", file=stderr)
        else:
            stdout.write("\n")
            if gen.finish_reason in ("length", "context"):
                print(f"[stopped: {stop_reason(gen)}]", file=stderr)
            if verbose:
                print(timings(gen), file=stderr)
        stdout.flush()
        messages.append({"role": "assistant", "content": "".join(answer)})
