"""The README, held to its word: its commands and snippets run as written.

Every line of the README's ```sh blocks and every ```python block is extracted. The
fast test parses each `refllm` command with refllm's own parser (so a flag the README
shows exists, with the value it shows). The slow tests run them, after the README's own
install steps (this environment), in a scratch directory, against a models root that
holds the default models (hard links to the test models, so `refllm rm` deletes only
links): each command exits 0 with no traceback, and the HTTP snippets run against a
`refllm serve` started the way the README starts it, on a free port instead of 8080.

A command that cannot run as written says so in NOT_RUN, with the reason: the install
steps and the test suite itself, and the commands that stand for the reader's own files.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from refllm.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
BIN = Path(sys.executable).parent  # where `pip install .` put the `refllm` script

# (pattern, reason): a README command matching the pattern is not run, for the reason.
NOT_RUN = [
    (r"^pip install (?!.*&&)", "an install step: this environment is the README's install"),
    (r"^bash \.ci/run|^pytest ", "the test suite itself"),
    (r"ckpt/|cases\.jsonl|model\.gguf|/shared/|--models-dir models/|--golden golden/",
     "stands for the reader's own checkpoint, suite or golden set"),
    (r"^refllm bench", "a benchmark: minutes, measured in bench/"),
    (r"llama_cpp|write_f32_gguf|127\.0\.0\.1:8000", "llama.cpp's server: tests/test_llamacpp_peer.py runs these "
     "steps (write_f32_gguf, llama_cpp.server with an F32 KV cache, conform --profile llama.cpp --skip embed) on a free port"),
]
# What a command reads on stdin when run here: `refllm chat` is a conversation.
STDIN = {r"^refllm chat": "What is RoPE?\n/exit\n"}
# Commands that take longer than a quick reply (the golden set, the conformance run).
LONG = r"^refllm (golden|conform)"


def code_blocks(lang: str) -> list[tuple[int, str]]:
    """(line number, text) of each ```lang block of the README."""
    lines = README.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == f"```{lang}":
            start = i + 1
            i += 1
            while lines[i].strip() != "```":
                i += 1
            blocks.append((start + 1, "\n".join(lines[start:i])))
        i += 1
    return blocks


def strip_comment(line: str) -> str:
    """The command without its trailing `# comment` (a # outside quotes)."""
    tokens = shlex.shlex(line, posix=True, punctuation_chars=False)
    tokens.whitespace_split = True
    tokens.commenters = "#"
    try:
        list(tokens)
    except ValueError:
        return line.strip()
    # shlex cannot say where the comment began: find the first '#' that follows
    # whitespace and is outside quotes.
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.strip()


def shell_commands() -> list[tuple[int, str]]:
    """(line number, command) of each shell command; a line ending in a backslash
    continues on the next, as the shell reads it."""
    out, pending = [], None
    for start, block in code_blocks("sh"):
        for k, line in enumerate(block.splitlines()):
            if pending is not None:
                first, text = pending
                line, n = text + " " + line.strip(), first
            else:
                n = start + k
            if line.rstrip().endswith("\\"):
                pending = (n, line.rstrip()[:-1].rstrip())
                continue
            pending = None
            command = strip_comment(line)
            if command:
                out.append((n, command))
    return out


def not_run_reason(command: str) -> str | None:
    for pattern, reason in NOT_RUN:
        if re.search(pattern, command):
            return reason
    return None


def refllm_argvs(command: str) -> list[list[str]]:
    """The refllm invocations in a shell command line (`a | refllm ...`, `x && refllm ...`)."""
    argvs = []
    for part in re.split(r"\s*(?:&&|\|\|?|;)\s*", command.rstrip("& ")):
        if not part.startswith("refllm "):  # (a split inside another program's quoted text)
            continue
        words = shlex.split(part)
        if words and words[0] == "refllm":
            argvs.append(words[1:])
    return argvs


COMMANDS = shell_commands()


def test_the_readme_has_its_commands_and_snippets():
    assert len(COMMANDS) >= 10 and len(code_blocks("python")) >= 2
    assert any(c.startswith("refllm serve --port 8080 --token secret") for _, c in COMMANDS)


@pytest.mark.parametrize("line, command", COMMANDS, ids=[f"L{n}" for n, _ in COMMANDS])
def test_every_refllm_command_parses(line, command):
    for argv in refllm_argvs(command):
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"README.md:{line}: `refllm {shlex.join(argv)}` does not parse (exit {e.code})")


# ------------------------------------------------------------------------------ running them

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def link_tree(src: Path, dst: Path) -> None:
    """A copy of `src` made of hard links (a real copy across file systems)."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link, ignore=shutil.ignore_patterns(".*"))


@pytest.fixture(scope="module")
def readme_env(models_root, tmp_path_factory):
    """A scratch directory, and the environment the README's reader has: `refllm` on the
    PATH and the default models in the models root."""
    work = tmp_path_factory.mktemp("readme")
    root = work / "models"
    root.mkdir()
    link_tree(models_root / "llama", root / "llama")
    link_tree(models_root / "all-minilm-l6-v2", root / "all-minilm-l6-v2")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", REFLLM_MODELS_DIR=str(root),
               HF_HUB_OFFLINE="")
    env.pop("HF_HUB_OFFLINE")
    return work, env


def run_shell(command: str, cwd: Path, env: dict, timeout: float, stdin: str | None = None):
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                          input=stdin, timeout=timeout)


RUNNABLE = [(n, c) for n, c in COMMANDS if not_run_reason(c) is None and not c.startswith("refllm serve ")]


def start_server(command: str, cwd: Path, env: dict) -> tuple[subprocess.Popen, int]:
    """Run a README `refllm serve --port 8080 ...` line on a free port; wait until it answers."""
    port = free_port()
    proc = subprocess.Popen(["bash", "-c", "exec " + command.rstrip("& ").replace("8080", str(port))], cwd=cwd,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"`{command}` did not start: {proc.stderr.read()[-3000:]}")
            time.sleep(0.5)


def server_for(line: int) -> str | None:
    """The `refllm serve ... &` line a README command at `line` talks to: the nearest one
    above it in its block."""
    above = [(n, c) for n, c in COMMANDS if n < line and line - n < 10 and c.startswith("refllm serve ")]
    return above[-1][1] if above else None


@pytest.mark.slow
@pytest.mark.parametrize("line, command", RUNNABLE, ids=[f"L{n}" for n, _ in RUNNABLE])
def test_readme_command_runs(readme_env, line, command, tmp_path):
    work, env = readme_env
    if command.startswith("pip install . && "):  # the install is this environment
        command = command[len("pip install . && "):]
    if re.match(r"^refllm rm ", command):  # deletes a model: in a root of its own
        root = tmp_path / "models"
        link_tree(Path(env["REFLLM_MODELS_DIR"]), root)
        env = dict(env, REFLLM_MODELS_DIR=str(root))
    stdin = next((text for pattern, text in STDIN.items() if re.search(pattern, command)), "")
    proc = None
    if "127.0.0.1:8080" in command:  # talks to the server the README started just above
        proc, port = start_server(server_for(line), work, env)
        command = command.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    try:
        p = run_shell(command, work, env, timeout=1500 if re.search(LONG, command) else 600, stdin=stdin)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    assert p.returncode == 0, f"README.md:{line}: `{command}` exited {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr
    assert p.stdout.strip() or "[stopped" in p.stderr, f"README.md:{line}: `{command}` printed nothing"


@pytest.fixture(scope="module")
def server(readme_env):
    """`refllm serve --port 8080 --token secret --quota` as the README starts it, on a free port."""
    work, env = readme_env
    proc, port = start_server(next(c for _, c in COMMANDS if c.startswith("refllm serve --port 8080 --token secret")),
                              work, env)
    yield port
    proc.terminate()
    proc.wait(timeout=30)


# A snippet that is a fragment (it names the reader's model directory and token ids) runs
# after this prelude, which gives those names values from the default models.
PRELUDE = """
import numpy as np, os
from pathlib import Path
from tokenizers import Tokenizer
root = Path(os.environ["REFLLM_MODELS_DIR"])
model_dir, minilm_dir = root / "llama" / "smollm2-135m-instruct", root / "all-minilm-l6-v2"
ids = prompt_ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode("The capital of France is").ids
token = ids[-1]
mask = np.ones((1, len(ids)), dtype=np.int64)
ids_bert = np.array([Tokenizer.from_file(str(minilm_dir / "tokenizer.json")).encode("hello").ids])
"""

SNIPPETS = code_blocks("python")


@pytest.mark.slow
@pytest.mark.parametrize("line, code", SNIPPETS, ids=[f"L{n}" for n, _ in SNIPPETS])
def test_readme_python_snippet_runs(readme_env, request, line, code):
    work, env = readme_env
    if "127.0.0.1:8080" in code:
        port = request.getfixturevalue("server")
        code = code.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    if "from_pretrained(model_dir" in code or "(ids, mask)" in code:  # a fragment: give its names values
        code = PRELUDE + code.replace("(ids, mask)", "(ids_bert, np.ones_like(ids_bert))")
    p = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"README.md:{line}: the snippet failed\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    if "e.usage.prompt_token_count)" in code:  # the snippet's own comment: 384, 6
        assert p.stdout.rstrip().endswith("384 6"), p.stdout[-500:]
