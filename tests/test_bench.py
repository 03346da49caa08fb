"""refllm.bench on tiny models: the F32 GGUF round trip, the cost model, the report."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from refllm import bench
from refllm.config import LlamaConfig
from refllm.llama import Llama
from tests.tiny_models import make_tiny_llm


def test_permute_for_gguf_is_the_inverse_of_unpermute():
    from refllm.weights.gguf_to_hf import unpermute
    from refllm.weights.hf_to_gguf import permute_for_gguf

    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3 * 8, 5)  # 3 heads of 8 rows
    assert not np.array_equal(permute_for_gguf(w, 3), w)
    np.testing.assert_array_equal(unpermute(permute_for_gguf(w, 3), 3), w)


def test_f32_gguf_round_trips_through_the_converter(tmp_path):
    """Written from safetensors, read back by refllm's own GGUF -> HF converter: the same
    float32 tensors, bit for bit, and the same tokenizer."""
    pytest.importorskip("gguf")
    from tokenizers import Tokenizer

    from refllm.checkpoint import load_checkpoint
    from refllm.weights.gguf_to_hf import convert
    from refllm.weights.hf_to_gguf import write_f32_gguf

    src = make_tiny_llm(tmp_path / "models")
    path = write_f32_gguf(src, tmp_path / "tiny-f32.gguf")
    out = tmp_path / "back"
    out.mkdir()
    convert(path, out)
    theirs, ours = load_checkpoint(out), load_checkpoint(src)
    assert set(theirs) == set(ours)
    for name in ours:
        np.testing.assert_array_equal(theirs[name], ours[name], err_msg=name)
    text = "The quick brown fox, 1234 naïve café"
    ids = Tokenizer.from_file(str(src / "tokenizer.json")).encode(text).ids
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode(text).ids == ids


def test_llama_costs_of_smollm2():
    c = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    bytes_per_token, flops, weight_bytes = bench.llama_costs(c, 128, 128)
    assert weight_bytes == 4 * 134_515_008  # SmolLM2-135M's parameter count
    assert weight_bytes < bytes_per_token < 1.03 * weight_bytes  # + the KV cache
    layers = 134_515_008 - 49152 * 576  # the embedding is a gather, bar the last position's head
    assert 2 * 128 * layers < flops < 1.05 * 2 * 128 * layers  # + attention and the head


def test_run_and_report_on_a_tiny_model(tmp_path, monkeypatch):
    probes = []

    class FakeProbe(bench.ReadBandwidth):  # 20, 30, 40 ... GB/s, from a small array
        def __init__(self):
            super().__init__(nbytes=1 << 20)
            probes.append(self)

        def sample(self):
            super().sample()
            self.samples[-1] = 10e9 * (len(self.samples) + 1)
            return self.samples[-1]

    monkeypatch.setattr(bench.runner, "ReadBandwidth", FakeProbe)
    d = make_tiny_llm(tmp_path / "models", context=300)
    report = bench.run(d, None, rounds=3, engines=[bench.REFLLM], tasks=["prefill", "decode"], log=lambda s: None)
    # One probe, sampled after each of the 3 decode turns (its warm-up sample dropped).
    assert len(probes) == 1 and probes[0].samples == [20e9, 30e9, 40e9]
    assert report.read_bandwidth == 40e9 and report.isolated  # the best sample; the engine ran in a child process
    assert [(r.task, r.engine, len(r.seconds)) for r in report.results] == [
        ("prefill", bench.REFLLM, 3), ("decode", bench.REFLLM, 3)]
    assert all(r.rate > 0 for r in report.results)
    # A peer's row and the ratio column, with made-up seconds.
    report.results.append(bench.Result("decode", bench.LLAMA_CPP, 128, "tok/s", seconds=[1.0]))
    report.results.append(bench.Result("decode", bench.TRANSFORMERS, 128, "tok/s", skipped="not installed (torch)"))
    table = bench.format_report(report)
    ours = report.rate("decode", bench.REFLLM)
    assert f"| {ours / 128:.2f}× |" in table
    assert "skipped: not installed (torch)" in table
    assert "GB/s" in table and "GFLOP/s" in table
    if pytest.importorskip("matplotlib"):
        png = bench.write_chart(report, tmp_path / "chart.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_in_process_run_says_so(tmp_path):
    d = make_tiny_llm(tmp_path / "models", context=300)
    report = bench.run(d, None, rounds=1, engines=[bench.REFLLM], tasks=["prefill"], isolate=False, log=lambda s: None)
    assert not report.isolated and [r.task for r in report.results if r.seconds] == ["prefill"]
    assert "All engines ran in one process" in bench.format_report(report)
    report.isolated = True
    assert "Each engine ran in a process of its own" in bench.format_report(report)


def test_engine_process_times_rounds_and_survives_a_bad_request(tmp_path):
    d = make_tiny_llm(tmp_path / "models", context=300)
    engine, skipped = bench.EngineProcess.start("llm", bench.REFLLM, d, 1)
    assert skipped is None
    try:
        assert engine.process.pid != os.getpid() and engine.process.is_alive()
        with pytest.raises(RuntimeError, match="unknown task 'embed'"):
            engine.time("embed")
        assert engine.time("decode") > 0 and engine.time("prefill") > 0  # still serving
    finally:
        engine.close()
    assert not engine.process.is_alive() and engine.process.exitcode == 0


def test_engine_process_that_dies_mid_round_is_named_with_its_exit_code(tmp_path):
    d = make_tiny_llm(tmp_path / "models", context=300)
    engine, _ = bench.EngineProcess.start("llm", bench.REFLLM, d, 1)
    try:
        engine.process.kill()
        with pytest.raises(RuntimeError, match=r"refllm bench: refllm \(NumPy\): its process exited with code -9"):
            engine.time("decode")
    finally:
        engine.close()


def test_engine_process_that_cannot_load_is_skipped_with_the_reason(tmp_path):
    engine, skipped = bench.EngineProcess.start("llm", bench.REFLLM, tmp_path / "no-such-model", 1)
    assert engine is None and skipped.startswith("failed to load: ") and "no-such-model" in skipped


def test_greedy_tokens_of_the_refllm_engine_match_the_model(tmp_path):
    d = make_tiny_llm(tmp_path / "models", context=64)
    engine = bench.RefllmLLM(d)
    ids = [0, 5, 9, 13, 7]
    tokens = bench.greedy_tokens(engine, ids, 4)
    model, seq = Llama.from_pretrained(d), list(ids)
    for t in tokens:
        assert int(np.argmax(model(seq)[-1])) == t
        seq.append(t)


def test_bench_command_line_rejects_unknown_choices(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_bench_arguments(parser)
    assert bench.bench_from_args(parser.parse_args(["--engines", "refllm,nope"])) == 2
    assert "unknown choice 'nope'" in capsys.readouterr().err
    assert bench.bench_from_args(parser.parse_args(["--rounds", "0"])) == 2
    assert bench._pick("LLAMA,refllm", bench.ALL_ENGINES) == [bench.LLAMA_CPP, bench.REFLLM]


def test_read_bandwidth_is_the_best_of_its_samples():
    probe = bench.ReadBandwidth(nbytes=8 << 20, threads=2)
    rates = [probe.sample() for _ in range(3)]
    assert all(r > 1e8 for r in rates) and probe.best() == max(rates) and probe.median() == sorted(rates)[1]
    assert bench.read_bandwidth(nbytes=8 << 20, passes=3) > 1e8


def test_read_bandwidth_sample_is_its_fastest_reader():
    probe = bench.ReadBandwidth(nbytes=8 << 20, threads=2)
    assert probe.a.shape == (2048, 1024) and probe.a.flags.f_contiguous  # 8 MiB, slices of columns
    assert all(s.flags.f_contiguous for s in probe.slices) and sum(s.shape[1] for s in probe.slices) == 1024
    probe.readers = {"slow": lambda pool: time.sleep(0.2), "fast": lambda pool: time.sleep(0.05)}
    rate = probe.sample()
    assert probe.a.nbytes / 0.2 < rate <= probe.a.nbytes / 0.05


# ------------------------------------------------------------------ the bandwidth figure (issue 17, item 12)

def _decode_report(probe_best: float, rounds_s: list[float], bpt: float = 1e9):
    report = bench.Report(results=[bench.Result("decode", bench.REFLLM, 100, "tok/s", seconds=rounds_s)],
                          machine={}, decode_bytes_per_token=bpt)
    bench.settle_bandwidth(report, probe_best)
    return report


def test_no_decode_round_reads_faster_than_the_reported_bandwidth():
    """A probe that read slowly (a busy minute) against decode rounds in a quiet one: the
    old report printed the median probe and "122% of measured". The fastest decode round
    (100 tokens x 1 GB in 4 s = 25 GB/s) is itself a reader and sets the figure."""
    report = _decode_report(probe_best=20e9, rounds_s=[5.0, 4.0, 4.5])
    assert report.read_bandwidth == pytest.approx(25e9) and report.read_bandwidth_probe == 20e9
    assert "fastest decode round (refllm (NumPy))" in report.read_bandwidth_note and "20.0 GB/s" in report.read_bandwidth_note
    table = bench.format_report(report)
    assert "(89% of measured)" in table  # the median round, 100 / 4.5 s x 1 GB, of 25 GB/s
    assert "fastest decode round" in table


def test_a_faster_probe_keeps_its_figure():
    report = _decode_report(probe_best=40e9, rounds_s=[5.0, 4.0, 4.5])
    assert report.read_bandwidth == 40e9 and not report.read_bandwidth_note
    assert "(56% of measured)" in bench.format_report(report)


def test_a_share_above_100_percent_is_called_unreliable():
    """A report put together without settle_bandwidth (an old JSON, a hand-made one)."""
    report = bench.Report(results=[bench.Result("decode", bench.REFLLM, 100, "tok/s", seconds=[4.0])], machine={},
                          decode_bytes_per_token=1e9, read_bandwidth=20e9)
    table = bench.format_report(report)
    assert "above the measured bandwidth: that figure is unreliable" in table and "125%" not in table


def test_run_settles_the_bandwidth_above_a_slow_probe(tmp_path, monkeypatch):
    """The whole run with a probe that reads 1 kB/s: every decode figure stays <= 100%."""
    class SlowProbe(bench.ReadBandwidth):
        def __init__(self):
            super().__init__(nbytes=1 << 20)

        def sample(self):
            super().sample()
            self.samples[-1] = 1e3
            return 1e3

    monkeypatch.setattr(bench.runner, "ReadBandwidth", SlowProbe)
    d = make_tiny_llm(tmp_path / "models", context=300)
    report = bench.run(d, None, rounds=2, engines=[bench.REFLLM], tasks=["decode"], isolate=False, log=lambda s: None)
    (decode,) = report.results
    assert report.read_bandwidth_probe == 1e3
    assert report.read_bandwidth == pytest.approx(decode.best_rate * report.decode_bytes_per_token)
    assert decode.rate * report.decode_bytes_per_token <= report.read_bandwidth
    share = bench.format_report(report).split("GB/s (")[-1]
    assert int(share.split("%")[0]) <= 100


# ------------------------------------------------------------------ streams (issue 14)

def test_streams_are_measured_in_turns_and_reported_side_by_side(tmp_path):
    d = make_tiny_llm(tmp_path / "models", context=300)
    report = bench.run(d, None, rounds=2, engines=[bench.REFLLM, bench.LLAMA_CPP], tasks=["streams"],
                       streams=[1, 3], isolate=False, log=lambda s: None)
    assert [(r.task, r.engine, r.units, len(r.seconds)) for r in report.results] == [
        (bench.streams_task(n, mode), bench.REFLLM, n * bench.STREAM_STEPS, 2)
        for n in (1, 3) for mode in bench.STREAM_MODES]  # refllm alone: the peers have no decode_batch
    streams = report.streams()
    assert set(streams) == {"invariant", "throughput"} and all(list(r) == [1, 3] for r in streams.values())
    table = bench.format_report(report)
    assert "| streams | invariant (default) | × 1 stream | throughput | × 1 stream |" in table
    assert "| streams 3 invariant |" not in table  # not in the per-engine table too
    one = streams["invariant"][1]
    assert f"| 3 | {streams['invariant'][3]:.1f} tok/s | {streams['invariant'][3] / one:.2f}× |" in table
    if pytest.importorskip("matplotlib"):
        png = bench.write_chart(report, tmp_path / "streams.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_streams_decodes_what_decode_batch_decodes(tmp_path):
    """The streams round runs the real thing: n copies of the prompt's cache stepped
    together, each advanced by STREAM_STEPS."""
    d = make_tiny_llm(tmp_path / "models", context=300)
    engine = bench.RefllmLLM(d)
    calls = []
    real = engine.model.decode_batch

    def spy(tokens, caches, mode):
        calls.append((len(tokens), mode, [c.pos for c in caches]))
        return real(tokens, caches, mode)

    engine.model.decode_batch = spy
    assert engine.time_streams([0, 5, 9], 4, "throughput", steps=3) > 0
    assert calls == [(4, "throughput", [3 + i] * 4) for i in range(3)]


def test_bench_command_line_streams(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_bench_arguments(parser)
    for bad in ("0,2", "two", ","):
        assert bench.bench_from_args(parser.parse_args(["--streams", bad, "--no-pull"])) == 2
        assert "--streams takes stream counts" in capsys.readouterr().err
    assert bench.bench_from_args(parser.parse_args(["--streams", "1,2", "--stream-modes", "fast"])) == 2
    assert "unknown choice 'fast'" in capsys.readouterr().err
