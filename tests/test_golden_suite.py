"""Golden sets for a user's model and suite (refllm.golden with --model / --suite):

* the suite format: what a line may hold, the errors a bad line gets (naming it), and
  that suite.schema.json accepts and refuses the same lines as the parser;
* on a tiny random Llama saved by transformers (sharded safetensors) and on an F32 GGUF
  written from it with the `gguf` package, the golden set's greedy tokens are
  transformers' `generate(do_sample=False)` tokens (transformers in float64, as
  tests/llama_util.py sets it up), the repeat-penalty case included; sampled cases draw
  PCG64's numbers; embedding and error cases are recorded;
* the header names each model by sha256 (the GGUF file's; a directory's manifest);
* `refllm conform` replays the user's set against `refllm serve` on that model: exit 0;
* the CLI's errors.

The tests that write whole golden sets (about a minute together, shared module
fixtures) are marked slow.

The Ray fan-out's byte-identity test is tests/test_golden_ray.py.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refllm import cli
from refllm.golden import SUITE_SCHEMA, Models, SuiteError, load_golden, load_suite, manifest_sha256
from tests.tiny_models import CHAT_TEMPLATE, make_tokenizer

pytestmark = pytest.mark.usefixtures("one_blas_thread")

# ----------------------------------------------------------------------------- the suite format

GOOD = [
    {"name": "greedy", "prompt": "The quick brown fox", "params": {"max_tokens": 6, "temperature": 0}},
    {"name": "sampled", "prompt": "Why is the sky", "params": {"max_tokens": 4}, "seeds": [1, 2]},
    {"name": "one-seed", "prompt": "Why", "params": {"max_tokens": 3, "temperature": 1.0, "top_k": 5}, "seed": 9},
    {"name": "chat", "messages": [{"role": "user", "content": "Hi"}], "params": {"max_tokens": 4, "temperature": 0}},
    {"name": "embed", "input": ["a text", "another, longer text"]},
    {"name": "embed-one", "input": "just one"},
    {"name": "nan", "prompt": "x", "params": {"temperature": "NaN"}, "error": "invalid-input"},
    {"name": "top-k-0", "prompt": "x", "params": {"top_k": 0}, "error": "invalid-input"},
    {"name": "empty-input", "input": [], "error": "invalid-input"},
    {"name": "no-model", "prompt": "x", "model": "no-such-model", "error": "invalid-input"},
]

BAD = [  # (line, what the error message says)
    ({"prompt": "x", "params": {"temperature": 0}}, "name"),
    ({"name": "a", "params": {"temperature": 0}}, "exactly one of"),
    ({"name": "a", "prompt": "x", "input": ["y"], "params": {"temperature": 0}}, "exactly one of"),
    ({"name": "a", "prompt": "x"}, "give \"seed\" or \"seeds\""),  # the WIT's default temperature samples
    ({"name": "a", "prompt": "x", "params": {"temperature": 0}, "seed": 1}, "greedy"),
    ({"name": "a", "prompt": "x", "params": {"max_token": 3, "temperature": 0}}, "unknown param"),
    ({"name": "a", "prompt": "x", "params": {"temperature": 0}, "sede": 1}, "unknown key"),
    ({"name": "a", "prompt": "x", "params": {"temperature": "NaN"}, "seed": 1}, "error cases only"),
    ({"name": "a", "prompt": "x", "params": {"max_tokens": "3", "temperature": 0}}, "integer"),
    ({"name": "a", "prompt": "x", "params": {"temperature": 0.5}, "seeds": [1, -1]}, "seeds are integers"),
    ({"name": "a", "prompt": "x", "params": {"temperature": 0.5}, "seed": 1, "seeds": [2]}, "not both"),
    ({"name": "a", "prompt": "x", "error": "bad-variant"}, "variant"),
    ({"name": "a", "prompt": "x", "params": {"temperature": 0}, "model": "m"}, "error cases only"),
    ({"name": "a", "input": ["t"], "params": {"temperature": 0}}, "no \"params\""),
    ({"name": "a", "input": []}, "error case"),
    ({"name": "a", "messages": [{"role": "user"}], "params": {"temperature": 0}}, "messages"),
    ({"name": "a", "prompt": "x", "params": {"temperature": 0.5}, "seeds": [3, 3]}, "listed twice"),
]


def _write_suite(path: Path, lines) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def test_suite_lines_parse(tmp_path):
    specs = load_suite(_write_suite(tmp_path / "s.jsonl", GOOD), "m", "e")
    names = [s.name for s in specs]
    assert names == ["greedy", "sampled-seed-1", "sampled-seed-2", "one-seed", "chat", "embed", "embed-one", "nan",
                     "top-k-0", "empty-input", "no-model"]
    by = {s.name: s for s in specs}
    assert by["greedy"].kind == "generate" and by["greedy"].seed is None and by["greedy"].params.max_tokens == 6
    assert by["greedy"].params.repeat_penalty == 1.1 and by["greedy"].params.top_k == 40  # the WIT's defaults
    assert by["sampled-seed-2"].seed == 2 and by["sampled-seed-2"].params.temperature == 0.8
    assert by["chat"].messages == ({"role": "user", "content": "Hi"},) and by["chat"].prompt is None
    assert by["embed"].kind == "embed" and by["embed"].model == "e" and by["embed-one"].texts == ("just one",)
    assert by["nan"].kind == "error" and np.isnan(by["nan"].params.temperature)
    assert by["empty-input"].op == "generate_embeddings" and by["no-model"].model == "no-such-model"


@pytest.mark.parametrize("line,message", BAD)
def test_bad_suite_lines_are_named(tmp_path, line, message):
    path = _write_suite(tmp_path / "s.jsonl", [GOOD[0], line])
    with pytest.raises(SuiteError, match="s.jsonl:2") as e:
        load_suite(path, "m", "e")
    assert message in str(e.value)


def test_suite_file_errors(tmp_path):
    (tmp_path / "nan.jsonl").write_text('{"name": "a", "prompt": "x", "params": {"temperature": NaN}}\n')
    with pytest.raises(SuiteError, match="nan.jsonl:1.*NaN is not JSON"):
        load_suite(tmp_path / "nan.jsonl", "m")
    _write_suite(tmp_path / "dup.jsonl", [GOOD[0], GOOD[0]])
    with pytest.raises(SuiteError, match="dup.jsonl:2: case name 'greedy' is also on line 1"):
        load_suite(tmp_path / "dup.jsonl", "m")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(SuiteError, match="holds no case"):
        load_suite(tmp_path / "empty.jsonl", "m")
    _write_suite(tmp_path / "emb.jsonl", [GOOD[4]])
    with pytest.raises(SuiteError, match="--embedding-model"):
        load_suite(tmp_path / "emb.jsonl", "m", None)


def test_schema_agrees_with_the_parser():
    import jsonschema  # the test extra installs it
    schema = json.loads(SUITE_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for line in GOOD:
        assert not list(validator.iter_errors(line)), line
    for line, _ in BAD:
        assert list(validator.iter_errors(line)), line


# ----------------------------------------------------------------------------- a tiny Llama saved by transformers

PROMPTS = ["The quick brown fox", "Why is the sky blue?", "def f(x):", "Héllo wörld 🙂"]
USER_SUITE = [
    *({"name": f"greedy-{i}", "prompt": p, "params": {"max_tokens": 10, "temperature": 0, "repeat_penalty": 1.0}}
      for i, p in enumerate(PROMPTS)),
    {"name": "penalty", "prompt": "The quick brown fox jumps over the lazy dog.",
     "params": {"max_tokens": 10, "temperature": 0, "repeat_penalty": 1.3, "repeat_penalty_last_n_token_count": 64}},
    {"name": "chat", "messages": [{"role": "user", "content": "Why is the sky blue?"}],
     "params": {"max_tokens": 8, "temperature": 0, "repeat_penalty": 1.0}},
    {"name": "sampled", "prompt": "Once upon", "params": {"max_tokens": 5, "temperature": 0.9, "top_k": 20},
     "seeds": [3, 4]},
    {"name": "embed", "input": ["A short one.", "A considerably longer sentence, padded in its batch."]},
    {"name": "top-k-0", "prompt": "x", "params": {"top_k": 0}, "error": "invalid-input"},
    {"name": "too-long", "prompt": "fox " * 300, "params": {"max_tokens": 1}, "error": "invalid-input"},
]


def save_tiny_hf_llama(d: Path, seed: int = 0) -> Path:
    """A random LlamaForCausalLM saved by transformers' save_pretrained (sharded), with a
    byte-level BPE tokenizer (tests/tiny_models.py) and a chat template."""
    import torch
    import transformers

    d.mkdir(parents=True)
    vocab = make_tokenizer(d / "tokenizer.json")
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=0, eos_token_id=1, initializer_range=0.2,
                                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(d, safe_serialization=True, max_shard_size="100KB")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE, "bos_token": "<s>",
                                                         "eos_token": "</s>"}))
    return d


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    d = save_tiny_hf_llama(tmp_path_factory.mktemp("hf") / "tiny-hf")
    assert (d / "model.safetensors.index.json").is_file()  # sharded
    return d


@pytest.fixture(scope="module")
def tiny_gguf(tiny_hf, tmp_path_factory):
    from refllm.weights.hf_to_gguf import write_f32_gguf

    return write_f32_gguf(tiny_hf, tmp_path_factory.mktemp("gguf") / "tiny-gguf.gguf")


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory):
    return _write_suite(tmp_path_factory.mktemp("suite") / "cases.jsonl", USER_SUITE)


def _golden_via_cli(model, suite, out, *extra) -> Path:
    code = cli.main(["golden", "--model", str(model), "--suite", str(suite), "--out", str(out), "--quiet", *extra])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def hf_golden(tiny_hf, suite_file, minilm_dir, tmp_path_factory):
    return load_golden(_golden_via_cli(tiny_hf, suite_file, tmp_path_factory.mktemp("g") / "hf",
                                       "--embedding-model", str(minilm_dir)))


@pytest.fixture(scope="module")
def gguf_golden(tiny_gguf, minilm_dir, tmp_path_factory):
    # refllm.weights.hf_to_gguf writes no tokenizer.chat_template, so this GGUF has none:
    # its suite leaves out the chat case
    suite = _write_suite(tmp_path_factory.mktemp("suite") / "cases-gguf.jsonl",
                         [x for x in USER_SUITE if "messages" not in x])
    return load_golden(_golden_via_cli(tiny_gguf, suite, tmp_path_factory.mktemp("g") / "gguf",
                                       "--embedding-model", str(minilm_dir)))


@pytest.fixture(scope="module")
def hf_reference(tiny_hf):
    """transformers' generate(do_sample=False) in float64 on the tiny model."""
    import torch

    from tests.llama_util import hf_model

    model = hf_model(tiny_hf, torch.float64)

    def generate(prompt_ids, max_new_tokens, repetition_penalty=1.0):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 repetition_penalty=repetition_penalty, eos_token_id=1, pad_token_id=1,
                                 attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
        new = out[0, len(prompt_ids):].tolist()
        return new[: new.index(1) + 1] if 1 in new else new

    return generate


def _check_against_transformers(golden, generate, chat=True):
    greedy = [c for c in golden.cases if c["kind"] == "generate" and not c["sampling"]]
    assert len(greedy) == sum(1 for x in USER_SUITE if x.get("params", {}).get("temperature") == 0
                              and (chat or "messages" not in x))
    for c in greedy:
        p = c["params"]
        want = generate(c["prompt_ids"], p["max_tokens"], p["repeat_penalty"])
        assert c["tokens"] == want, c["name"]
        assert len(c["tokens"]) >= 1
    # the same prompts tokenized by transformers' own fast tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(golden.tokenizer_path(greedy[0]["model"])))
    for c in greedy:
        assert tok(c["prompt"])["input_ids"] == c["prompt_ids"], c["name"]


@pytest.mark.slow
def test_hf_checkpoint_greedy_tokens_are_transformers_generate(hf_golden, hf_reference):
    _check_against_transformers(hf_golden, hf_reference)


@pytest.mark.slow
def test_gguf_greedy_tokens_are_transformers_generate(gguf_golden, hf_reference, hf_golden):
    _check_against_transformers(gguf_golden, hf_reference, chat=False)
    for a in gguf_golden.cases:  # the GGUF's F32 weights are the checkpoint's
        b = hf_golden.case(a["name"])
        if a["kind"] == "generate":
            assert a["tokens"] == b["tokens"] and a["prompt_ids"] == b["prompt_ids"], a["name"]
            for sa, sb in zip(a["steps"], b["steps"]):
                assert sa["logit"] == pytest.approx(sb["logit"], rel=1e-9, abs=1e-9)


@pytest.mark.slow
def test_user_set_contents(hf_golden, tiny_hf, suite_file, minilm_dir):
    h = hf_golden.header
    assert h["suite"] == "cases.jsonl" and h["suite_sha256"] == hashlib.sha256(suite_file.read_bytes()).hexdigest()
    assert h["blas_threads"] == 1 and h["precision"] == "float64"
    assert set(h["models"]) == {"tiny-hf", minilm_dir.name}
    m = h["models"]["tiny-hf"]
    files = {p.relative_to(tiny_hf).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(tiny_hf.rglob("*")) if p.is_file()}
    assert m["files"] == files and m["format"] == "safetensors" and m["kind"] == "llama"
    manifest = "".join(f"{files[k]}  {k}\n" for k in sorted(files))
    assert m["sha256"] == hashlib.sha256(manifest.encode()).hexdigest() == manifest_sha256(files)
    # the same as sha256sum's lines, piped to sha256sum
    listing = subprocess.run(f"cd {tiny_hf} && find . -type f | sed 's|^./||' | LC_ALL=C sort | xargs sha256sum",
                             shell=True, capture_output=True, text=True, check=True).stdout
    assert listing == manifest
    assert m["eos_token_ids"] == [1] and m["context_length"] == 256
    assert (hf_golden.dir / "suite.jsonl").read_bytes() == suite_file.read_bytes()
    assert (hf_golden.dir / "FORMAT.md").read_text().startswith("# refllm golden set: the format")
    assert (hf_golden.dir / "tokenizers" / "tiny-hf.json").read_bytes() == (tiny_hf / "tokenizer.json").read_bytes()
    assert h["cases"] == [c["name"] for c in hf_golden.cases] == [
        "greedy-0", "greedy-1", "greedy-2", "greedy-3", "penalty", "chat", "sampled-seed-3", "sampled-seed-4",
        "embed", "top-k-0", "too-long"]
    chat = hf_golden.case("chat")
    assert chat["messages"] == [{"role": "user", "content": "Why is the sky blue?"}]
    assert chat["prompt"] == "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n"
    for seed in (3, 4):
        c = hf_golden.case(f"sampled-seed-{seed}")
        rng = np.random.Generator(np.random.PCG64(seed))
        assert c["seed"] == seed and [s["u"] for s in c["steps"]] == [rng.random() for _ in c["steps"]]
        assert all(s["u_interval"][0] <= s["u"] < s["u_interval"][1] for s in c["steps"])
    emb = hf_golden.case("embed")
    assert emb["model"] == minilm_dir.name and len(emb["embeddings"]) == 2 and len(emb["embeddings"][0]) == 384
    assert hf_golden.case("top-k-0")["error"] == {"variant": "invalid-input", "message": "top_k must be > 0, got 0"}
    assert "longer than the model's context of 256" in hf_golden.case("too-long")["error"]["message"]


@pytest.mark.slow
def test_gguf_header_names_the_file_by_sha256(gguf_golden, tiny_gguf):
    m = gguf_golden.header["models"]["tiny-gguf"]
    sha = hashlib.sha256(Path(tiny_gguf).read_bytes()).hexdigest()
    assert m["format"] == "gguf" and m["sha256"] == sha and m["files"] == {"tiny-gguf.gguf": sha}


# ----------------------------------------------------------------------------- replayed by refllm conform

@pytest.fixture(scope="module")
def served(tiny_hf, tiny_gguf, minilm_dir, tmp_path_factory):
    """`refllm serve` (its app, on a thread) over a models root holding the two tiny models
    under the names their golden sets use, and the embedding model."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from refllm.serve.app import ServerThread
    from refllm.serve.core import ServerConfig
    from refllm.weights.gguf_to_hf import convert

    root = tmp_path_factory.mktemp("served")
    (root / "llama").mkdir()
    (root / "llama" / "tiny-hf").symlink_to(tiny_hf, target_is_directory=True)
    (root / "llama" / "tiny-gguf").mkdir()
    convert(tiny_gguf, root / "llama" / "tiny-gguf")
    (root / minilm_dir.name).symlink_to(minilm_dir, target_is_directory=True)
    with ServerThread(ServerConfig(models_dir=str(root))) as s:
        yield s


@pytest.mark.slow
@pytest.mark.parametrize("which", ["hf", "gguf"])
def test_conform_replays_the_user_set(which, served, hf_golden, gguf_golden, tmp_path, capsys):
    golden = {"hf": hf_golden, "gguf": gguf_golden}[which]
    report = tmp_path / "report.json"
    code = cli.main(["conform", "--against", served.url, "--golden", str(golden.dir), "--report", str(report),
                     "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    doc = json.loads(report.read_text())
    statuses = {c["name"]: c["status"] for c in doc["cases"]}
    assert set(statuses) == set(golden.header["cases"])
    assert all(s in ("pass", "warn") for s in statuses.values()), statuses


# ----------------------------------------------------------------------------- the command line

def test_cli_errors(tmp_path, tiny_hf, suite_file, capsys):
    def run(*argv):
        code = cli.main(["golden", *argv])
        return code, capsys.readouterr().err

    code, err = run("--model", str(tiny_hf), "--out", str(tmp_path / "o"))
    assert code == 2 and "--model PATH and --suite FILE go together" in err
    code, err = run("--model", str(tmp_path / "nothing"), "--suite", str(suite_file), "--out", str(tmp_path / "o"))
    assert code == 2 and "no model at" in err
    bad = _write_suite(tmp_path / "bad.jsonl", [USER_SUITE[0], {"name": "x", "prompt": "y"}])
    code, err = run("--model", str(tiny_hf), "--suite", str(bad), "--out", str(tmp_path / "o"))
    assert code == 2 and "bad.jsonl:2" in err and "seed" in err
    wrong = _write_suite(tmp_path / "wrong.jsonl", [{"name": "ok", "prompt": "x", "error": "invalid-input",
                                                     "params": {"top_k": 3, "temperature": 0}}])
    code, err = run("--model", str(tiny_hf), "--suite", str(wrong), "--out", str(tmp_path / "o"))
    assert code == 2 and "case ok: refllm raises no error for it" in err
    refused = _write_suite(tmp_path / "refused.jsonl", [{"name": "k0", "prompt": "x",
                                                         "params": {"top_k": 0, "temperature": 0}}])
    code, err = run("--model", str(tiny_hf), "--suite", str(refused), "--out", str(tmp_path / "o"))
    assert code == 2 and "case k0: refllm refuses it: invalid-input" in err
    assert not (tmp_path / "o" / "golden.jsonl").exists()
    code = cli.main(["golden", "--model", str(tiny_hf), "--suite", str(suite_file), "--list", "--embedding-model",
                     str(tiny_hf), "--embedding-name", "emb"])
    out = capsys.readouterr().out
    assert code == 0 and "sampled-seed-4" in out and "greedy-0" in out


def test_models_from_paths_names(tiny_hf, tiny_gguf):
    assert Models.from_paths(tiny_hf).llm_name == "tiny-hf"
    assert Models.from_paths(tiny_gguf).llm_name == "tiny-gguf"
    assert Models.from_paths(tiny_gguf, llm_name="llama2-chat").llm_name == "llama2-chat"
    m = Models.from_paths(tiny_hf)
    assert m.sources[0].sha256() == manifest_sha256(m.sources[0].files())


def test_core_path_does_not_import_ray(tiny_hf, tmp_path):
    suite = _write_suite(tmp_path / "s.jsonl", USER_SUITE[:1])
    code = ("import sys\n"
            "from refllm import cli\n"
            f"assert cli.main(['golden', '--model', {str(tiny_hf)!r}, '--suite', {str(suite)!r}, "
            f"'--out', {str(tmp_path / 'o')!r}, '--quiet']) == 0\n"
            "assert 'ray' not in sys.modules, 'the NumPy path imported ray'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_golden(tmp_path / "o").cases[0]["name"] == "greedy-0"


def test_ray_fingerprint_names_what_differs(tiny_hf, tmp_path):
    """What each Ray actor must share with the driver: refllm's computing code and the
    model files' sha256s (refllm.golden.fanout; the actors compare without Ray here)."""
    import shutil

    from refllm.golden import fanout

    copy = tmp_path / "tiny-hf"
    shutil.copytree(tiny_hf, copy)
    want = fanout.fingerprint(Models.from_paths(tiny_hf), ["tiny-hf"])
    assert fanout.fingerprint(Models.from_paths(copy), ["tiny-hf"]) == want
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    got = fanout.fingerprint(Models.from_paths(copy), ["tiny-hf"])
    assert got["code"] == want["code"] and got["models"] != want["models"]
    assert fanout._diff(want, got).startswith("tiny-hf: ")
