"""The command line: output, flags, and one clear line on stderr for every failure."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

import pytest

import refllm
from refllm.cli import COMMANDS
from refllm.types import InferencingParams
from tests.tiny_models import CHAT_TEMPLATE, make_tiny_llm


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


# ------------------------------------------------------------------ the front door (issue 17)

def squash(text: str) -> str:
    """argparse's help with its line wrapping undone."""
    return re.sub(r"\s+", " ", text)


def run_python(code: str, *args):
    """`refllm.cli.main(args)` in a fresh interpreter after `code` (to hide a package)."""
    script = f"import sys; {code}; from refllm.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)


def test_no_arguments_prints_usage_and_every_command():
    p = run()
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: refllm")
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s+\S", p.stdout, re.M), command
    assert "exit codes" in p.stdout


def test_help_says_which_exit_code_is_which():
    text = squash(run("--help").stdout)
    assert "2 invalid input: a bad flag or value, an unknown model name" in text
    assert "3 model not supported" in text and "4 runtime error" in text
    assert "130 interrupted" in text


def test_infer_help_gives_the_wit_defaults():
    p = run("infer", "--help")
    assert p.returncode == 0
    text = squash(p.stdout)
    for flag, default in [("-n N, --max-tokens N", "100"), ("--temperature T, --temp T", "0.8"), ("--top-k K", "40"),
                          ("--top-p P", "0.9"), ("--repeat-penalty R", "1.1"),
                          ("--repeat-penalty-last-n-token-count N, --repeat-last-n N", "64")]:
        assert re.search(re.escape(flag) + r" [^-]*\(default: " + re.escape(default) + r"\)", text), flag
    assert "T <= 0 means greedy" in text
    for short in ("-m MODEL", "-p PROMPT", "-f FILE", "-s SEED", "-c N", "-t N"):
        assert short in text


def test_short_flags_are_the_long_ones(root):
    long = run("infer", "--models-dir", str(root), "--model", "tiny", "--seed", "3", "--max-tokens", "6", "Hi")
    short = run("infer", "--models-dir", str(root), "-m", "tiny", "-s", "3", "-n", "6", "-p", "Hi")
    assert long.returncode == 0 and short.returncode == 0, short.stderr
    assert short.stdout == long.stdout


def test_prompt_from_a_file_or_stdin(root, tmp_path):
    expect = refllm.infer("tiny", "Hello there", InferencingParams(max_tokens=6), models_dir=root, seed=2).text + "\n"
    f = tmp_path / "prompt.txt"
    f.write_text("Hello there\n")  # an editor's last newline is not part of the prompt
    base = ("infer", "--models-dir", str(root), "-m", "tiny", "-s", "2", "-n", "6")
    assert run(*base, "-f", str(f)).stdout == expect
    assert run(*base, "-", stdin="Hello there\n").stdout == expect
    assert run(*base, "-f", "-", stdin="Hello there").stdout == expect
    # A prompt far beyond what a command line holds (40,000 words) is read whole: the
    # model (a context of 64) refuses it, naming its length.
    from tokenizers import Tokenizer

    f.write_text("word " * 40_000)
    n = len(Tokenizer.from_file(str(root / "llama" / "tiny" / "tokenizer.json")).encode("word " * 40_000).ids)
    p = run(*base, "-f", str(f))
    assert p.returncode == 2 and f"prompt is {n} tokens, longer than the model's context" in p.stderr
    # Not one prompt, or not UTF-8: invalid input, saying which.
    assert "give one prompt" in run(*base).stderr
    assert "give the prompt once" in run(*base, "-p", "a", "b").stderr
    f.write_bytes(b"fine\nbad \xff here\n")
    p = run(*base, "-f", str(f))
    assert p.returncode == 2 and f"{f}, line 2, column 5: not UTF-8 text (byte 0xff: invalid start byte)" in p.stderr


def test_embed_names_the_stdin_line_that_is_not_utf8(root):
    p = subprocess.run([sys.executable, "-m", "refllm.cli", "embed", "--models-dir", str(root), "--no-pull"],
                       input=b"first\nsecond \xc3\x28 text\n", capture_output=True, timeout=120)
    err = p.stderr.decode()
    assert p.returncode == 2
    assert "stdin, line 2, column 8: not UTF-8 text (byte 0xc3: invalid continuation byte)" in err
    assert len(err.strip().splitlines()) == 1


def test_stopped_line_says_why(root, tmp_path):
    make_tiny_llm(tmp_path, "tiny", context=256)  # room for the WIT's 100 tokens
    p = run("infer", "--models-dir", str(tmp_path), "-m", "tiny", "-s", "1", "Hi")
    assert p.returncode == 0 and p.stderr == "[stopped: max-tokens 100]\n"
    base = ("infer", "--models-dir", str(root), "-m", "tiny", "-s", "1")
    assert run(*base, "-n", "5", "Hi").stderr == "[stopped: max-tokens 5]\n"
    text = refllm.infer("tiny", "Hi", InferencingParams(max_tokens=8), models_dir=root, seed=1).text
    stop = text.strip()[-2:] or text[-2:]
    p = run(*base, "-n", "8", "--stop", stop, "Hi")
    assert p.stderr == f"[stopped: stop {stop!r}]\n" and stop not in p.stdout


def test_stopped_at_eos(tmp_path):
    # A copy of the tiny model whose EOS is the token it picks first, greedily.
    make_tiny_llm(tmp_path, "tiny")
    first = refllm.infer("tiny", "Hi", InferencingParams(max_tokens=1, temperature=0), models_dir=tmp_path)
    from refllm.generate import LoadedLLM

    token = LoadedLLM.from_dir(tmp_path / "llama" / "tiny").encode(first.text)
    make_tiny_llm(tmp_path, "tiny-eos", eos_token_id=token[-1])
    p = run("infer", "--models-dir", str(tmp_path), "-m", "tiny-eos", "--temperature", "0", "Hi")
    assert p.returncode == 0 and p.stderr == "[stopped: eos]\n", p.stderr


def test_ctx_size_bounds_prompt_and_answer(root):
    base = ("infer", "--models-dir", str(root), "-m", "tiny", "-s", "1", "--json")
    out = json.loads(run(*base, "-c", "12", "Hi").stdout)
    usage = out["usage"]
    assert out["finish-reason"] == "context"
    assert usage["prompt-token-count"] + usage["generated-token-count"] == 12
    p = run(*base[:-1], "--ctx-size", "12", "Hi")
    assert p.stderr == "[stopped: context 12]\n"
    p = run(*base, "-c", "4", "The quick brown fox jumps")
    assert p.returncode == 2 and "longer than the model's context of 4 tokens" in p.stderr
    p = run(*base, "-c", "65", "Hi")
    assert p.returncode == 2 and "--ctx-size 65 is more than the 64 tokens" in p.stderr


def test_verbose_reports_prompt_and_generation_rates(root):
    p = run("infer", "--models-dir", str(root), "-m", "tiny", "-s", "1", "-n", "9", "--verbose", "Hello there")
    assert p.returncode == 0, p.stderr
    n_prompt = refllm.infer("tiny", "Hello there", InferencingParams(max_tokens=0), models_dir=root).usage.prompt_token_count
    assert re.search(rf"^prompt: .* {n_prompt} tokens, +[\d.]+ tokens/s$", p.stderr, re.M), p.stderr
    assert re.search(r"^generation: .* 8 tokens after the first, +[\d.]+ tokens/s$", p.stderr, re.M), p.stderr
    assert re.search(r"^load: .*\(tiny, numpy, ", p.stderr, re.M)


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_sets_the_blas_threads(root, threads):
    # --verbose reads the thread count back from the BLAS (threadpoolctl), not from the flag.
    p = run("infer", "--models-dir", str(root), "-m", "tiny", "-n", "2", "-t", str(threads), "-v", "Hi")
    assert p.returncode == 0, p.stderr
    plural = "s" if threads > 1 else ""
    assert re.search(rf"^load: .*\b{threads} thread{plural}\)", p.stderr, re.M), p.stderr
    assert "thread" in p.stderr and not re.search(rf"\b(?!{threads}\b)\d+ threads?\)", p.stderr)


def test_exit_codes_are_the_documented_ones(root, tmp_path):
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("")
    p = run("infer", "--models-dir", str(a_file), "Hi")
    assert p.returncode == 2 and f"the models root '{a_file}' is not a directory" in p.stderr
    p = run("embed", "--models-dir", str(root), "--model", "tiny", "x")
    assert p.returncode == 3 and "is a text-generation model, not an embedding model" in p.stderr
    # --backend triton where torch cannot be imported: a runtime error, not exit 1
    p = run_python("sys.modules['torch'] = None", "infer", "--models-dir", str(root), "-m", "tiny",
                   "--backend", "triton", "Hi")
    assert p.returncode == 4 and "backend 'triton' needs torch" in p.stderr and "Traceback" not in p.stderr


def test_serve_without_its_extra_says_how_to_install_it():
    for args in (["serve", "--port", "8080"], ["serve", "--help"], ["serve"]):
        p = run_python("sys.modules['fastapi'] = None", *args)
        assert p.returncode == 4, p.stderr
        assert "pip install 'refllm[serve]'" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    listed = run_python("sys.modules['fastapi'] = None", "--help").stdout
    assert re.search(r"^\s+serve\s+serve the Spin", listed, re.M)
    assert re.search(r"^\s+serve\s+serve the Spin", run("--help").stdout, re.M)


def test_show_prints_config_files_sha256_and_template(root):
    p = run("show", "tiny", "--models-dir", str(root), "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    model_dir = root / "llama" / "tiny"
    files = sorted(f for f in model_dir.iterdir() if f.is_file())
    assert [f["path"] for f in info["files"]] == [f.name for f in files]
    for entry, f in zip(info["files"], files):
        assert entry["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
        assert entry["size_bytes"] == f.stat().st_size
    assert info["config"] == json.loads((model_dir / "config.json").read_text())
    assert info["chat_template"] == CHAT_TEMPLATE
    from safetensors.numpy import load_file

    assert info["parameters"] == sum(t.size for t in load_file(model_dir / "model.safetensors").values())
    text = run("show", "tiny", "--models-dir", str(root)).stdout
    assert "num_hidden_layers" in text and "<|im_start|>" in text and info["files"][0]["sha256"] in text
    p = run("show", "nope", "--models-dir", str(root))
    assert p.returncode == 2 and "no model directory found in registry for model 'nope'" in p.stderr


def test_rm_deletes_a_model(tmp_path):
    make_tiny_llm(tmp_path, "doomed")
    make_tiny_llm(tmp_path, "kept")
    p = run("rm", "doomed", "--models-dir", str(tmp_path))
    assert p.returncode == 0 and "deleted 'doomed'" in p.stdout
    names = [m["name"] for m in json.loads(run("models", "--models-dir", str(tmp_path), "--json").stdout)]
    assert names == ["kept"]
    assert sorted(x.name for x in (tmp_path / "llama").iterdir()) == ["kept"]  # nothing hidden left behind
    p = run("rm", "doomed", "--models-dir", str(tmp_path))
    assert p.returncode == 2 and "no model directory found in registry for model 'doomed'" in p.stderr
