"""Golden sets (refllm.golden): the format, the header's sha256s, reproducibility, and
that the float64 reference's greedy tokens are the ones refllm's float32 infer makes.

The quick subset of the built-in set is generated once into refllm's golden cache
(about a minute the first time) and reused by later runs and by tests/test_conform.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math

import numpy as np
import pytest

import refllm
from refllm import api, golden
from refllm.golden import QUICK, builtin_golden_dir, load_golden, params_from_json, write_golden

WIT_VARIANTS = {"invalid-input", "model-not-supported", "runtime-error"}


@pytest.fixture(scope="module")
def quick(models_root):
    return load_golden(builtin_golden_dir(models_root, QUICK))


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_header(quick, models_root):
    h = quick.header
    assert (h["format"], h["format_version"]) == ("refllm-golden", 1)
    assert h["refllm_version"] == refllm.__version__ and h["spec_version"] == refllm.SPEC_VERSION
    assert h["suite"] == "builtin" and h["precision"] == "float64" and h["backend"] == "numpy" and h["top_n"] == 20
    assert h["cases"] == list(QUICK) == [c["name"] for c in quick.cases]
    assert set(h["models"]) == {golden.LLM, golden.EMBEDDER}
    llm = h["models"][golden.LLM]
    assert llm["kind"] == "llama" and llm["eos_token_ids"] == [2] and llm["vocab_size"] == 49152
    for name, entry in h["models"].items():  # every file of the model directory, with its sha256
        root = models_root / "llama" / name if entry["kind"] == "llama" else models_root / name
        on_disk = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        assert sorted(entry["files"]) == on_disk
        for rel, sha in entry["files"].items():
            assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == sha, rel
        assert (quick.dir / entry["tokenizer"]).read_bytes() == (root / "tokenizer.json").read_bytes()
    assert (quick.dir / "FORMAT.md").read_bytes() == golden.FORMAT_DOC.read_bytes()  # the package's spec
    assert h["blas_threads"] == 1
    for entry in h["models"].values():  # each model named by the sha256 of its files' sha256sum lines
        assert entry["format"] == "safetensors" and entry["sha256"] == golden.manifest_sha256(entry["files"])


def test_strict_json_lines(quick):
    lines = (quick.dir / "golden.jsonl").read_text(encoding="utf-8").rstrip("\n").split("\n")
    assert len(lines) == 1 + len(QUICK)
    for line in lines:  # readable by any JSON parser: no NaN/Infinity literals
        _strict(line)


def test_generate_cases(quick):
    cases = [c for c in quick.cases if c["kind"] == "generate"]
    assert {c["name"] for c in cases} >= {"greedy", "wit-defaults", "chat-eos", "max-tokens-0"}
    for c in cases:
        steps, params = c["steps"], params_from_json(c["params"])
        assert c["tokens"] == [s["token"] for s in steps]
        assert c["usage"] == {"prompt_token_count": len(c["prompt_ids"]), "generated_token_count": len(steps)}
        assert c["sampling"] == (params.temperature > 0) == (c["seed"] is not None)
        assert c["spin"]["text"] == c["prompt"] + c["text"]
        assert c["spin"]["usage"]["prompt_token_count"] == len(c["prompt_ids"]) + len(steps)
        ends = [s["text_end"] for s in steps]
        assert ends == sorted(ends) and all(e <= len(c["text"]) for e in ends)
        for s in steps:
            top = s["top"]
            assert len(top) == 20 and [z for _, z in top] == sorted((z for _, z in top), reverse=True)
            assert s["logprob"] <= 0 and s["logprob_penalized"] <= 0
            assert dict(top).get(s["token"], s["logit"]) == s["logit"]
            if not c["sampling"] and params.repeat_penalty == 1.0:
                assert s["token"] == top[0][0] and s["margin"] > 0  # the argmax, unpenalised
            if c["sampling"]:
                lo, hi = s["u_interval"]
                assert 0 <= s["u"] < 1 and lo <= s["u"] < hi and s["margin"] >= 0
            else:
                assert s["u"] is None and "u_interval" not in s
                assert s["token"] in [i for i, _ in top]
        assert c["finish_reason"] in ("eos", "length", "context")
    eos = quick.case("chat-eos")
    assert eos["finish_reason"] == "eos" and eos["steps"][-1]["eos"] and eos["tokens"][-1] == 2
    assert eos["text"] == " Paris." and eos["usage"]["generated_token_count"] == 3
    zero = quick.case("max-tokens-0")
    assert zero["steps"] == [] and zero["text"] == "" and zero["usage"]["generated_token_count"] == 0


def test_sampled_draws_are_pcg64(quick):
    c = quick.case("wit-defaults")
    rng = np.random.Generator(np.random.PCG64(c["seed"]))
    assert [s["u"] for s in c["steps"]] == [rng.random() for _ in c["steps"]]


def test_embed_and_error_cases(quick):
    batch = quick.case("embed-batch")
    assert len(batch["embeddings"]) == len(batch["texts"]) == len(batch["spin"]["embeddings"])
    for v in batch["embeddings"] + batch["spin"]["embeddings"]:
        assert len(v) == 384 and abs(np.linalg.norm(v) - 1) < 1e-12
    assert batch["usage"]["prompt_token_count"] == sum(len(t) for t in batch["token_ids"])
    assert batch["spin"]["usage"]["prompt_token_count"] == max(len(t) for t in batch["token_ids"])
    assert batch["token_ids"][batch["texts"].index("")] == [101, 102]  # [CLS] [SEP]
    errors = [c for c in quick.cases if c["kind"] == "error"]
    assert len(errors) == 14
    for c in errors:
        assert c["error"]["variant"] in WIT_VARIANTS and c["error"]["message"]
    assert quick.case("err-temperature-nan")["params"]["temperature"] == "NaN"
    assert math.isnan(params_from_json(quick.case("err-temperature-nan")["params"]).temperature)
    assert quick.case("err-infer-embedding-model")["error"]["variant"] == "model-not-supported"
    assert quick.case("err-unknown-model")["error"]["message"] == \
        "no model directory found in registry for model 'no-such-model'"


def test_reproducible(tmp_path, models_root, quick):
    names = ["chat-eos", "embed-single", "err-top-k-zero"]
    a = write_golden(tmp_path / "a", models_root, cases=names)
    b = write_golden(tmp_path / "b", models_root, cases=names)
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a" / "FORMAT.md").read_bytes() == (tmp_path / "b" / "FORMAT.md").read_bytes()
    # and the same cases as the cached quick set, written by another process: every token,
    # text and count the same, the float64 numbers to within an ulp or so (BLAS threads)
    new = [json.loads(ln) for ln in a.read_text(encoding="utf-8").rstrip("\n").split("\n")[1:]]
    for case in new:
        _assert_close(case, quick.case(case["name"]), case["name"])


def _assert_close(a, b, path):
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), path
    else:
        assert a == b, path


def test_greedy_steps_equal_float32_infer(quick, models_root):
    for c in quick.cases:
        if c["kind"] != "generate" or c["sampling"] or not c["steps"]:
            continue
        gen = api.infer_stream(c["model"], c["prompt"], params_from_json(c["params"]), models_dir=models_root)
        result = gen.run()  # the default: numpy, float32
        assert gen.tokens == c["tokens"], c["name"]
        assert result.text == c["text"]
        assert result.usage.prompt_token_count == c["usage"]["prompt_token_count"]
        assert result.usage.generated_token_count == c["usage"]["generated_token_count"]


def test_load_golden_refuses_other_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_golden(tmp_path)
    (tmp_path / "golden.jsonl").write_text('{"format": "something-else"}\n')
    with pytest.raises(ValueError):
        load_golden(tmp_path)
    (tmp_path / "golden.jsonl").write_text('{"format": "refllm-golden", "format_version": 99}\n')
    with pytest.raises(ValueError, match="version"):
        load_golden(tmp_path)


def test_select_and_cli_list(capsys):
    with pytest.raises(ValueError, match="unknown golden case"):
        golden.select(["no-such-case"])
    assert [c.name for c in golden.select(["greedy", "chat-eos"])] == ["greedy", "chat-eos"]
    from refllm import oracle_cli

    parser = argparse.ArgumentParser()
    oracle_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["golden", "--out", "unused", "--list"])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert all(c.name in out for c in golden.BUILTIN)
