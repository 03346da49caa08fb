"""The command line: output, flags, and one clear line on stderr for every failure."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import refllm
from refllm.types import InferencingParams
from tests.tiny_models import make_tiny_llm


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_tiny_llm(root, "tiny")
    broken = root / "llama" / "broken"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{\"vocab_size\": ")
    return root


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "refllm.cli", *args], capture_output=True, text=True, input=stdin, timeout=120)


def test_infer_json_is_the_wit_result(root):
    p = run("infer", "--models-dir", str(root), "--model", "tiny", "--seed", "5", "--max-tokens", "7",
            "--temperature", "0.9", "--top-k", "30", "--top-p", "0.8", "--repeat-penalty", "1.2",
            "--repeat-penalty-last-n-token-count", "16", "--json", "Hello there")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    expect = refllm.infer("tiny", "Hello there", InferencingParams(7, 1.2, 16, 0.9, 30, 0.8), models_dir=root, seed=5)
    assert out["text"] == expect.text and out["seed"] == 5
    assert out["usage"] == {"prompt-token-count": expect.usage.prompt_token_count,
                            "generated-token-count": expect.usage.generated_token_count}


def test_infer_streams_the_same_text(root):
    p = run("infer", "--models-dir", str(root), "--model", "tiny", "--seed", "5", "--max-tokens", "9", "Hello")
    expect = refllm.infer("tiny", "Hello", InferencingParams(max_tokens=9), models_dir=root, seed=5)
    assert p.returncode == 0 and p.stdout == expect.text + "\n"


def test_chat_flag_applies_the_template(root):
    p = run("infer", "--models-dir", str(root), "--model", "tiny", "--seed", "1", "--max-tokens", "3", "--chat", "--json", "Hi")
    assert json.loads(p.stdout)["usage"]["prompt-token-count"] > 10  # template tokens around "Hi"


@pytest.mark.parametrize("args, needle, code", [
    (["infer", "--model", "nope", "Hi"], "no model directory found in registry for model 'nope'", 2),
    (["infer", "--model", "tiny", "--temperature", "nan", "Hi"], "temperature", 2),
    (["infer", "--model", "tiny", "--top-k", "0", "Hi"], "top_k", 2),
    (["infer", "--model", "tiny", "--top-k", "many", "Hi"], "--top-k", 2),
    (["infer", "--model", "tiny", "--max-tokens", "-3", "Hi"], "--max-tokens", 2),
    (["infer", "--model", "broken", "Hi"], "config.json", 4),
    (["embed", "--model", "nope", "x"], "no model directory found", 2),
])
def test_failures_are_one_line(root, args, needle, code):
    p = run(*args[:1], "--models-dir", str(root), "--no-pull", *args[1:]) if args[0] in ("infer", "embed") else run(*args)
    assert p.returncode == code
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr


def test_models_lists_what_is_on_disk(root):
    p = run("models", "--models-dir", str(root), "--json")
    names = {m["name"]: m for m in json.loads(p.stdout)}
    assert names["tiny"]["kind"] == "llama" and names["tiny"]["size_bytes"] > 0


def test_pull_unknown_model_is_one_line(root):
    p = run("pull", "no-such-model", "--models-dir", str(root))
    assert p.returncode == 2 and "no-such-model" in p.stderr and "Traceback" not in p.stderr


def test_a_reported_64_bit_seed_replays(root):
    # An unseeded run reports a random 64-bit seed; --seed must take it back.
    first = json.loads(run("infer", "--models-dir", str(root), "--model", "tiny", "--max-tokens", "6", "--json", "Hi").stdout)
    again = run("infer", "--models-dir", str(root), "--model", "tiny", "--max-tokens", "6", "--json",
                "--seed", str(first["seed"]), "Hi")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["text"] == first["text"]
    too_big = run("infer", "--models-dir", str(root), "--no-pull", "--model", "tiny", "--seed", str(2**64), "Hi")
    assert too_big.returncode == 2 and "--seed" in too_big.stderr
