"""Golden tests of refllm.embeddings on the real all-MiniLM-L6-v2 (SPEC 4 and 6).

References: sentence-transformers on the same directory (float32), and transformers'
BertModel in float64, mean-pooled and normalised by hand here (float64). The max
differences are printed (run with -s to see them).
"""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sentence_transformers = pytest.importorskip("sentence_transformers")

from refllm.bert import Bert  # noqa: E402
from refllm.embeddings import Embedder, l2_normalize, mean_pool  # noqa: E402
from refllm.errors import InvalidInputError  # noqa: E402


LONG_EN = "The quick brown fox jumps over the lazy dog while the cat watches from the window. " * 25
LONG_CJK = "自然言語処理は人工知能の一分野であり、コンピュータが人間の言語を理解することを目指す。" * 12
LONG_CODE = "\n".join(f"def f{i}(x, y=None):\n    return [v ** {i} for v in range(x) if v % 3]" for i in range(30))

TEXTS = [
    "", "a", "Z", ".", " ", "   \t\n   ", "\n", "é", "中", "🙂",
    "Hello, world!", "hello world", "HELLO WORLD", "The cat sat on the mat.",
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "Spin is a framework for building and running serverless WebAssembly applications.",
    "Crème brûlée, naïve café, jalapeño, Ångström, façade, Zürich, São Paulo.",
    "Ça va très bien, merci — et vous ?", "Ελληνικά γράμματα: α β γ δ", "Привет, как дела?",
    "日本語のテキストです。", "我喜欢吃苹果和香蕉。", "한국어 문장입니다.", "مرحبا بالعالم", "שלום עולם",
    "हिन्दी वाक्य", "ไทย ภาษา", "emoji 🚀🔥💯 in the 🌍 middle 👍🏽 of text",
    "👨‍👩‍👧‍👦 family and 🏳️‍🌈 flags", "def add(a, b):\n    return a + b",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }", "SELECT name, COUNT(*) FROM users GROUP BY name;",
    '{"key": [1, 2, 3], "nested": {"a": null}}', "<html><body><p>Hi</p></body></html>",
    "https://example.com/path?query=1&x=%20#frag", "user@example.com", "3.14159 2.71828 1e-10 -42 0x1F",
    "word    with     many      spaces", "tabs\tand\ttabs\t\there", "lines\n\n\nand\r\nbreaks",
    "MiXeD CaSe AnD numb3rs 4nd s¥mbols ©®™", "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "Don't stop believin' — it's the end of the world as we know it.",
    "The Eiffel Tower is located in Paris. The Colosseum is in Rome.",
    "¿Dónde está la biblioteca? ¡Aquí!", "Straße, Mädchen, Übergröße, öffentlich",
    "zero\u200bwidth\u200bspace and\u00a0non-breaking", "control\x00char\x07s",
    "repeated repeated repeated repeated repeated repeated", "short", "Paris",
    LONG_EN, LONG_CJK, LONG_CODE, LONG_EN[:700] + " 🙂 " + LONG_CJK[:100],
]


# the real model (pulled once by conftest); one BLAS thread
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_blas_thread")]


@pytest.fixture(scope="module")
def model_dir(minilm_dir):
    return minilm_dir


@pytest.fixture(scope="module")
def embedder(model_dir):
    return Embedder.from_dir(model_dir)


@pytest.fixture(scope="module")
def st_model(model_dir):
    return sentence_transformers.SentenceTransformer(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def st_vectors(st_model):
    return st_model.encode(TEXTS, batch_size=8, normalize_embeddings=True, convert_to_numpy=True)  # [N, H]


@pytest.fixture(scope="module")
def ours(embedder):
    return embedder.embed(TEXTS)


def test_corpus_covers_the_cases(embedder):
    assert len(TEXTS) >= 50
    lengths = [len(ids) for ids in embedder.tokenize(TEXTS)]
    assert embedder.max_seq_length == 256  # sentence_bert_config.json, not tokenizer.json's 128
    assert min(lengths) == 2 and sum(n == 256 for n in lengths) >= 3  # [CLS] [SEP] ... truncated


def test_matches_sentence_transformers(ours, st_vectors):
    got = np.array(ours.embeddings, dtype=np.float32)  # [N, H]
    assert got.shape == st_vectors.shape == (len(TEXTS), 384)
    err = np.abs(got - st_vectors).max()
    a, b = got.astype(np.float64), st_vectors.astype(np.float64)
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    print(f"\nfloat32 vs sentence-transformers on {len(TEXTS)} texts: max |Δ| = {err:.3g}, min cosine = {cos.min():.12f}")
    assert err <= 1e-5
    assert cos.min() >= 0.999999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)
    assert all(isinstance(x, float) for x in ours.embeddings[0])


def test_usage_counts_real_tokens(ours, st_model):
    enc = st_model.tokenize(TEXTS)  # sentence-transformers' own tokenization (max_seq_length 256)
    assert ours.usage.prompt_token_count == int(enc["attention_mask"].sum())


def test_float64_matches_transformers(model_dir, embedder):
    """float64 end to end: refllm vs BertModel in float64, pooled and normalised here."""
    e64 = Embedder.from_dir(model_dir, dtype=np.float64)
    got = e64.embed_array(TEXTS)  # [N, H]
    assert got.dtype == np.float64
    hf = transformers.BertModel.from_pretrained(str(model_dir), add_pooling_layer=False,
                                                attn_implementation="eager", dtype=torch.float64).eval()
    ref = np.empty_like(got)
    with torch.no_grad():
        for i, ids in enumerate(embedder.tokenize(TEXTS)):  # one text at a time: no padding
            h = hf(input_ids=torch.tensor([ids])).last_hidden_state[0]  # [T, H] float64
            ref[i] = torch.nn.functional.normalize(h.mean(0), dim=-1).numpy()
    err = np.abs(got - ref).max()
    print(f"\nfloat64 vs transformers float64: max |Δ| = {err:.3g}")
    assert err <= 1e-10


def test_alone_equals_in_a_batch_with_longer_texts(embedder):
    """Through `embed` (where the chunking keeps the short text away from the long ones)
    and forced: the short text padded to 256 in one batch with the long ones."""
    short = "A man is eating food."
    alone = embedder.embed_array([short])[0]
    batched = embedder.embed_array([LONG_EN, short, LONG_CODE, "x"])[1]
    ids = embedder.tokenize([LONG_EN, short, LONG_CODE])
    batch = np.zeros((3, 256), dtype=np.int64)  # [B, T]
    mask = np.zeros((3, 256), dtype=np.int64)  # [B, T]
    for r, x in enumerate(ids):
        batch[r, : len(x)], mask[r, : len(x)] = x, 1
    assert mask[1].sum() < 10
    padded = l2_normalize(mean_pool(embedder.model(batch, mask), mask))[1]  # [H]
    err = max(np.abs(alone - batched).max(), np.abs(alone - padded).max())
    print(f"\nalone vs in a batch padded to 256 with longer texts: max |Δ| = {err:.3g}")
    assert err <= 1e-6


def test_input_order_is_kept_with_chunking(embedder, ours):
    rng = random.Random(1)
    idx = list(range(len(TEXTS)))
    rng.shuffle(idx)
    idx = idx[:20] + [TEXTS.index(LONG_EN), TEXTS.index("")]
    texts = [TEXTS[i] for i in idx]
    full = np.array(ours.embeddings)
    for chunk_size in (1, 3, 7):
        got = embedder.embed(texts, chunk_size=chunk_size)
        err = np.abs(np.array(got.embeddings) - full[idx]).max()
        assert err <= 1e-6, (chunk_size, err)
        assert got.usage.prompt_token_count == sum(len(x) for x in embedder.tokenize(texts))


def test_invalid_input(embedder):
    with pytest.raises(InvalidInputError, match="empty"):
        embedder.embed([])
    with pytest.raises(InvalidInputError, match=r"texts\[1\] must be a string, got int"):
        embedder.embed(["a", 3])
    with pytest.raises(InvalidInputError, match=r"texts\[0\] must be a string, got NoneType"):
        embedder.embed([None])
    with pytest.raises(InvalidInputError, match="list of strings, got str"):
        embedder.embed("a bare string")
    with pytest.raises(InvalidInputError, match="list of strings, got dict"):
        embedder.embed({"a": 1})
    with pytest.raises(InvalidInputError, match="list of strings, got generator"):
        embedder.embed(t for t in ["a"])
    with pytest.raises(ValueError, match="'spec', 'spin'"):
        embedder.embed(["a"], profile="tgi")
    with pytest.raises(ValueError, match="chunk_size"):
        embedder.embed(["a"], chunk_size=0)
    assert embedder.embed(("a", "b")).usage.prompt_token_count == 6  # a tuple is a list too


def test_spin_profile(embedder):
    """Spin 3's engine (SPEC 6): what is asserted.

    - One short text: no padding, so Spin's unmasked pooling equals the masked one and
      the only difference is the GELU form. Spin's vector equals the spec pipeline run
      with the tanh GELU to 1e-6, and differs from the erf one (printed).
    - A padded batch: the short texts' vectors differ from spec (padding is attended to
      and averaged in), the longest text's is as on its own; usage is T, the padded
      length of the batch, not the real-token total.
    - Truncation is tokenizer.json's own (128 for this model), not 256.
    """
    short = "A man is eating food."
    spin1 = embedder.embed([short], profile="spin")
    spec1 = embedder.embed([short])
    n = len(embedder.tokenize([short])[0])
    assert spin1.usage.prompt_token_count == spec1.usage.prompt_token_count == n
    tanh = Embedder(embedder.model.with_hidden_act("gelu_new"), embedder.tokenizer, embedder.max_seq_length)
    tanh1 = tanh.embed([short])
    gelu_err = np.abs(np.array(spin1.embeddings) - np.array(tanh1.embeddings)).max()
    form_diff = np.abs(np.array(spin1.embeddings) - np.array(spec1.embeddings)).max()
    print(f"\nspin vs spec with tanh GELU, one text: max |Δ| = {gelu_err:.3g}; tanh vs erf GELU: {form_diff:.3g}")
    assert gelu_err <= 1e-6
    assert 0 < form_diff < 1e-2

    batch = [short, "Paris", "A much longer sentence about the weather in the mountains this weekend."]
    spin = embedder.embed(batch, profile="spin")
    spec_tanh = tanh.embed(batch)
    T = max(len(x) for x in embedder.tokenize(batch))
    assert spin.usage.prompt_token_count == T
    d = np.abs(np.array(spin.embeddings) - np.array(spec_tanh.embeddings)).max(axis=1)
    print(f"spin vs spec(tanh) on a padded batch, per text: {np.array2string(d, precision=3)}")
    assert d[0] > 1e-2 and d[1] > 1e-2 and d[2] <= 1e-6

    long = embedder.embed([LONG_EN], profile="spin")
    assert long.usage.prompt_token_count == 128


def test_no_config_json_uses_minilm_defaults(model_dir, tmp_path, embedder):
    """Without config.json the encoder takes all-MiniLM-L6-v2's shape (BertConfig())."""
    d = tmp_path / "noconfig"
    d.mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        os.symlink(model_dir / name, d / name)
    bare = Embedder.from_dir(d)
    assert bare.max_seq_length == 128  # no sentence_bert_config.json: tokenizer.json's truncation
    got = bare.embed_array(["hello world"])
    np.testing.assert_array_equal(got, embedder.embed_array(["hello world"]))
    shutil.rmtree(d)


def test_backend_seam(model_dir):
    with pytest.raises(ValueError, match="numpy, triton"):
        Embedder.from_dir(model_dir, backend="nope")
    assert isinstance(Embedder.from_dir(model_dir, backend="numpy").model, Bert)
