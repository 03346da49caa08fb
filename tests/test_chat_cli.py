"""`refllm chat`: the conversation kept under the model's chat template, and the
interactive session a person has in a terminal (a pseudo-terminal here)."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import time

import jinja2
import pytest

import refllm
from refllm.chat_repl import run_chat
from refllm.types import InferencingParams
from tests.tiny_models import CHAT_TEMPLATE, make_tiny_llm

PARAMS = InferencingParams(max_tokens=6)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_tiny_llm(root, "tiny", context=256)
    return root


def rendered(messages) -> str:
    """The tiny model's template rendered by jinja2 alone (not by refllm.chat)."""
    return jinja2.Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)


def expected_answer(root, messages, seed) -> str:
    """What the model answers to `messages`: infer on the rendered text, which adds no BOS
    of its own to chat text (SPEC 2.1), so it is given the ids directly."""
    from refllm.generate import Generation

    llm = refllm.api.load_llm("tiny", models_dir=root)
    ids = llm.tokenizer.encode(rendered(messages), add_special_tokens=False).ids
    return Generation(llm, "", PARAMS, seed=seed, prompt_ids=ids).run().text


def chat(root, lines: str, **kwargs):
    out, err = io.StringIO(), io.StringIO()
    llm = refllm.api.load_llm("tiny", models_dir=root)
    code = run_chat(llm, PARAMS, stdin=io.StringIO(lines), stdout=out, stderr=err, **kwargs)
    return code, out.getvalue(), err.getvalue()


def test_each_turn_sees_the_whole_conversation(root):
    code, out, err = chat(root, "Hello there\nWhy is the sky blue?\n", system="Be brief.", seed=7)
    assert code == 0
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    a1 = expected_answer(root, conversation, seed=7)
    conversation += [{"role": "assistant", "content": a1}, {"role": "user", "content": "Why is the sky blue?"}]
    a2 = expected_answer(root, conversation, seed=8)  # turn i samples with seed + i
    assert out == f">>> {a1}\n>>> {a2}\n>>> \n"  # the last prompt meets the end of input
    assert err.count("[stopped: max-tokens 6]") == 2


def test_clear_forgets_and_exit_leaves(root):
    code, out, err = chat(root, "Hello there\n/clear\nWhy is the sky blue?\n/exit\nnot read\n", seed=7)
    assert code == 0 and "(conversation cleared)" in err
    a1 = expected_answer(root, [{"role": "user", "content": "Hello there"}], seed=7)
    a2 = expected_answer(root, [{"role": "user", "content": "Why is the sky blue?"}], seed=8)
    assert out == f">>> {a1}\n>>> >>> {a2}\n>>> "


def test_a_turn_past_the_context_is_dropped_and_the_chat_goes_on(root):
    long = "word " * 300  # more than the 256 tokens of context
    code, out, err = chat(root, f"{long}\nHello there\n", seed=3)
    assert code == 0
    assert re.search(r"refllm: error: invalid-input: prompt is \d+ tokens, longer than the model's context", err)
    assert out == f">>> >>> {expected_answer(root, [{'role': 'user', 'content': 'Hello there'}], seed=3)}\n>>> \n"


class Terminal:
    """`refllm chat` on a pseudo-terminal, read and typed into as a person would."""

    def __init__(self, *args):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "refllm.cli", "chat", *args], stdin=slave, stdout=slave,
                                     stderr=slave, close_fds=True, start_new_session=True,
                                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))  # Ctrl-C is SIGINT
        os.close(slave)
        self.screen = ""

    def read_until(self, pattern: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.screen):
            left = deadline - time.monotonic()
            assert left > 0, f"waited for {pattern!r}; the screen shows:\n{self.screen}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    self.screen += os.read(self.master, 4096).decode("utf-8", "replace")
                except OSError:  # the child closed the terminal
                    break
        return self.screen

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=60)
        finally:
            os.close(self.master)


def test_an_interactive_session_on_a_terminal(root):
    t = Terminal("--models-dir", str(root), "-m", "tiny", "-n", "6", "-s", "7")
    try:
        t.read_until(r">>> $")
        t.type("Hello there\r")
        t.read_until(r"\[stopped: max-tokens 6\]\r\n>>> $")
        t.type("\x03")  # Ctrl-C at the prompt: a hint, not an exit
        t.read_until(r"use /exit or Ctrl-D to leave\)\r\n>>> $")
        t.type("\x04")  # Ctrl-D: leave
        assert t.close() == 0
    finally:
        if t.proc.poll() is None:
            os.killpg(t.proc.pid, signal.SIGKILL)
    first = t.screen.split("Hello there\r\n", 1)[1].split("[stopped")[0]
    expect = expected_answer(root, [{"role": "user", "content": "Hello there"}], seed=7)
    assert first.replace("\r\n", "\n") == expect + "\n"  # the terminal turns \n into \r\n
