"""Fidelity beyond SmolLM2 (issue 15, part 2): what Llama 2/3, Mistral and Qwen2 need.

Each test is against the real peer, built locally: tokenizers built with the
`tokenizers` library and wrapped by transformers (the way transformers reads the same
directory), tiny random LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM
checkpoints, GGUF files written with the `gguf` package's GGUFWriter.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from refllm import ops


# ------------------------------------------------------------------ 1. ops.causal_attention


def attention_by_definition(q, k, v, start_pos):  # [T, NH, HD], [S, NKV, HD] x2 -> [T, NH, HD], float64
    """Query t at position start_pos + t, head h: softmax over keys 0 .. start_pos + t of
    head h // G of q.k / sqrt(HD), times the values. One query and one head at a time."""
    T, NH, HD = q.shape
    G = NH // k.shape[1]
    out = np.zeros((T, NH, HD))
    for t in range(T):
        for h in range(NH):
            keys, values = k[: start_pos + t + 1, h // G], v[: start_pos + t + 1, h // G]  # [start_pos+t+1, HD] x2
            scores = keys @ q[t, h] / math.sqrt(HD)  # [start_pos+t+1]
            p = np.exp(scores - scores.max())
            out[t, h] = (p / p.sum()) @ values
    return out


@pytest.mark.parametrize("T, start_pos", [(1, 2), (1, 0), (1, 5), (3, 2)])
def test_causal_attention_sees_only_keys_up_to_its_position(T, start_pos):
    """Six keys in the cache; a query at position start_pos must not see the later ones
    (at T = 1 it used to see all six: off by 1.17 at position 2)."""
    rng = np.random.default_rng(T * 10 + start_pos)
    NH, NKV, HD, S = 4, 2, 8, 6
    q = rng.standard_normal((T, NH, HD))  # [T, NH, HD]
    k, v = rng.standard_normal((S, NKV, HD)), rng.standard_normal((S, NKV, HD))  # [S, NKV, HD] x2
    got = ops.causal_attention(q, k, v, start_pos)  # [T, NH, HD]
    np.testing.assert_allclose(got, attention_by_definition(q, k, v, start_pos), rtol=0, atol=1e-13)


# ------------------------------------------------------------------ tiny tokenizers of each family

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Héllo wörld, naïve café — ünïcödé 你好世界 🙂 emoji.",
    "def f(x):\n    return x * 2  # code 12345\n",
    "Why is the sky blue? Because of Rayleigh scattering of sunlight.",
    "[INST] Hi there [/INST] Hello! How can I help you today?",
]
TEXTS = ["Hello world", " leading space and  two", "naïve café 你好 🙂", "digits 1234567 and\nnew lines\n\n", "<s> not special?"]

LLAMA2_CHAT = (  # Llama 2's template, abridged: it writes the BOS itself
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'].strip()"
    " + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
MISTRAL_CHAT = (  # Mistral-7B-Instruct-v0.1's template
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
LLAMA3_CHAT = (  # Llama 3.1's template, abridged: the date line, tools as JSON
    "{{- bos_token }}{%- set date_string = strftime_now('%d %b %Y') %}"
    "<|start_header_id|>system<|end_header_id|>\n\nToday Date: {{ date_string }}\n"
    "{%- if tools is defined %}{{ tools | tojson }}{% endif %}<|eot_id|>"
    "{%- for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{%- endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def llama2_tokenizer():
    """A sentencepiece-style BPE as Llama 2's tokenizer.json: "▁" for spaces prepended by
    the normalizer, byte fallback to <0xNN>, <s> added by the post-processor."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False))
    spec = json.loads(tok.to_str())
    spec["model"].update(byte_fallback=True, fuse_unk=True, unk_token="<unk>")  # the trainer forgets them
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


def llama3_tokenizer():
    """A byte-level BPE as Llama 3's: its split regex, <|begin_of_text|> added first."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from refllm.weights.gguf_tokenizer import _LLAMA3_SPLIT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tok.add_special_tokens(LLAMA3_SPECIALS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    return tok


def write_model_dir(d, tok, tok_config: dict, config: dict | None = None, generation: dict | None = None, seed=0):
    """A model directory: tokenizer.json, tokenizer_config.json, a tiny random Llama
    whose vocabulary is the tokenizer's, and generation_config.json when given."""
    import json

    from tests.llama_util import make_tiny_llama

    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(tok_config))
    make_tiny_llama(d, dict(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                            max_position_embeddings=96) | (config or {}), seed=seed)
    if generation is not None:
        (d / "generation_config.json").write_text(json.dumps(generation))
    return d


def hf_tokenizer(d):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d))


def hf_chat_ids(tok, messages, **kwargs):
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# "PreTrainedTokenizerFast": tokenizer.json as it is. (transformers 5's LlamaTokenizer class
# replaces the file's normalizer by Metaspace(prepend_scheme="first"), which spells a
# leading space "▁" where the file's Prepend("▁") gives "▁▁".)
LLAMA2_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                 "add_bos_token": True, "add_eos_token": False, "chat_template": LLAMA2_CHAT}
LLAMA3_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                 "eos_token": "<|eot_id|>", "chat_template": LLAMA3_CHAT}


@pytest.fixture(scope="module")
def llama2_dir(tmp_path_factory):
    tok = llama2_tokenizer()
    return write_model_dir(tmp_path_factory.mktemp("llama2") / "m", tok, LLAMA2_CONFIG,
                           dict(bos_token_id=1, eos_token_id=2))


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    tok = llama3_tokenizer()
    eot, end = tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|end_of_text|>")
    return write_model_dir(tmp_path_factory.mktemp("llama3") / "m", tok, LLAMA3_CONFIG,
                           dict(bos_token_id=tok.token_to_id("<|begin_of_text|>"), eos_token_id=end),
                           generation=dict(eos_token_id=[end, eot]))


def loaded(d):
    from refllm.generate import LoadedLLM

    return LoadedLLM.from_dir(d)


# ------------------------------------------------------------------ 2, 4, 7: tokenizing and chat


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_prompt_ids_are_transformers(family, llama2_dir, llama3_dir):
    d = {"llama2": llama2_dir, "llama3": llama3_dir}[family]
    llm, tok = loaded(d), hf_tokenizer(d)
    for text in TEXTS:
        assert llm.encode(text) == tok(text)["input_ids"], text
        assert llm.decode(llm.encode(text)) == tok.decode(tok(text)["input_ids"], skip_special_tokens=True)


CONVERSATION = [{"role": "user", "content": "Hi there <b>&</b>"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "naïve café?"}]


@pytest.mark.parametrize("family", ["llama2", "llama3", "mistral"])
def test_chat_prompt_has_one_bos_as_transformers(family, llama2_dir, llama3_dir, tmp_path):
    """The template writes the BOS; tokenizing its text must not add a second (SPEC 2.1)."""
    from refllm.generate import Generation

    d = {"llama2": llama2_dir, "llama3": llama3_dir}.get(family)
    if family == "mistral":
        d = write_model_dir(tmp_path / "mistral", llama2_tokenizer(), LLAMA2_CONFIG | {"chat_template": MISTRAL_CHAT},
                            dict(bos_token_id=1, eos_token_id=2))
    llm, tok = loaded(d), hf_tokenizer(d)
    text = llm.apply_chat_template(CONVERSATION)
    assert text == tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    ids = Generation(llm, text).prompt_ids
    assert ids == hf_chat_ids(tok, CONVERSATION)
    assert ids.count(tok.bos_token_id) == 2 if family == "llama2" else ids.count(tok.bos_token_id) == 1


def test_mistral_template_raise_exception_is_invalid_input(llama2_dir, tmp_path):
    from jinja2.exceptions import TemplateError

    from refllm.errors import InvalidInputError

    d = write_model_dir(tmp_path / "mistral", llama2_tokenizer(), LLAMA2_CONFIG | {"chat_template": MISTRAL_CHAT},
                        dict(bos_token_id=1, eos_token_id=2))
    bad = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hi"}]
    with pytest.raises(TemplateError, match="alternate"):
        hf_tokenizer(d).apply_chat_template(bad, tokenize=False)
    with pytest.raises(InvalidInputError, match="alternate"):
        loaded(d).apply_chat_template(bad)


def test_template_environment_is_transformers(llama3_dir):
    """strftime_now and a tojson that does not escape HTML, as transformers defines them."""
    from refllm.chat import render_chat

    tok = hf_tokenizer(llama3_dir)
    template = LLAMA3_CHAT + "{{ messages | tojson }}{{ {'k': 'é<&>\\''} | tojson(indent=2) }}"
    expected = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True, chat_template=template)
    got = render_chat(template, CONVERSATION, True, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    assert got == expected
    assert '"Hi there <b>&</b>"' in got


@pytest.mark.parametrize("flags", [dict(add_bos_token=True, add_eos_token=True), dict(add_bos_token=False),
                                   dict(add_eos_token=True), dict()])
def test_add_bos_and_eos_flags_as_the_fast_llama_tokenizer(flags, tmp_path):
    """A LlamaTokenizerFast's add_bos_token / add_eos_token (absent: True / False) rebuild
    the post-processor, by transformers' own `update_post_processor`. (transformers 5
    drops the flags at load when there is a tokenizer.json; transformers 4 applied them
    in LlamaTokenizerFast.__init__, so the peer here is the tokenizer.json as
    transformers loads it, with the flags then set as 4 set them.)"""
    from transformers import PreTrainedTokenizerFast

    config = {k: v for k, v in LLAMA2_CONFIG.items() if k not in ("add_bos_token", "add_eos_token")}
    d = write_model_dir(tmp_path / "m", llama2_tokenizer(), config | flags | {"tokenizer_class": "LlamaTokenizerFast"},
                        dict(bos_token_id=1, eos_token_id=2))
    tok = PreTrainedTokenizerFast.from_pretrained(str(d))  # tokenizer.json as it is (see LLAMA2_CONFIG)
    tok.add_bos_token = flags.get("add_bos_token", True)
    tok.add_eos_token = flags.get("add_eos_token", False)
    llm = loaded(d)
    for text in TEXTS:
        assert llm.encode(text) == tok(text)["input_ids"], (flags, text)
    other = write_model_dir(tmp_path / "other", llama2_tokenizer(), config | flags, dict(bos_token_id=1, eos_token_id=2))
    assert loaded(other).encode("Hi")[0] == 1  # not a Llama tokenizer class: tokenizer.json's <s> alone


# ------------------------------------------------------------------ 3. EOS ids: generation_config.json first


def hf_greedy(d, ids, max_new_tokens, **kwargs):
    """transformers' greedy tokens after `ids` and the logits each was chosen from."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, **kwargs)
    return out.sequences[0, len(ids):].tolist(), [lg[0].numpy() for lg in out.logits]


def test_generation_stops_at_generation_config_eos_as_transformers(llama3_dir, tmp_path):
    """config.json says <|end_of_text|>; generation_config.json adds another id, as
    Llama-3-Instruct adds <|eot_id|>. transformers' generate stops at it, and so must we."""
    import json
    import shutil

    from refllm.generate import Generation
    from refllm.types import InferencingParams

    d = shutil.copytree(llama3_dir, tmp_path / "m")
    ids = loaded(d).encode("Why is the sky blue?")
    free, _ = hf_greedy(d, ids, 12, eos_token_id=None)
    stop = next(t for i, t in enumerate(free) if i >= 2 and t not in free[:i])  # first new token from the third on
    end = json.loads((d / "config.json").read_text())["eos_token_id"]
    assert stop != end
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [end, stop]}))
    expected, logits = hf_greedy(d, ids, 12)
    assert expected[-1] == stop and len(expected) < 12

    gen = Generation(loaded(d), "Why is the sky blue?", InferencingParams(max_tokens=12, temperature=0.0, repeat_penalty=1.0))
    gen.run()
    assert gen.prompt_ids == ids
    assert gen.tokens == expected
    assert gen.finish_reason == "eos"
    for step, hf in zip(gen.steps, logits):
        np.testing.assert_allclose(step.logits, hf, rtol=0, atol=1e-4)


# ------------------------------------------------------------------ 6. GGUF tokenizers

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # gguf.TokenType


def write_tiny_gguf(path, tok, extra_tokens=(), pre="llama-bpe", kv=(), tensors=()):
    """A 1-layer Llama GGUF (GGUFWriter) whose tokenizer is the byte-level BPE `tok`, plus
    `extra_tokens` [(text, type)] appended to the vocabulary; `pre` None leaves out
    tokenizer.ggml.pre. Returns the ids of the extra tokens."""
    import json

    import gguf

    spec = json.loads(tok.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["content"]: t["id"] for t in spec["added_tokens"]}
    tokens = [t for t, _ in vocab] + [t for t in added if t not in spec["model"]["vocab"]]
    types = [CONTROL if t in added else NORMAL for t in tokens]
    ids = {}
    for text, kind in extra_tokens:
        ids[text] = len(tokens)
        tokens.append(text)
        types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    D, F, NH, V = 16, 24, 2, len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    for name, value in [("embedding_length", D), ("feed_forward_length", F), ("block_count", 1), ("context_length", 64),
                        ("attention.head_count", NH), ("attention.head_count_kv", NH), ("rope.dimension_count", D // NH)]:
        w.add_uint32(f"llama.{name}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_tokenizer_model("gpt2")
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|begin_of_text|>"))
    w.add_eos_token_id(tokens.index("<|end_of_text|>"))
    for key, value in kv:
        w.add_uint32(key, value)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (V, D), "output_norm.weight": (D,), "output.weight": (V, D),
              "blk.0.attn_norm.weight": (D,), "blk.0.ffn_norm.weight": (D,), "blk.0.attn_q.weight": (D, D),
              "blk.0.attn_k.weight": (D, D), "blk.0.attn_v.weight": (D, D), "blk.0.attn_output.weight": (D, D),
              "blk.0.ffn_gate.weight": (F, D), "blk.0.ffn_up.weight": (F, D), "blk.0.ffn_down.weight": (D, F)}
    for name, shape in list(shapes.items()) + list(tensors):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ids


def gguf_meta(path):
    from gguf import GGUFReader

    from refllm.weights.gguf_to_hf import read_metadata

    return read_metadata(GGUFReader(str(path)))


DEFAULT_SPLITS = (  # llama.cpp src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_DEFAULT
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
)


def llama_cpp_default_split(text):
    """llama.cpp's `unicode_regex_split` with the default chain, in Python's `regex`: each
    expression splits every piece into its matches and the text between them."""
    import regex

    pieces = [text]
    for expr in DEFAULT_SPLITS:
        out = []
        for piece in pieces:
            at = 0
            for m in regex.finditer(expr, piece):
                out += [piece[at : m.start()]] if m.start() > at else []
                out.append(m.group())
                at = m.end()
            out += [piece[at:]] if at < len(piece) else []
        pieces = out
    return pieces


@pytest.mark.parametrize("pre", ["default", None])
def test_gguf_default_pre_tokenizer_is_llama_cpp_default_chain(pre, tmp_path):
    """tokenizer.ggml.pre "default" (or none) is llama.cpp's chain of four regexes, not GPT-2's split."""
    from refllm.weights.gguf_tokenizer import _bytes_to_unicode, build_tokenizer

    write_tiny_gguf(tmp_path / "m.gguf", llama3_tokenizer(), pre=pre)
    tok = build_tokenizer(gguf_meta(tmp_path / "m.gguf"))
    to_char = _bytes_to_unicode()
    for text in TEXTS + ["Hello, world!!! 1234567 $x+y<=z^2 ~|pipe... it's (ok)?", "a1b22c333d4444  end"]:
        got = [piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
        expected = ["".join(to_char[b] for b in p.encode()) for p in llama_cpp_default_split(text)]
        assert got == expected, text


def test_gguf_control_and_user_defined_tokens_kept_whatever_their_spelling(tmp_path):
    """A CONTROL token with a space stays special; a USER_DEFINED one outside the
    byte-level spelling stays a token of its own (llama.cpp matches both whole)."""
    from refllm.weights.gguf_tokenizer import build_tokenizer

    ids = write_tiny_gguf(tmp_path / "m.gguf", llama3_tokenizer(),
                          extra_tokens=[("<|im start|>", CONTROL), ("<tool call>", USER_DEFINED), ("<|tab|>", USER_DEFINED)])
    tok = build_tokenizer(gguf_meta(tmp_path / "m.gguf"))
    enc = tok.encode("Hi<|im start|>the <tool call> and <|tab|>", add_special_tokens=False).ids
    for t in ("<|im start|>", "<tool call>", "<|tab|>"):
        assert ids[t] in enc, t
    assert tok.decode(enc, skip_special_tokens=True) == "Hithe <tool call> and <|tab|>"
    assert tok.decode(enc, skip_special_tokens=False) == "Hi<|im start|>the <tool call> and <|tab|>"


def test_gguf_eot_token_ends_generation(tmp_path):
    """tokenizer.ggml.eot_token_id joins the EOS in generation_config.json."""
    from refllm.weights.gguf_to_hf import convert

    tok = llama3_tokenizer()
    write_tiny_gguf(tmp_path / "m.gguf", tok, kv=[("tokenizer.ggml.eot_token_id", tok.token_to_id("<|eot_id|>"))])
    (tmp_path / "out").mkdir()
    convert(tmp_path / "m.gguf", tmp_path / "out")
    assert loaded(tmp_path / "out").eos_token_ids == {tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")}


def test_gguf_llama31_rope_freqs_is_a_clear_error(tmp_path):
    from refllm.errors import LLMRuntimeError
    from refllm.weights.gguf_to_hf import convert

    write_tiny_gguf(tmp_path / "m.gguf", llama3_tokenizer(), tensors=[("rope_freqs.weight", (4,))])
    (tmp_path / "out").mkdir()
    with pytest.raises(LLMRuntimeError, match="llama3 RoPE scaling from a GGUF is not supported"):
        convert(tmp_path / "m.gguf", tmp_path / "out")


# ------------------------------------------------------------------ 5, 8. Llama-family configs against transformers

FAMILY_CONFIGS = {
    # transformers' LlamaForCausalLM with every field it reads: biases on the attention
    # and MLP projections, a head_dim that is not hidden_size / heads
    "llama_biases_head_dim": dict(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=True,
                                  mlp_bias=True, head_dim=12, num_attention_heads=4, num_key_value_heads=2),
    # Mistral: the Llama architecture under its own name, with a sliding window
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=32,
                    num_attention_heads=4, num_key_value_heads=1),
    # Qwen2: biases on q/k/v (not o), its own RoPE theta, tied embeddings
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], rope_theta=1000000.0, tie_word_embeddings=True,
                  num_attention_heads=4, num_key_value_heads=2),
}


def write_hf_model(d, family: str, vocab_size: int, seed=0):
    """transformers' own model of `family` with random weights of unit scale (biases and
    norms too: transformers initialises those to 0 and 1), saved with save_pretrained."""
    import torch
    import transformers

    overrides = dict(FAMILY_CONFIGS[family])
    model_type = overrides.pop("model_type")
    overrides.pop("architectures")
    config = transformers.AutoConfig.for_model(model_type, vocab_size=vocab_size, hidden_size=32, intermediate_size=56,
                                               num_hidden_layers=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                                               bos_token_id=None, eos_token_id=None, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
            elif "norm" in name:
                param.normal_(1, 0.1)
            elif name.endswith("embed_tokens.weight"):
                param.normal_(0, 1.0)
            else:  # transformers' std 0.02 would leave logits within +-0.5: a weak test
                param.normal_(0, param.shape[1] ** -0.5)
    model.save_pretrained(str(d))
    return model


@pytest.fixture(scope="module", params=list(FAMILY_CONFIGS))
def family_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param) / "m"
    tok = llama3_tokenizer()
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text('{"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}')
    write_hf_model(d, request.param, tok.get_vocab_size())
    return request.param, d


def test_family_logits_and_greedy_tokens_are_transformers(family_dir):
    """Every position's logits (float32, <= 1e-4) and 12 greedy tokens, with the logits
    each was chosen from, against transformers' own class for the architecture."""
    import torch
    import transformers

    from refllm.generate import Generation
    from refllm.llama import Llama
    from refllm.types import InferencingParams

    family, d = family_dir
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    assert type(hf).__name__ == FAMILY_CONFIGS[family]["architectures"][0]
    llm = loaded(d)
    ids = llm.encode("Why is the sky blue? Because")
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].numpy()  # [T, V]
    np.testing.assert_allclose(Llama.from_pretrained(d)(ids), expected, rtol=0, atol=1e-4)

    tokens, logits = hf_greedy(d, ids, 12, eos_token_id=None)
    gen = Generation(llm, "Why is the sky blue? Because", InferencingParams(max_tokens=12, temperature=0.0, repeat_penalty=1.0))
    gen.run()
    assert gen.tokens == tokens
    for step, hf_step in zip(gen.steps, logits):
        np.testing.assert_allclose(step.logits, hf_step, rtol=0, atol=1e-4)


def test_mistral_context_ends_at_the_sliding_window(family_dir):
    """Inside its window sliding-window attention is causal attention, so a Mistral's
    context is capped at sliding_window and every result in it is exact."""
    family, d = family_dir
    llm = loaded(d)
    expected = FAMILY_CONFIGS[family].get("sliding_window") or 64
    assert llm.context_length == min(expected, 64)


def test_tied_embeddings_with_an_lm_head_in_the_file_as_transformers(tmp_path):
    """tie_word_embeddings and an lm_head.weight of other values: transformers leaves them
    untied and uses the file's head; with the same values it ties them (same logits)."""
    import torch
    import transformers
    from safetensors.numpy import load_file, save_file

    from refllm.llama import Llama
    from tests.llama_util import make_tiny_llama

    for same in (False, True):
        d = make_tiny_llama(tmp_path / f"same{same}", dict(vocab_size=50, hidden_size=16, intermediate_size=24,
                                                          num_hidden_layers=1, num_attention_heads=2,
                                                          num_key_value_heads=2, tie_word_embeddings=True))
        t = load_file(str(d / "model.safetensors"))
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy() if same else \
            np.random.default_rng(1).standard_normal((50, 16)).astype(np.float32)
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
        ids = [3, 14, 15, 9, 26]
        with torch.no_grad():
            expected = hf(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(Llama.from_pretrained(d)(ids), expected, rtol=0, atol=1e-5)


def test_triton_backend_rejects_biases_clearly(family_dir):
    from refllm.errors import LLMRuntimeError
    from refllm.llama import Llama
    from refllm.llama_triton import TritonLlama

    family, d = family_dir
    if family == "mistral":  # no biases: the triton backend takes it
        assert TritonLlama.from_llama(Llama.from_pretrained(d)) is not None
        return
    with pytest.raises(LLMRuntimeError, match="triton backend has no projection biases"):
        TritonLlama.from_llama(Llama.from_pretrained(d))


@pytest.mark.parametrize("pre", ["default", "llama-bpe", "gpt-2", "smollm"])
def test_gguf_token_ids_are_llama_cpp(pre, tmp_path):
    """The converted tokenizer's ids equal llama.cpp's own tokenizer on the same GGUF
    (llama-cpp-python, vocab only), special tokens parsed, for three pre-tokenizers."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the peer here (pip install llama-cpp-python)")
    from refllm.weights.gguf_tokenizer import build_tokenizer

    write_tiny_gguf(tmp_path / "m.gguf", llama3_tokenizer(), pre=pre,
                    extra_tokens=[("<|im start|>", CONTROL), ("<tool call>", USER_DEFINED)])
    ours = build_tokenizer(gguf_meta(tmp_path / "m.gguf"))
    peer = llama_cpp.Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    for text in TEXTS + ["Hello, world!!! 1234567 $x+y<=z^2 ~|pipe... it's (ok)?", "Hi<|im start|>the <tool call> and"]:
        expected = peer.tokenize(text.encode(), add_bos=False, special=True)
        assert ours.encode(text, add_special_tokens=False).ids == expected, (pre, text)


def test_biases_in_decode_and_decode_batch(family_dir):
    """decode and decode_batch (both modes) add the biases as __call__ does."""
    from refllm.llama import Llama

    family, d = family_dir
    model = Llama.from_pretrained(d)
    prompts = [[5, 17, 33], [8, 2, 40, 41, 9], [3], [12, 12, 6, 1]]  # THROUGHPUT_MIN_BATCH rows: its gemm runs
    tokens = [7, 11, 4, 30]
    assert len(prompts) >= Llama.THROUGHPUT_MIN_BATCH
    caches = [model.new_cache(16) for _ in prompts]
    for ids, cache in zip(prompts, caches):
        model(ids, cache, last_only=True)
    for mode in ("invariant", "throughput"):
        copies = [model.new_cache(16) for _ in prompts]
        for ids, cache in zip(prompts, copies):
            model(ids, cache, last_only=True)
        batch = model.decode_batch(tokens, copies, mode=mode)  # [4, V]
        for r, (ids, token) in enumerate(zip(prompts, tokens)):
            np.testing.assert_allclose(batch[r], model(ids + [token])[-1], rtol=0, atol=1e-4)
    for r, (ids, token) in enumerate(zip(prompts, tokens)):
        np.testing.assert_allclose(model.decode(token, caches[r]), model(ids + [token])[-1], rtol=0, atol=1e-4)
