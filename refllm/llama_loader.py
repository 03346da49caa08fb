"""Where a Llama's weights land in memory: the layout work of loading, apart from the model.

`Llama.from_state_dict` (refllm/llama.py) lists the model's weights by their checkpoint
names and shapes; `LlamaLoader` decides where each goes. None of this changes a shape or
a value, only the memory under it, for the speed of a decode step, which multiplies one
row by every matrix and is bound by reading the weights:

- Fused. A layer's q_proj; k_proj; v_proj are copied into the rows of one matrix,
  `qkv_proj`, and gate_proj; up_proj into `gate_up_proj`: one matrix-vector product per
  step where there would be three (or two). The layer keeps the separate matrices as
  views of those rows, with the checkpoint's shapes.

- Fortran order where it streams faster. OpenBLAS streams `W @ x` fastest along the
  longer side. So a matrix with out >= in is stored column-major (Fortran order: W.T is
  a row-major [in, out] matrix, sgemv "N" reads runs of `out` floats), and one with
  in > out (down_proj: in = F) keeps the checkpoint's row-major layout (sgemv "T" reads
  runs of F floats). Measured with two threads on SmolLM2's matrices, caches flushed
  (AMD EPYC, OpenBLAS 0.3.31 Haswell kernels), GB/s row-major vs column-major: gate_up
  28 vs 33, o 15 vs 17, qkv 22 vs 22, down 31 vs 25. The embedding and the head are
  [V, D] with V > D: column-major too (the embedding lookup then reads each row with a
  stride, D scattered reads per token: negligible).

- Huge pages. Every matrix is carved out of a `WeightArena` (refllm.checkpoint) on
  transparent huge pages, so the products stop walking page tables every 4 KiB (150
  products of a SmolLM2 token: 21.6 -> 18.3 ms).

- Copied once. Each tensor is copied into its place and its mapped pages released
  (`StrictLoader.take(out=)`), so loading never holds a weight twice.

- Or left in the file. With `widen_on_use`, half-precision matrices stay mapped and are
  widened a block at a time as a layer multiplies by them (refllm.half_weights).

Loading stays strict: `StrictLoader` names a missing, mis-shaped or unused tensor.
"""

from __future__ import annotations

import numpy as np

from .checkpoint import StrictLoader, WeightArena
from .half_weights import WidenedLayer, should_widen_on_use
from .llama import LlamaLayer

Named = tuple[str, tuple[int, ...]]  # (the checkpoint's name, its shape)


class LlamaLoader:
    """The tensors of one checkpoint, placed as the module docstring says."""

    def __init__(self, tensors, dtype, source: str, widen_on_use: bool | None = None):
        self.dtype = np.dtype(dtype)
        self.w = StrictLoader(tensors, dtype, source, ignore_prefixes=("model.rotary_emb.",))
        self.widen_on_use = should_widen_on_use(self.w, dtype) if widen_on_use is None else widen_on_use
        self.arena = WeightArena()

    def has(self, name: str) -> bool:
        return self.w.has(name)

    def finish(self) -> None:
        """Every tensor was used (else runtime-error naming the others)."""
        self.w.finish()

    def vector(self, *parts: Named) -> np.ndarray:  # -> [sum of sizes], the parts one after another
        if len(parts) == 1:
            return self.w.take(*parts[0])
        return np.concatenate([self.w.take(name, shape) for name, shape in parts])

    def rows(self, *parts: Named) -> np.ndarray:  # -> [sum of outs, in], the matrices one after another
        """One matrix whose rows are the parts' (fused), in the order that streams fastest."""
        out, cols = sum(shape[0] for _, shape in parts), parts[0][1][1]
        fused = self.arena.empty((out, cols), self.dtype, order="F" if out >= cols else "C")
        r = 0
        for name, shape in parts:
            self.w.take(name, shape, out=fused[r : r + shape[0]])
            r += shape[0]
        return fused

    def layer(self, input_layernorm: Named, qkv_proj: list[Named], o_proj: Named, post_attention_layernorm: Named,
              gate_up_proj: list[Named], down_proj: Named, qkv_bias=None, o_bias=None, gate_up_bias=None,
              down_bias=None):
        """A decoder layer from its named weights; a bias is a list of parts, or None."""
        if self.widen_on_use:
            stored = [self.w.take(name, shape, stored=True) for name, shape in [*qkv_proj, o_proj, *gate_up_proj, down_proj]]
            layer = WidenedLayer(self.vector(input_layernorm), self.vector(post_attention_layernorm), *stored,
                                 dtype=self.dtype)
        else:
            qkv, gate_up = self.rows(*qkv_proj), self.rows(*gate_up_proj)  # [(NH+2*NKV)*HD, D], [2F, D]
            q, k = qkv_proj[0][1][0], qkv_proj[1][1][0]
            F = gate_up_proj[0][1][0]
            layer = LlamaLayer(
                input_layernorm=self.vector(input_layernorm),
                q_proj=qkv[:q], k_proj=qkv[q : q + k], v_proj=qkv[q + k :],
                o_proj=self.rows(o_proj),
                post_attention_layernorm=self.vector(post_attention_layernorm),
                gate_proj=gate_up[:F], up_proj=gate_up[F:],
                down_proj=self.rows(down_proj),
                qkv_proj=qkv, gate_up_proj=gate_up,
            )
        for field, parts in (("qkv_bias", qkv_bias), ("o_bias", o_bias), ("gate_up_bias", gate_up_bias),
                             ("down_bias", down_bias)):
            setattr(layer, field, None if parts is None else self.vector(*parts))
        return layer

    def embedding(self, name: str, shape) -> np.ndarray:  # -> [V, D]
        """Looked up a row at a time: with widen_on_use left in the file, widened per row."""
        if self.widen_on_use:
            return self.w.take(name, shape, stored=True)
        return self.rows((name, shape))

    def head(self, name: str, shape) -> np.ndarray:  # -> [V, D], always in the model's dtype
        return self.rows((name, shape))

    def tied_head(self, embedding: np.ndarray, name: str, shape) -> np.ndarray:  # -> [V, D]
        """The head when it is the embedding: the same array, or a widened copy when the
        embedding was left in the file."""
        return self.rows((name, shape)) if self.widen_on_use else embedding
