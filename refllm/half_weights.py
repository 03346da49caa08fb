"""Half-precision Llama weights left in the mapped file, widened one matrix at a time.

A 7B Llama in float32 is 27 GB: more than a 24 GiB machine holds. Its bfloat16 (or
float16) checkpoint is 13.5 GB. So the decoder layers' matrices stay where
`refllm.checkpoint.read_safetensors` mapped them, in half precision, and each is
widened to the model's dtype (float32, or float64 for goldens) into a scratch buffer
just before the layer multiplies by it:

    layer.qkv_proj   ->  widen(q_proj, k_proj, v_proj of the file) into scratch["qkv"]
    layer.o_proj     ->  widen(o_proj) into scratch["o"]
    layer.gate_up_proj, layer.down_proj   likewise

The arithmetic is the float32 (float64) model's, exactly: widening a half-precision
number is exact, so the logits are those of `Llama.from_pretrained` with the weights
copied in full. What changes is memory and time:

- memory: the file's pages (the page cache maps them; they count in the process's
  resident set once read, never more than the file) + one scratch buffer per kind of
  matrix, shared by all layers (for 7B: 201 + 67 + 361 + 180 MB in float32) + the
  float32 head (`lm_head`, 524 MB for 7B; the embedding stays mapped, its rows widened
  as they are looked up). Each thread that runs the model has its own scratch.
- time: every token widens every matrix again, reading the half-precision bytes and
  writing twice as many float32 bytes, then reads those for the product: about three
  times the memory traffic of a float32 model that fits.

`WidenedLayer` has the attributes `Llama`'s forward pass reads from a `LlamaLayer`
(`qkv_proj`, `o_proj`, `gate_up_proj`, `down_proj`, the two norms), so `refllm.llama`
runs it unchanged. A widened matrix stays valid until the next layer widens the same
kind of matrix on the same thread: the forward pass uses each one right away.
"""

from __future__ import annotations

import threading

import numpy as np

from .checkpoint import StrictLoader, is_half, widen


class Scratch:
    """One buffer per kind of matrix ("qkv", "o", ...) and per thread, reused by every layer."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self._local = threading.local()

    def widen(self, kind: str, parts) -> np.ndarray:  # parts: [rows_i, cols] half tensors -> [sum rows_i, cols]
        """The row-wise concatenation of `parts`, widened into this thread's buffer for `kind`."""
        buffers = self._local.__dict__.setdefault("buffers", {})
        shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])
        buf = buffers.get(kind)
        if buf is None or buf.shape != shape:
            buf = buffers[kind] = np.empty(shape, dtype=self.dtype)
        r = 0
        for p in parts:
            widen(p, buf[r : r + p.shape[0]])
            r += p.shape[0]
        return buf


class WidenedLayer:
    """A decoder layer whose matrices stay half precision in the mapped checkpoint.

    The fused matrices of `LlamaLayer` (`qkv_proj` = q; k; v and `gate_up_proj` = gate;
    up, [out, in]) are widened on each access, into the shared `Scratch`.
    """

    def __init__(self, input_layernorm, post_attention_layernorm, q_proj, k_proj, v_proj, o_proj,
                 gate_proj, up_proj, down_proj, scratch: Scratch):
        self.input_layernorm = input_layernorm  # [D], in the model's dtype
        self.post_attention_layernorm = post_attention_layernorm  # [D]
        self.qkv_parts = (q_proj, k_proj, v_proj)  # [NH*HD, D], [NKV*HD, D] x2, half precision
        self.o_part = o_proj  # [D, NH*HD]
        self.gate_up_parts = (gate_proj, up_proj)  # [F, D] x2
        self.down_part = down_proj  # [D, F]
        self.scratch = scratch

    @property
    def qkv_proj(self) -> np.ndarray:  # [(NH+2*NKV)*HD, D]
        return self.scratch.widen("qkv", self.qkv_parts)

    @property
    def o_proj(self) -> np.ndarray:  # [D, NH*HD]
        return self.scratch.widen("o", (self.o_part,))

    @property
    def gate_up_proj(self) -> np.ndarray:  # [2F, D]
        return self.scratch.widen("gate_up", self.gate_up_parts)

    @property
    def down_proj(self) -> np.ndarray:  # [D, F]
        return self.scratch.widen("down", (self.down_part,))


MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def widened_layers(w: StrictLoader, config, dtype) -> list[WidenedLayer]:
    """The decoder layers of a checkpoint, their matrices left mapped (see the module docstring)."""
    c = config
    D, F, NH, NKV, HD = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    shapes = dict(zip(MATRICES, [(NH * HD, D), (NKV * HD, D), (NKV * HD, D), (D, NH * HD), (F, D), (F, D), (D, F)]))
    scratch = Scratch(dtype)
    layers = []
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        matrices = [w.take(p + m + ".weight", shapes[m], stored=True) for m in MATRICES]
        layers.append(WidenedLayer(
            w.take(p + "input_layernorm.weight", (D,)),
            w.take(p + "post_attention_layernorm.weight", (D,)),
            *matrices, scratch=scratch,
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
