"""The machine's read bandwidth (the decode floor) and the peak memory of `refllm infer`."""

from __future__ import annotations

from refllm import bench

from .conftest import REPORT


def test_read_bandwidth(benchmark):
    """A streaming read of 512 MiB on every core (NumPy sums, one slice per thread)."""
    REPORT.read_bandwidth = benchmark.pedantic(bench.read_bandwidth, rounds=1, iterations=1)
    benchmark.extra_info["GB/s"] = round(REPORT.read_bandwidth / 1e9, 2)


def test_infer_peak_memory(llama_dir, models_root):
    """Peak RSS of `refllm infer` on the default model: at most 1.5x the float32 weights
    (also measured with --backend numpy, which skips the CUDA probe's torch import)."""
    REPORT.peak_rss, REPORT.peak_rss_numpy = bench.infer_peak_rss_both("smollm2-135m-instruct", models_root)
    w = REPORT.weight_bytes
    print(f"peak RSS {REPORT.peak_rss / 1e6:.0f} MB = {REPORT.peak_rss / w:.2f}x the {w / 1e6:.0f} MB of weights "
          f"(--backend numpy: {REPORT.peak_rss_numpy / w:.2f}x)")
    assert REPORT.peak_rss_numpy <= 1.5 * w
    assert REPORT.peak_rss <= 1.5 * w
