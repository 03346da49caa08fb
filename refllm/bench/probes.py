"""The machine and the physics `refllm bench` reports its rates against.

    machine_info()        CPU, cores, BLAS and load average
    ReadBandwidth         the machine's streaming read bandwidth, sampled between rounds
    llama_costs(config)   bytes a decode step reads, FLOPs of a prefill, weight bytes
    infer_peak_rss(model) peak resident memory of `refllm infer`, in a child process

The physics (as gpt-fast reports it): decoding one token reads every weight once (the
tied lm_head included; the embedding row gather is negligible) plus the KV cache, so

    achieved read bandwidth = decode tokens/s x bytes read per token
    bandwidth floor         = machine read bandwidth / bytes read per token   (tokens/s)
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def n_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_info() -> dict:
    info = {"cpu": _cpu_name(), "cores": n_threads(), "python": platform.python_version(), "numpy": np.__version__}
    try:
        from threadpoolctl import threadpool_info

        blas = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        blas.sort(key=lambda p: "numpy" not in str(p.get("filepath", "")))  # NumPy's own BLAS first
        if blas:
            b = blas[0]
            info["blas"] = f"{b.get('internal_api')} {b.get('version')} ({b.get('architecture')}, {b.get('num_threads')} threads)"
    except ImportError:
        pass
    try:
        info["load average"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------ read bandwidth

class ReadBandwidth:
    """The machine's streaming read bandwidth, sampled in bytes/s.

    An array far larger than the caches, on huge pages like the Llama's weights
    (`WeightArena`: on 4 KiB pages the TLB walks cost a fifth of the rate), is read by
    three readers: NumPy's sum and a one-thread BLAS matrix-vector product, each run by
    one thread per core over its own slice (NumPy and the BLAS release the GIL), and one
    matrix-vector product over the whole array on the BLAS's own threads, the kernel a
    decode step streams its weights with. The array is column-major [n, 1024], so a
    thread's slice of columns is contiguous. `sample()` reads it once with each and
    returns the fastest rate: any reader that reaches a rate proves the memory delivers
    it. (NumPy's pairwise float32 sum tops out near 14 GB/s a core; the products reach
    what the memory gives.)

    The bandwidth a shared VM gets moves by a third from minute to minute (26 to 43
    GB/s seen on one machine in one hour), so `run` samples it between the decode rounds
    of the engines, in the same turns, and takes the best sample (`best`), for the same
    reason `sample` takes the fastest reader: a read that reached a rate proves the
    memory delivers it, and a slow sample only shows that something else was reading.
    (The median of the samples once stood in the report; a decode round in a quiet
    minute then "reached" 122% of it. `runner.settle_bandwidth` also raises the figure
    to any decode round that read faster than every sample, so no engine can show more
    than 100% of it.)
    """

    def __init__(self, nbytes: int = 512 * 2**20, threads: int | None = None):
        from ..checkpoint import WeightArena

        self.threads = threads or n_threads()
        self.a = WeightArena().empty((max(nbytes // 4096, 1), 1024), np.float32, order="F")  # [n, 1024]
        self.a[...] = 1  # touched once, so the pages exist
        self.slices = [self.a[:, part] for part in np.array_split(np.arange(1024), self.threads)]  # contiguous
        x = np.ones(1024, dtype=np.float32)  # [1024]
        self.readers = {  # name -> read(pool), one pass over the array
            "NumPy sum, a thread per core": lambda pool: list(pool.map(np.sum, self.slices)),
            "BLAS gemv on 1 thread, a thread per core": lambda pool: list(pool.map(lambda s: s @ x[: s.shape[1]], self.slices)),
            "BLAS gemv on the BLAS's threads": lambda pool: self.a @ x,
        }
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # without it the per-core BLAS reader would run threads x BLAS threads
            del self.readers["BLAS gemv on 1 thread, a thread per core"]
            threadpool_limits = None
        self.threadpool_limits = threadpool_limits
        self.samples: list[float] = []

    def sample(self) -> float:
        best = float("inf")
        with ThreadPoolExecutor(self.threads) as pool:
            for name, read in self.readers.items():
                limits = self.threadpool_limits(1) if name.startswith("BLAS gemv on 1 thread") else None
                try:
                    t0 = time.perf_counter()
                    read(pool)
                    best = min(best, time.perf_counter() - t0)
                finally:
                    if limits is not None:
                        limits.restore_original_limits()
        self.samples.append(self.a.nbytes / best)
        return self.samples[-1]

    def best(self) -> float:
        return max(self.samples)

    def median(self) -> float:
        return statistics.median(self.samples)


def read_bandwidth(nbytes: int = 512 * 2**20, passes: int = 7, threads: int | None = None) -> float:
    """The best of `passes` samples of `ReadBandwidth`, after one warm-up pass."""
    probe = ReadBandwidth(nbytes, threads)
    probe.sample()
    probe.samples.clear()
    for _ in range(passes):
        probe.sample()
    return probe.best()


def llama_costs(config, prompt_tokens: int, decode_tokens: int) -> tuple[float, float, int]:
    """(bytes read per decoded token, FLOPs of a prefill, float32 weight bytes) of a Llama.

    Weights: every projection of every layer, the norms, and the lm_head (the embedding
    matrix again when tied: read whole by the head, once per token). KV cache: K and V of
    every earlier position, averaged over the decode steps.
    """
    c = config
    D, F, V, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    NH, NKV, HD = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    per_layer = D * (NH + 2 * NKV) * HD + NH * HD * D + 3 * D * F  # projection weights
    weights_read = L * (per_layer + 2 * D) + D + V * D  # + norms, final norm, lm_head
    stored = weights_read + (0 if c.tie_word_embeddings else V * D)  # + a separate embedding
    mean_pos = prompt_tokens + (decode_tokens - 1) / 2
    kv_read = L * 2 * NKV * HD * mean_pos
    T = prompt_tokens
    prefill_flops = 2 * T * L * per_layer + 2 * V * D  # projections; the head for the last position
    prefill_flops += L * 2 * 2 * NH * HD * T * (T + 1) / 2  # q k^T and p v over the causal triangle
    return 4.0 * (weights_read + kv_read), float(prefill_flops), 4 * stored


# The child reports its own peak: on Linux /proc/self/status VmHWM, the high-water mark
# of its own address space since exec. (The parent's view, wait4's ru_maxrss, also
# counts the address space the child had before exec, the parent's copy when forked
# from a big process such as a benchmark with three models loaded.)
_PEAK_RSS_CHILD = """
import sys
from refllm.cli import main
code = main(sys.argv[1:])
try:
    status = open("/proc/self/status").read()
    peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
except (OSError, IndexError):
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
print("peak-rss", peak, file=sys.stderr)
sys.exit(code)
"""


def infer_peak_rss(model: str, models_dir: str | None = None, max_tokens: int = 32, backend: str | None = None) -> int:
    """Peak resident set size in bytes of `refllm infer` (a child process) on `model`."""
    args = ["infer", "Tell me about memory bandwidth.", "--model", model, "--max-tokens", str(max_tokens),
            "--seed", "0", "--no-pull"]
    if models_dir:
        args += ["--models-dir", str(models_dir)]
    if backend:
        args += ["--backend", backend]
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS_CHILD, *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, errors="replace")
    lines = [line for line in done.stderr.splitlines() if line.startswith("peak-rss ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"refllm infer failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    return int(lines[-1].split()[1])


def infer_peak_rss_both(model: str, models_dir=None) -> tuple[int, int]:
    """(default backend, --backend numpy): the default resolves the backend by asking
    torch for CUDA when torch is installed, and importing torch is part of its peak."""
    return infer_peak_rss(model, models_dir), infer_peak_rss(model, models_dir, backend="numpy")
