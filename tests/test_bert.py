"""refllm.bert.Bert against transformers' BertModel on tiny random configs (tinygrad's
test_bert.py pattern): random weights saved as safetensors, loaded by refllm and copied
into BertModel(add_pooling_layer=False, attn_implementation="eager"), run on one padded
batch.

Only the real tokens are compared: transformers gives padded positions a state too
(their queries attend to the real keys), which nothing downstream reads; refllm drops
the padding before the first layer and returns zeros there (`Bert.__call__`).

Tolerances: float32 max |Δ| <= 1e-5, float64 <= 1e-10 (both sides compute in float64).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from refllm.bert import Bert  # noqa: E402
from refllm.errors import InvalidInputError, LLMRuntimeError  # noqa: E402

# Odd sizes, 1 to 3 layers, 1 to 5 heads, every GELU spelling refllm accepts.
CONFIGS = {
    "h12-nh3-l1-gelu": dict(vocab_size=37, hidden_size=12, num_attention_heads=3, num_hidden_layers=1,
                            intermediate_size=20, max_position_embeddings=16, type_vocab_size=2, hidden_act="gelu"),
    "h30-nh5-l2-gelu_new": dict(vocab_size=101, hidden_size=30, num_attention_heads=5, num_hidden_layers=2,
                                intermediate_size=47, max_position_embeddings=24, type_vocab_size=3,
                                hidden_act="gelu_new", layer_norm_eps=1e-5),
    "h16-nh1-l3-gelu_pytorch_tanh": dict(vocab_size=53, hidden_size=16, num_attention_heads=1, num_hidden_layers=3,
                                         intermediate_size=33, max_position_embeddings=19, type_vocab_size=1,
                                         hidden_act="gelu_pytorch_tanh"),
    "h28-nh4-l2-gelu-big-eps": dict(vocab_size=64, hidden_size=28, num_attention_heads=4, num_hidden_layers=2,
                                    intermediate_size=61, max_position_embeddings=13, type_vocab_size=2,
                                    hidden_act="gelu", layer_norm_eps=1e-3),
}


pytestmark = pytest.mark.usefixtures("one_blas_thread")


def random_state_dict(cfg: dict, seed: int) -> dict[str, "torch.Tensor"]:
    """A BertModel state dict with every tensor random (LayerNorm weights near 1)."""
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(**cfg), add_pooling_layer=False)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in model.state_dict().items():
        r = torch.randn(t.shape, generator=g, dtype=torch.float32)
        sd[name] = 1 + 0.2 * r if name.endswith("LayerNorm.weight") else 0.3 * r
    return sd


def write_model(d: Path, cfg: dict, sd: dict) -> Path:
    import json

    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"], **cfg}))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    return d


def hf_model(cfg: dict, sd: dict, dtype) -> "transformers.BertModel":
    m = transformers.BertModel(transformers.BertConfig(**cfg, attn_implementation="eager"), add_pooling_layer=False)
    m.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return m.to(dtype).eval()


def padded_batch(cfg: dict, seed: int):
    """Three texts of lengths T, T-3 and 1, padded with id 0; random token types."""
    rng = np.random.default_rng(seed)
    T = cfg["max_position_embeddings"] - 1
    lengths = [T, T - 3, 1]
    ids = rng.integers(1, cfg["vocab_size"], size=(3, T))  # [B, T]
    types = rng.integers(0, cfg["type_vocab_size"], size=(3, T))  # [B, T]
    mask = (np.arange(T)[None, :] < np.array(lengths)[:, None]).astype(np.int64)  # [B, T]
    ids[mask == 0] = 0
    types[mask == 0] = 0
    return ids, mask, types


def hf_forward(model, ids, mask, types) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(types)).last_hidden_state
    return out.numpy()


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    name = request.param
    cfg = CONFIGS[name]
    seed = list(CONFIGS).index(name)
    sd = random_state_dict(cfg, seed)
    d = write_model(tmp_path_factory.mktemp(name), cfg, sd)
    return name, cfg, sd, d


@pytest.mark.parametrize("dtype, torch_dtype, tol", [(np.float32, torch.float32, 1e-5), (np.float64, torch.float64, 1e-10)],
                         ids=["float32", "float64"])
def test_matches_transformers(case, dtype, torch_dtype, tol):
    name, cfg, sd, d = case
    ids, mask, types = padded_batch(cfg, seed=len(name))
    ours = Bert.from_pretrained(d, dtype=dtype)(ids, mask, types)  # [B, T, H]
    ref = hf_forward(hf_model(cfg, sd, torch_dtype), ids, mask, types)  # [B, T, H]
    assert ours.dtype == np.dtype(dtype) and ours.shape == ref.shape
    real = mask > 0
    err = np.abs(ours - ref)[real].max()
    print(f"{name} {np.dtype(dtype).name}: max |Δ| on real tokens = {err:.3g} (padded: {np.abs(ours - ref).max():.3g})")
    assert err <= tol


@pytest.mark.parametrize("rows", [1, 12, 128, 129, 320])
@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-13)], ids=["float32", "float64"])
def test_linear_matches_the_float64_product_on_both_sides_of_weight_first_rows(rows, dtype, tol):
    """`linear` takes W @ x.T up to WEIGHT_FIRST_ROWS rows and x @ W.T above: both are
    x W^T + b, against a float64 einsum; a 3-D input keeps its leading axes."""
    from refllm import bert

    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 48)).astype(dtype)  # [N, in]
    w, b = rng.standard_normal((40, 48)).astype(dtype), rng.standard_normal(40).astype(dtype)  # [out, in], [out]
    ref = np.einsum("ni,oi->no", x.astype(np.float64), w.astype(np.float64)) + b  # [N, out]
    y = bert.linear(x, w, b)
    assert y.shape == (rows, 40) and y.dtype == np.dtype(dtype)
    np.testing.assert_allclose(y, ref, rtol=tol, atol=tol * np.abs(ref).max())
    np.testing.assert_array_equal(bert.linear(x[None], w, b)[0], y)
    assert y.flags.f_contiguous == (rows <= bert.WEIGHT_FIRST_ROWS)  # which side was taken


def test_lists_and_arrays_give_the_same(case):
    _, cfg, _, d = case
    ids, mask, _ = padded_batch(cfg, seed=1)
    model = Bert.from_pretrained(d)
    a = model(ids, mask)
    b = model(ids.tolist(), mask.tolist())
    np.testing.assert_array_equal(a, b)
    # No mask means every token is real; token types default to 0.
    np.testing.assert_array_equal(model(ids[:1]), model(ids[:1], np.ones_like(ids[:1]), np.zeros_like(ids[:1])))


def test_padding_does_not_leak_into_real_tokens(case):
    """A text's states alone equal its states inside a padded batch (float64: exact up
    to the different BLAS blocking of the two shapes)."""
    _, cfg, _, d = case
    ids, mask, types = padded_batch(cfg, seed=2)
    model = Bert.from_pretrained(d, dtype=np.float64)
    batched = model(ids, mask, types)  # [3, T, H]
    for row in range(3):
        n = int(mask[row].sum())
        alone = model(ids[row : row + 1, :n], mask[row : row + 1, :n], types[row : row + 1, :n])  # [1, n, H]
        np.testing.assert_allclose(alone[0], batched[row, :n], rtol=0, atol=1e-12)
        assert not batched[row, n:].any()  # padded positions: zeros, never computed


@pytest.mark.parametrize("disk_dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_on_disk(tmp_path, disk_dtype):
    """float16 / bfloat16 checkpoints load (widened exactly) and compute in float32."""
    cfg = CONFIGS["h30-nh5-l2-gelu_new"]
    sd = {k: v.to(disk_dtype) for k, v in random_state_dict(cfg, seed=7).items()}
    d = write_model(tmp_path / "m", cfg, sd)
    model = Bert.from_pretrained(d)
    assert model.embeddings.word_embeddings.dtype == np.float32
    np.testing.assert_array_equal(model.embeddings.word_embeddings, sd["embeddings.word_embeddings.weight"].float().numpy())
    ids, mask, types = padded_batch(cfg, seed=3)
    ours = model(ids, mask, types)
    ref = hf_forward(hf_model(cfg, sd, torch.float32), ids, mask, types)
    err = np.abs(ours - ref)[mask > 0].max()
    print(f"{disk_dtype} on disk: max |Δ| = {err:.3g}")
    assert ours.dtype == np.float32 and err <= 1e-5


def test_bert_prefix_and_ignored_tensors(tmp_path):
    """`bert.`-prefixed names load; pooler.*, embeddings.position_ids (and, under the
    prefix, the task heads cls.*) are ignored."""
    cfg = CONFIGS["h12-nh3-l1-gelu"]
    sd = random_state_dict(cfg, seed=0)
    plain = Bert.from_pretrained(write_model(tmp_path / "plain", cfg, sd))
    extra = {
        "pooler.dense.weight": torch.zeros(12, 12), "pooler.dense.bias": torch.zeros(12),
        "embeddings.position_ids": torch.arange(16)[None],
    }
    Bert.from_pretrained(write_model(tmp_path / "extra", cfg, {**sd, **extra}))
    prefixed = {f"bert.{k}": v for k, v in {**sd, **extra}.items()}
    prefixed["cls.predictions.bias"] = torch.zeros(cfg["vocab_size"])
    model = Bert.from_pretrained(write_model(tmp_path / "prefixed", cfg, prefixed))
    ids, mask, _ = padded_batch(cfg, seed=0)
    np.testing.assert_array_equal(model(ids, mask), plain(ids, mask))


def test_strict_loading_names_what_is_wrong(tmp_path):
    cfg = CONFIGS["h12-nh3-l1-gelu"]
    sd = random_state_dict(cfg, seed=0)

    missing = dict(sd)
    del missing["encoder.layer.0.attention.self.key.bias"]
    with pytest.raises(LLMRuntimeError, match=r"missing tensor 'encoder\.layer\.0\.attention\.self\.key\.bias'"):
        Bert.from_pretrained(write_model(tmp_path / "missing", cfg, missing))

    misshaped = dict(sd)
    misshaped["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(21, 12)
    with pytest.raises(LLMRuntimeError, match=r"'encoder\.layer\.0\.intermediate\.dense\.weight' has shape \[21, 12\], expected \[20, 12\]"):
        Bert.from_pretrained(write_model(tmp_path / "misshaped", cfg, misshaped))

    extra = {**sd, "encoder.layer.1.output.dense.weight": torch.zeros(12, 20)}
    with pytest.raises(LLMRuntimeError, match=r"unexpected tensors \['encoder\.layer\.1\.output\.dense\.weight'\]"):
        Bert.from_pretrained(write_model(tmp_path / "extra", cfg, extra))

    with pytest.raises(LLMRuntimeError, match="model.safetensors"):
        Bert.from_pretrained(tmp_path / "nothing-here")


def test_bad_arguments(case):
    _, cfg, _, d = case
    with pytest.raises(ValueError, match="numpy, triton"):
        Bert.from_pretrained(d, backend="cuda")
    with pytest.raises(ValueError, match="float16"):
        Bert.from_pretrained(d, dtype=np.float16)
    model = Bert.from_pretrained(d)
    with pytest.raises(InvalidInputError, match="rectangular"):
        model([[1, 2, 3], [1]])
    with pytest.raises(InvalidInputError, match="max_position_embeddings"):
        model(np.ones((1, cfg["max_position_embeddings"] + 1), dtype=np.int64))
    with pytest.raises(InvalidInputError, match="token ids"):
        model([[1, cfg["vocab_size"]]])
    with pytest.raises(InvalidInputError, match="at least one real token"):
        model([[1, 2], [1, 2]], [[1, 1], [0, 0]])
