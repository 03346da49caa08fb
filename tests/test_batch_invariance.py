"""Batch invariance: a sequence's logits are the same bits alone or in any batch.

`Llama.decode_batch(tokens, caches)` steps B sequences at once, each at its own
position in its own cache; in its default "invariant" mode every row must equal
`Llama.decode(token, cache)` run alone, bit for bit (`np.array_equal`, never a
tolerance), whatever else is in the batch and in whatever order. The schedule below
lets sequences arrive and leave as a continuous-batching server does: batches of every
size 1..8, members at different positions, one joining while another leaves, and the
order of the rows shuffled at every step. The reference is the plain single-sequence
step on a cache of its own, fed the same tokens.

The opt-in "throughput" mode (one matrix-matrix product per matrix) may differ by float
rounding; it is checked against the invariant mode within the tolerance its docstring
states, with the same greedy token wherever the top two logits are not a near tie.
"""

from __future__ import annotations

import numpy as np
import pytest

from refllm.llama import Llama
from tests.llama_util import TINY_CONFIGS, make_tiny_llama

MAX_BATCH = 8


def schedule():
    """[(arrival step, prompt length, steps decoded)] for 12 sequences: sequence k < 8
    arrives at step k and leaves at step 15 - k (the batch grows 1..8 and shrinks back
    to 1); four more of 3 steps arrive at steps 8..11, each as another leaves."""
    ramp = [(k, 1 + (7 * k) % 19, 15 - 2 * k) for k in range(8)]
    churn = [(8 + j, 2 + 5 * j, 3) for j in range(4)]
    return ramp + churn


def run_staggered(model: Llama, mode: str = "invariant", seed: int = 0):
    """Decode the schedule twice, batched and one sequence at a time; yields (step,
    sequence, batched row, alone row, batch size) for every row of every step."""
    rng = np.random.default_rng(seed)
    V = model.config.vocab_size
    seqs = schedule()
    prompts = [list(rng.integers(0, V, size=n)) for _, n, _ in seqs]
    alone = [model.new_cache(64) for _ in seqs]
    batched = [model.new_cache(64) for _ in seqs]
    nxt = {}
    last_step = max(a + n for a, _, n in seqs)
    for step in range(last_step):
        for s, (arrive, _, _) in enumerate(seqs):
            if arrive == step:  # a new sequence: its prompt into both caches, the same call
                first = model(prompts[s], alone[s], last_only=True)[0]
                model(prompts[s], batched[s], last_only=True)
                nxt[s] = int(np.argmax(first))
        live = [s for s, (a, _, n) in enumerate(seqs) if a <= step < a + n]
        live = [live[i] for i in rng.permutation(len(live))]  # any order
        rows = model.decode_batch([nxt[s] for s in live], [batched[s] for s in live], mode=mode)  # [B, V]
        assert rows.shape == (len(live), V) and rows.dtype == model.dtype
        for row, s in zip(rows, live):
            ref = model.decode(nxt[s], alone[s])  # [V]
            yield step, s, row, ref, len(live)
            nxt[s] = int(np.argmax(ref))
    for s in range(len(seqs)):  # the caches hold the same keys and values too (invariant mode: exactly)
        assert batched[s].pos == alone[s].pos
        if mode != "invariant":
            continue
        np.testing.assert_array_equal(batched[s].k[:, :, : alone[s].pos], alone[s].k[:, :, : alone[s].pos])
        np.testing.assert_array_equal(batched[s].v[:, :, : alone[s].pos], alone[s].v[:, :, : alone[s].pos])


def assert_invariant(model: Llama):
    sizes, rows = set(), 0
    for step, s, row, ref, size in run_staggered(model):
        sizes.add(size)
        rows += 1
        if not np.array_equal(row, ref):
            raise AssertionError(f"step {step}, sequence {s} in a batch of {size}: max |d| = "
                                 f"{np.max(np.abs(row - ref)):.3g}, {np.count_nonzero(row != ref)} logits differ")
    assert sizes == set(range(1, MAX_BATCH + 1)), sizes
    assert rows == sum(n for _, _, n in schedule())


@pytest.mark.parametrize("name", ["gqa_tied", "odd_head_dim", "llama3_rope"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiny_batches_are_bit_for_bit_decode(tmp_path, name, dtype):
    model = Llama.from_pretrained(make_tiny_llama(tmp_path / name, TINY_CONFIGS[name]), dtype=dtype)
    assert_invariant(model)


def test_a_head_of_many_blocks_is_still_exact(tmp_path, monkeypatch):
    """The head is taken by blocks of rows (`Llama.head_rows`); with blocks of 64 rows
    a tiny head has several, the last one ragged."""
    monkeypatch.setattr(Llama, "HEAD_BLOCK_BYTES", 64 * 48 * 4)
    config = dict(TINY_CONFIGS["gqa_tied"], vocab_size=229)
    model = Llama.from_pretrained(make_tiny_llama(tmp_path / "m", config))
    assert model.head_block_rows() == 64
    assert_invariant(model)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_real_model_batches_are_bit_for_bit_decode(llama_dir, dtype):
    """SmolLM2-135M, whose matrices are large enough for the BLAS to use its threads."""
    assert_invariant(Llama.from_pretrained(llama_dir, dtype=dtype, backend="numpy"))


# ------------------------------------------------------------------ throughput mode

THROUGHPUT_RTOL = {np.float32: 1e-5, np.float64: 1e-13}  # of the largest |logit|, as Llama.decode_batch says


def assert_throughput_close(model: Llama):
    tol_rel = THROUGHPUT_RTOL[model.dtype.type]
    worst, ties, rows = 0.0, 0, 0
    for step, s, row, ref, size in run_staggered(model, mode="throughput"):
        scale = np.max(np.abs(ref))
        err = np.max(np.abs(row - ref)) / scale
        worst = max(worst, err)
        assert err <= tol_rel, f"step {step}, sequence {s} in a batch of {size}: relative error {err:.3g}"
        top2 = np.sort(ref)[-2:]
        if top2[1] - top2[0] > 2 * tol_rel * scale:  # no near tie: the same greedy token
            assert np.argmax(row) == np.argmax(ref), (step, s)
        else:
            ties += 1
        rows += 1
    print(f"throughput mode, {model.dtype}: worst relative error {worst:.3g}; {ties} near ties in {rows} rows")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiny_throughput_mode_is_close(tmp_path, dtype):
    model = Llama.from_pretrained(make_tiny_llama(tmp_path / "m", TINY_CONFIGS["gqa_tied"]), dtype=dtype)
    assert_throughput_close(model)


@pytest.mark.slow
def test_real_model_throughput_mode_is_close(llama_dir):
    assert_throughput_close(Llama.from_pretrained(llama_dir, backend="numpy"))


# ------------------------------------------------------------------ bad batches

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Llama.from_pretrained(make_tiny_llama(tmp_path_factory.mktemp("m") / "m", TINY_CONFIGS["mha"]))


@pytest.mark.parametrize("mode", ["invariant", "throughput"])
def test_a_bad_batch_is_refused_before_any_cache_moves(tiny, mode):
    a, b, full = tiny.new_cache(8), tiny.new_cache(8), tiny.new_cache(2)
    tiny([1, 2], full)
    with pytest.raises(ValueError, match="KV cache full"):
        tiny.decode_batch([3, 4, 5], [a, b, full], mode=mode)
    with pytest.raises(ValueError, match="out of range"):
        tiny.decode_batch([3, tiny.config.vocab_size], [a, b], mode=mode)
    with pytest.raises(ValueError, match="twice"):
        tiny.decode_batch([3, 4], [a, a], mode=mode)
    with pytest.raises(ValueError, match="2 tokens for 1 caches"):
        tiny.decode_batch([3, 4], [a], mode=mode)
    assert a.pos == b.pos == 0 and full.pos == 2
    assert tiny.decode_batch([], [], mode=mode).shape == (0, tiny.config.vocab_size)


def test_an_unknown_mode_is_refused(tiny):
    with pytest.raises(ValueError, match="unknown decode_batch mode 'fast'"):
        tiny.decode_batch([1], [tiny.new_cache(4)], mode="fast")
