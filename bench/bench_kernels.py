"""Benchmarks of every kernel of `refllm.kernels` beside torch's own op, on a CUDA GPU.

    python bench/bench_kernels.py                    # every benchmark, tables on stdout
    python bench/bench_kernels.py --only matmul attention --quick --out bench-out/
    pytest bench/bench_kernels.py                    # the quick set; skipped without CUDA

Each benchmark is a `triton.testing.perf_report` over a sweep of shapes, timed with
`triton.testing.do_bench` (median, with the 20% / 80% quantiles as min / max), and
reports physics rather than milliseconds, beside the device's peak:

- compute-bound work in TFLOP/s: 2 M N K for a matmul; 4 T S HD NH for attention,
  halved for a causal mask (the FLOPs FlashAttention's papers count);
- memory-bound work in GB/s: the bytes that must cross DRAM at least once (norms,
  RoPE, SwiGLU, GELU, decode's single-row matmul reading the weight, decode attention
  reading the KV cache).

Peaks: dense tensor-core TFLOP/s (and float32 non-tensor-core TFLOP/s, since our
float32 products are IEEE float32, not TF32) from the spec sheet of the GPU when it
is in PEAKS, else Triton's estimate from the clocks; DRAM bandwidth both from the
spec sheet and measured here by a device-to-device copy ("copy GB/s", the practical
ceiling of every memory-bound line).

Peers, the same work done by torch in the same run: cuBLAS (`torch.matmul`, TF32 off
for float32), `scaled_dot_product_attention` (its flash / memory-efficient kernels,
`enable_gqa`), `torch.nn.functional.rms_norm` / `layer_norm`, and eager torch for RoPE,
SwiGLU and GELU. Shapes are SmolLM2-135M's and all-MiniLM-L6-v2's (the two default
models) and a Llama-3-8B-like attention, plus square matmuls.

With pandas and matplotlib installed, `perf_report` also writes a CSV and a PNG per
benchmark to --out; without them the same numbers are printed as plain tables.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.testing

QUANTILES = [0.5, 0.2, 0.8]

# Dense (no sparsity) spec-sheet peaks: name fragment -> (bf16/fp16 tensor TFLOP/s, fp32 TFLOP/s, DRAM GB/s).
# Checked in order: the first fragment found in torch.cuda.get_device_name() wins.
PEAKS = [
    ("H200", (989.4, 66.9, 4800)),
    ("H100 PCIe", (756.0, 51.2, 2000)),
    ("H100 NVL", (835.0, 60.0, 3900)),
    ("H100", (989.4, 66.9, 3350)),  # SXM5
    ("A100-SXM4-80GB", (312.0, 19.5, 2039)),
    ("A100-SXM4-40GB", (312.0, 19.5, 1555)),
    ("A100 80GB PCIe", (312.0, 19.5, 1935)),
    ("A100", (312.0, 19.5, 1555)),
    ("L40S", (362.0, 91.6, 864)),
    ("L4", (121.0, 30.3, 300)),
]

_device: dict = {}  # filled by device_peaks()


def device_peaks() -> dict:
    """The GPU's name and peaks, and the DRAM bandwidth a copy achieves (once)."""
    if _device:
        return _device
    name = torch.cuda.get_device_name()
    spec = next((p for frag, p in PEAKS if frag in name), None)
    if spec is None:  # Triton's estimates from the SM clock and the memory bus
        props = triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())
        clock = props["sm_clock_rate"]
        spec = (triton.testing.get_max_tensorcore_tflops(torch.float16, clock),
                triton.testing.get_max_simd_tflops(torch.float32, clock), triton.testing.get_dram_gbps())
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), quantiles=[0.5])
    copy_gbps = 2 * src.numel() / (ms * 1e-3) / 1e9
    del src, dst
    _device.update(name=name, tensor_tflops=spec[0], fp32_tflops=spec[1], dram_gbps=spec[2], copy_gbps=copy_gbps)
    return _device


def _kernels():
    import refllm.kernels as kn

    return kn


def timed(fn, work: float, unit: float):
    """do_bench's quantiles of fn, as work / time in units (1e12 for TFLOP/s, 1e9 for GB/s)."""
    ms, lo, hi = triton.testing.do_bench(fn, quantiles=QUANTILES)
    perf = lambda t: work / (t * 1e-3) / unit  # noqa: E731
    return perf(ms), perf(hi), perf(lo)


def _bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _dt(name: str) -> torch.dtype:
    return getattr(torch, name)


# ------------------------------------------------------------------------------ matmul

SMOLLM2_LINEARS = {  # name: (N, K) of x @ W.T, W [N, K]
    "qkv 960x576": (960, 576),
    "o 576x576": (576, 576),
    "gate_up 3072x576": (3072, 576),
    "down 576x1536": (576, 1536),
    "lm_head 49152x576": (49152, 576),
}


@triton.testing.perf_report([
    triton.testing.Benchmark(
        x_names=["M", "N", "K"], x_vals=[512, 1024, 2048, 4096, 8192], line_arg="provider",
        line_vals=["triton", "cublas"], line_names=["refllm matmul", "cuBLAS"],
        plot_name=f"matmul-square-{dt}", ylabel="TFLOP/s", args={"dtype": dt})
    for dt in ("bfloat16", "float16", "float32")
])
def bench_matmul_square(M, N, K, dtype, provider):
    dt = _dt(dtype)
    x, w = torch.randn((M, K), device="cuda", dtype=dt), torch.randn((N, K), device="cuda", dtype=dt)
    fn = (lambda: _kernels().matmul(x, w)) if provider == "triton" else (lambda: torch.matmul(x, w.T))
    return timed(fn, 2.0 * M * N * K, 1e12)


@triton.testing.perf_report([
    triton.testing.Benchmark(
        x_names=["layer"], x_vals=list(SMOLLM2_LINEARS), line_arg="provider",
        line_vals=["triton", "cublas"], line_names=["refllm matmul (split-K)", "cuBLAS"],
        plot_name=f"matmul-decode-smollm2-{dt}", ylabel="GB/s (weight read once)", args={"dtype": dt})
    for dt in ("float32", "bfloat16")
])
def bench_matmul_decode(layer, dtype, provider):
    """Decode's one row: x [1, K] @ W.T, bound by reading W once."""
    N, K = SMOLLM2_LINEARS[layer]
    dt = _dt(dtype)
    x, w = torch.randn((1, K), device="cuda", dtype=dt), torch.randn((N, K), device="cuda", dtype=dt)
    fn = (lambda: _kernels().matmul(x, w)) if provider == "triton" else (lambda: torch.matmul(x, w.T))
    return timed(fn, _bytes(x, w) + N * x.element_size(), 1e9)


@triton.testing.perf_report([
    triton.testing.Benchmark(
        x_names=["M"], x_vals=[16, 64, 256, 1024, 4096], line_arg="provider",
        line_vals=["triton-fused", "torch"], line_names=["refllm matmul act=swiglu", "cuBLAS + silu * up"],
        plot_name=f"matmul-swiglu-smollm2-{dt}", ylabel="TFLOP/s", args={"dtype": dt, "N": 1536, "K": 576})
    for dt in ("float32", "bfloat16")
])
def bench_matmul_swiglu(M, N, K, dtype, provider):
    """The MLP's gate/up projection with SwiGLU in the epilogue, against cuBLAS then eager torch."""
    dt = _dt(dtype)
    x, w = torch.randn((M, K), device="cuda", dtype=dt), torch.randn((2 * N, K), device="cuda", dtype=dt)

    def eager():
        g, u = torch.matmul(x, w.T).chunk(2, dim=-1)
        return torch.nn.functional.silu(g) * u

    fn = (lambda: _kernels().matmul(x, w, act="swiglu")) if provider == "triton-fused" else eager
    return timed(fn, 2.0 * M * 2 * N * K, 1e12)


# ------------------------------------------------------------------------------ norms, RoPE, elementwise

@triton.testing.perf_report([
    triton.testing.Benchmark(
        x_names=["D"], x_vals=[384, 576, 1024, 2048, 4096, 8192], line_arg="provider",
        line_vals=["triton", "torch", "triton-residual", "torch-residual"],
        line_names=["rms_norm", "F.rms_norm", "rms_norm(residual += x)", "add + F.rms_norm"],
        plot_name=f"rms_norm-{dt}", ylabel="GB/s", args={"dtype": dt, "R": 4096})
    for dt in ("float32", "bfloat16")
])
def bench_rms_norm(R, D, dtype, provider):
    dt = _dt(dtype)
    x, r = torch.randn((R, D), device="cuda", dtype=dt), torch.randn((R, D), device="cuda", dtype=dt)
    w = torch.randn(D, device="cuda", dtype=dt)
    kn = _kernels()
    if provider == "triton":
        return timed(lambda: kn.rms_norm(x, w, 1e-5), 2 * _bytes(x), 1e9)
    if provider == "torch":
        return timed(lambda: torch.nn.functional.rms_norm(x, (D,), w, 1e-5), 2 * _bytes(x), 1e9)
    if provider == "triton-residual":  # reads x, r; writes r, y
        return timed(lambda: kn.rms_norm(x, w, 1e-5, residual=r), 4 * _bytes(x), 1e9)

    def eager():
        r.add_(x)
        return torch.nn.functional.rms_norm(r, (D,), w, 1e-5)

    return timed(eager, 4 * _bytes(x), 1e9)  # the same necessary bytes, whatever eager moves


@triton.testing.perf_report([
    triton.testing.Benchmark(
        x_names=["H"], x_vals=[384, 768, 1024, 2048, 4096], line_arg="provider",
        line_vals=["triton", "torch", "triton-residual", "torch-residual"],
        line_names=["layer_norm", "F.layer_norm", "layer_norm(x + residual)", "add + F.layer_norm"],
        plot_name=f"layer_norm-{dt}", ylabel="GB/s", args={"dtype": dt, "R": 4096})
    for dt in ("float32", "bfloat16")
])
def bench_layer_norm(R, H, dtype, provider):
    dt = _dt(dtype)
    x, r = torch.randn((R, H), device="cuda", dtype=dt), torch.randn((R, H), device="cuda", dtype=dt)
    w, b = torch.randn(H, device="cuda", dtype=dt), torch.randn(H, device="cuda", dtype=dt)
    kn, F = _kernels(), torch.nn.functional
    fns = {
        "triton": (lambda: kn.layer_norm(x, w, b, 1e-12), 2),
        "torch": (lambda: F.layer_norm(x, (H,), w, b, 1e-12), 2),
        "triton-residual": (lambda: kn.layer_norm(x, w, b, 1e-12, residual=r), 3),
        "torch-residual": (lambda: F.layer_norm(x + r, (H,), w, b, 1e-12), 3),
    }
    fn, passes = fns[provider]
    return timed(fn, passes * _bytes(x), 1e9)


@triton.testing.perf_report([
    triton.testing.Benchmark(
        x_names=["T"], x_vals=[128, 512, 2048, 8192], line_arg="provider",
        line_vals=["triton", "torch"], line_names=["rope", "eager rotate-half"],
        plot_name="rope-float32", ylabel="GB/s", args={"N": 12, "HD": 64})
])
def bench_rope(T, N, HD, provider):
    """q and k of SmolLM2 (9 + 3 heads of 64), rotated in place."""
    x = torch.randn((T, N, HD), device="cuda")
    cos, sin = torch.randn((T, HD), device="cuda"), torch.randn((T, HD), device="cuda")
    kn = _kernels()

    def eager():
        x1, x2 = x[..., : HD // 2], x[..., HD // 2 :]
        return x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]

    fn = (lambda: kn.rope(x, cos, sin, out=x)) if provider == "triton" else eager
    return timed(fn, 2 * _bytes(x) + _bytes(cos, sin), 1e9)


@triton.testing.perf_report([
    triton.testing.Benchmark(
        x_names=["n"], x_vals=[2**k for k in (16, 20, 24, 26)], line_arg="provider",
        line_vals=["swiglu", "torch-swiglu", "gelu", "torch-gelu", "gelu_tanh", "torch-gelu_tanh"],
        line_names=["swiglu", "F.silu(g) * u", "gelu", "F.gelu", "gelu tanh", "F.gelu(tanh)"],
        plot_name=f"activations-{dt}", ylabel="GB/s", args={"dtype": dt})
    for dt in ("float32", "bfloat16")
])
def bench_activations(n, dtype, provider):
    dt = _dt(dtype)
    g, u = torch.randn(n, device="cuda", dtype=dt), torch.randn(n, device="cuda", dtype=dt)
    kn, F = _kernels(), torch.nn.functional
    fns = {
        "swiglu": (lambda: kn.swiglu(g, u), 3), "torch-swiglu": (lambda: F.silu(g) * u, 3),
        "gelu": (lambda: kn.gelu(g), 2), "torch-gelu": (lambda: F.gelu(g), 2),
        "gelu_tanh": (lambda: kn.gelu(g, "tanh"), 2), "torch-gelu_tanh": (lambda: F.gelu(g, approximate="tanh"), 2),
    }
    fn, passes = fns[provider]
    return timed(fn, passes * _bytes(g), 1e9)


# ------------------------------------------------------------------------------ attention

ATTN_MODELS = {"smollm2": (9, 3, 64), "llama3-8b": (32, 8, 128)}  # NH, NKV, HD


@triton.testing.perf_report([
    triton.testing.Benchmark(
        x_names=["T"], x_vals=[128, 512, 1024, 2048, 4096, 8192], line_arg="provider",
        line_vals=["triton", "sdpa"], line_names=["causal_attention", "SDPA (is_causal, enable_gqa)"],
        plot_name=f"prefill-attention-{m}-{dt}", ylabel="TFLOP/s", args={"model": m, "dtype": dt})
    for m in ATTN_MODELS for dt in ("bfloat16", "float32")
])
def bench_prefill_attention(T, model, dtype, provider):
    NH, NKV, HD = ATTN_MODELS[model]
    dt = _dt(dtype)
    q = torch.randn((T, NH, HD), device="cuda", dtype=dt)
    k, v = torch.randn((T, NKV, HD), device="cuda", dtype=dt), torch.randn((T, NKV, HD), device="cuda", dtype=dt)
    flops = 4.0 * T * T * HD * NH / 2  # causal: half the score matrix
    if provider == "triton":
        return timed(lambda: _kernels().causal_attention(q, k, v, 0), flops, 1e12)
    qt, kt, vt = (a.transpose(0, 1)[None] for a in (q, k, v))  # [1, heads, T, HD]
    F = torch.nn.functional
    return timed(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True), flops, 1e12)


@triton.testing.perf_report([
    triton.testing.Benchmark(
        x_names=["S"], x_vals=[512, 2048, 8192, 32768], line_arg="provider",
        line_vals=["triton", "sdpa"], line_names=["decode_attention (split)", "SDPA (enable_gqa)"],
        plot_name=f"decode-attention-{m}-{dt}", ylabel="GB/s (KV cache read once)", args={"model": m, "dtype": dt})
    for m in ATTN_MODELS for dt in ("bfloat16", "float32")
])
def bench_decode_attention(S, model, dtype, provider):
    NH, NKV, HD = ATTN_MODELS[model]
    dt = _dt(dtype)
    q = torch.randn((1, NH, HD), device="cuda", dtype=dt)
    k, v = torch.randn((S, NKV, HD), device="cuda", dtype=dt), torch.randn((S, NKV, HD), device="cuda", dtype=dt)
    work = _bytes(k, v)
    if provider == "triton":
        return timed(lambda: _kernels().decode_attention(q, k, v), work, 1e9)
    qt, kt, vt = (a.transpose(0, 1)[None] for a in (q, k, v))
    F = torch.nn.functional
    return timed(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True), work, 1e9)


@triton.testing.perf_report([
    triton.testing.Benchmark(
        x_names=["T"], x_vals=[32, 128, 256, 512], line_arg="provider",
        line_vals=["triton", "sdpa"], line_names=["masked_attention", "SDPA (bool mask)"],
        plot_name=f"bert-attention-minilm-{dt}", ylabel="TFLOP/s", args={"B": 32, "NH": 12, "HD": 32, "dtype": dt})
    for dt in ("float32", "bfloat16")
])
def bench_masked_attention(B, T, NH, HD, dtype, provider):
    """all-MiniLM-L6-v2's attention on a batch padded to T, a quarter of it padding."""
    dt = _dt(dtype)
    q, k, v = (torch.randn((B, NH, T, HD), device="cuda", dtype=dt) for _ in range(3))
    lengths = torch.randint(T // 2, T + 1, (B,), device="cuda")
    mask = torch.arange(T, device="cuda")[None, :] < lengths[:, None]  # [B, T]
    flops = 4.0 * B * NH * T * T * HD
    if provider == "triton":
        return timed(lambda: _kernels().masked_attention(q, k, v, mask), flops, 1e12)
    F = torch.nn.functional
    return timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :]), flops, 1e12)


BENCHES = {
    "matmul": [bench_matmul_square, bench_matmul_decode, bench_matmul_swiglu],
    "norms": [bench_rms_norm, bench_layer_norm],
    "rope": [bench_rope],
    "activations": [bench_activations],
    "attention": [bench_prefill_attention, bench_decode_attention, bench_masked_attention],
}


# ------------------------------------------------------------------------------ running

def _peak_note(bench) -> str:
    p = device_peaks()
    if "TFLOP" in bench.ylabel:
        fp32 = bench.args.get("dtype") == "float32"
        peak = p["fp32_tflops"] if fp32 else p["tensor_tflops"]
        return f"peak {peak:g} TFLOP/s ({'fp32 non-tensor' if fp32 else 'tensor, dense'})"
    return f"peak {p['dram_gbps']:g} GB/s spec, {p['copy_gbps']:.0f} GB/s measured copy"


def _run_plain(mark, quick: bool) -> None:
    """perf_report's sweep without pandas: one plain table per benchmark."""
    for bench in mark.benchmarks:
        xs = bench.x_vals[:2] if quick else bench.x_vals
        print(f"\n{bench.plot_name}: {bench.ylabel}; {_peak_note(bench)}")
        print(" ".join(f"{n:>10}" for n in bench.x_names) + "".join(f"{n[:28]:>30}" for n in bench.line_names))
        for x in xs:
            x_args = dict(zip(bench.x_names, x if isinstance(x, (list, tuple)) else [x] * len(bench.x_names)))
            row = [mark.fn(**x_args, **{bench.line_arg: y}, **bench.args)[0] for y in bench.line_vals]
            print(" ".join(f"{str(v):>10}" for v in x_args.values()) + "".join(f"{v:>30.1f}" for v in row))
            sys.stdout.flush()


def run(only=None, quick: bool = False, out: str | None = None) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels: no CUDA device; the kernels' benchmarks need a GPU "
                         "(tests/test_kernels.py checks them on the CPU under TRITON_INTERPRET=1)")
    torch.backends.cuda.matmul.allow_tf32 = False  # cuBLAS in IEEE float32, as our float32 path
    p = device_peaks()
    print(f"{p['name']}: {p['tensor_tflops']:g} TFLOP/s tensor (dense), {p['fp32_tflops']:g} TFLOP/s fp32, "
          f"{p['dram_gbps']:g} GB/s DRAM spec, {p['copy_gbps']:.0f} GB/s measured copy; "
          f"torch {torch.__version__}, triton {triton.__version__}")
    try:
        import matplotlib  # noqa: F401
        import pandas  # noqa: F401
        have_report = out is not None
    except ImportError:
        have_report = False
    for group, marks in BENCHES.items():
        if only and group not in only:
            continue
        for mark in marks:
            if have_report and not quick:
                for bench in mark.benchmarks:
                    bench.ylabel = f"{bench.ylabel}; {_peak_note(bench)}"
                mark.run(print_data=True, save_path=out)
            else:
                _run_plain(mark, quick)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=list(BENCHES), help="benchmark groups to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="the first two shapes of each sweep")
    ap.add_argument("--out", help="folder for perf_report's CSV and PNG files (needs pandas and matplotlib)")
    args = ap.parse_args(argv)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    run(args.only, args.quick, args.out)


def test_benchmarks_quick():
    """`pytest bench/bench_kernels.py`: the quick sweep, skipped without CUDA."""
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the kernel benchmarks need a GPU")
    run(quick=True)


if __name__ == "__main__":
    main()
