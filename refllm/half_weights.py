"""Half-precision Llama weights left in the mapped file, widened a block of rows at a time.

A 7B Llama in float32 is 27 GB: more than a 24 GiB machine holds. Its bfloat16 (or
float16) checkpoint is 13.5 GB. So the decoder layers' matrices stay where
`refllm.checkpoint.read_safetensors` mapped them, in half precision, each wrapped in a
`HalfMatrix` that multiplies like a float matrix:

    np.matmul(W, x, out=y)   y[rows] = widen(W[rows]) @ x     for each block of rows
    X @ W.T                  Y[:, rows] = X @ widen(W[rows]).T

Each block (16 MB once widened: with its 8 MB source, within a 32 MB L3 cache) is
widened into a scratch buffer of the thread's, reused by every block of every matrix,
and multiplied while it is still in the cache. So a product reads the half-precision
bytes once and the float32 matrix never exists: no 27 GB copy, and no 27 GB written to
memory and read back each token either. (Smaller blocks would stay in L2, but each block
is one BLAS call, and on a busy machine a multi-threaded BLAS call costs milliseconds of
thread wake-ups: 2 MB blocks measured 5-10x slower than 16-64 MB ones on this project's
oversubscribed 2-core VM.)

The arithmetic is the float32 (float64) model's: widening a half-precision number is
exact, and each output element is one dot product over the whole input, as in the
float model (the same values; BLAS may sum in another order, ~1e-7 relative). Memory is
the file's pages (the page cache maps them; they count in the process's resident set
once read, never more than the file) + the float32 head (`lm_head`, 524 MB for 7B;
the embedding stays mapped, its rows widened as they are looked up) + a 16 MB scratch
per thread.

`WidenedLayer` has the attributes `Llama`'s forward pass reads from a `LlamaLayer`
(`qkv_proj`, `o_proj`, `gate_up_proj`, `down_proj` as HalfMatrix, the two norms), so
`refllm.llama` runs it unchanged.
"""

from __future__ import annotations

import threading

import numpy as np

from .checkpoint import StrictLoader, is_half, widen

BLOCK_BYTES = 16 << 20  # a widened block of rows: it and its source fit in a 32 MB L3

_scratch = threading.local()


def _scratch_rows(n: int, cols: int, dtype) -> np.ndarray:  # -> [n, cols], this thread's buffer
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < n * cols or buf.dtype != dtype:
        buf = _scratch.buf = np.empty(max(n * cols, BLOCK_BYTES // np.dtype(dtype).itemsize), dtype=dtype)
    return buf[: n * cols].reshape(n, cols)


class HalfMatrix:
    """A [out, in] matrix stored in half precision (the row-wise concatenation of `parts`)
    that takes part in `np.matmul` / `@` as a matrix of `dtype`.

    Supported, as the decoder uses them: `W @ x` and `np.matmul(W, x, out=)` with x of
    shape [in] or [in, n]; `X @ W.T` and `np.matmul(X, W.T, out=)` with X of shape
    [T, in]. `np.asarray(W)` widens the whole matrix (for tests and inspection).
    """

    def __init__(self, parts, dtype, transposed: bool = False):
        self.parts = tuple(parts)  # [rows_i, in] half-precision tensors (views of the file)
        self.dtype = np.dtype(dtype)
        self.transposed = transposed
        rows, cols = sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]
        self.shape = (cols, rows) if transposed else (rows, cols)
        self.ndim = 2

    @property
    def T(self) -> "HalfMatrix":
        return HalfMatrix(self.parts, self.dtype, not self.transposed)

    def __matmul__(self, other):
        return np.matmul(self, other)

    def __rmatmul__(self, other):
        return np.matmul(other, self)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        rows, cols = (self.shape[1], self.shape[0]) if self.transposed else self.shape
        full = np.empty((rows, cols), dtype=self.dtype)
        r = 0
        for p in self.parts:
            widen(p, full[r : r + p.shape[0]])
            r += p.shape[0]
        full = full.T if self.transposed else full
        return full if dtype is None else full.astype(dtype)

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        if ufunc is not np.matmul or method != "__call__" or kwargs or len(inputs) != 2:
            return NotImplemented
        a, b = inputs
        out = out[0] if out else None
        if a is self and not self.transposed and not isinstance(b, HalfMatrix):
            return self._times(np.asarray(b), out)
        if b is self and self.transposed and not isinstance(a, HalfMatrix):
            return self._times_transposed(np.asarray(a), out)
        return NotImplemented

    def _blocks(self):  # -> (first output row, widened [n, in] block), block after block
        cols = self.parts[0].shape[1]
        step = max(1, BLOCK_BYTES // (cols * self.dtype.itemsize))
        row = 0
        for p in self.parts:
            for r in range(0, p.shape[0], step):
                n = min(step, p.shape[0] - r)
                yield row + r, widen(p[r : r + n], _scratch_rows(n, cols, self.dtype))
            row += p.shape[0]

    def _times(self, x, out):  # W @ x: [out, in] @ [in] or [in, n] -> [out] or [out, n]
        if out is None:
            out = np.empty((self.shape[0], *x.shape[1:]), dtype=np.result_type(self.dtype, x.dtype))
        for r, block in self._blocks():
            np.matmul(block, x, out=out[r : r + block.shape[0]])
        return out

    def _times_transposed(self, x, out):  # X @ W.T: [T, in] @ [in, out] -> [T, out]
        if out is None:
            out = np.empty((*x.shape[:-1], self.shape[1]), dtype=np.result_type(self.dtype, x.dtype))
        for r, block in self._blocks():
            out[..., r : r + block.shape[0]] = x @ block.T
        return out


class WidenedLayer:
    """A decoder layer whose matrices stay half precision in the mapped checkpoint.

    The fused matrices of `LlamaLayer` (`qkv_proj` = q; k; v and `gate_up_proj` = gate;
    up, [out, in]) are `HalfMatrix`es over the file's separate tensors.
    """

    def __init__(self, input_layernorm, post_attention_layernorm, q_proj, k_proj, v_proj, o_proj,
                 gate_proj, up_proj, down_proj, dtype):
        self.input_layernorm = input_layernorm  # [D], in the model's dtype
        self.post_attention_layernorm = post_attention_layernorm  # [D]
        self.qkv_proj = HalfMatrix((q_proj, k_proj, v_proj), dtype)  # [(NH+2*NKV)*HD, D]
        self.o_proj = HalfMatrix((o_proj,), dtype)  # [D, NH*HD]
        self.gate_up_proj = HalfMatrix((gate_proj, up_proj), dtype)  # [2F, D]
        self.down_proj = HalfMatrix((down_proj,), dtype)  # [D, F]


MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def widened_layers(w: StrictLoader, config, dtype) -> list[WidenedLayer]:
    """The decoder layers of a checkpoint, their matrices left mapped (see the module docstring)."""
    c = config
    D, F, NH, NKV, HD = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    shapes = dict(zip(MATRICES, [(NH * HD, D), (NKV * HD, D), (NKV * HD, D), (D, NH * HD), (F, D), (F, D), (D, F)]))
    layers = []
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        matrices = [w.take(p + m + ".weight", shapes[m], stored=True) for m in MATRICES]
        layers.append(WidenedLayer(
            w.take(p + "input_layernorm.weight", (D,)),
            w.take(p + "post_attention_layernorm.weight", (D,)),
            *matrices, dtype=dtype,
        ))
    return layers


def should_widen_on_use(w: StrictLoader, dtype, available: int | None = None) -> bool:
    """The automatic choice: the layers' matrices are half precision and a full copy in
    `dtype` would need more than 80% of the memory available now (/proc/meminfo's
    MemAvailable; never on a system that does not say)."""
    matrices = [t for name, t in w.tensors.items() if name.endswith(tuple(m + ".weight" for m in MATRICES))]
    if not matrices or not all(is_half(t) for t in matrices):
        return False
    available = memory_available() if available is None else available
    needed = sum(t.size for t in w.tensors.values()) * np.dtype(dtype).itemsize
    return available is not None and needed > 0.8 * available


def memory_available() -> int | None:
    """Bytes of memory available for a new process's use (Linux's MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
