"""The weight arena: separate, aligned arrays in the layout asked for, on huge pages."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from refllm.checkpoint import WeightArena
from refllm.llama import Llama
from tests.llama_util import TINY_CONFIGS, make_tiny_llama


def test_arena_arrays_are_separate_aligned_and_laid_out_as_asked():
    arena = WeightArena(chunk=1 << 20)  # small chunks: the 3 MB matrix needs a mapping of its own
    shapes = [((300, 200), "F", np.float32), ((1000, 750), "C", np.float32), ((7,), "C", np.float64), ((64, 33), "F", np.float32)]
    arrays = [arena.empty(shape, dtype, order) for shape, order, dtype in shapes]
    for a, (shape, order, dtype) in zip(arrays, shapes):
        assert a.shape == shape and a.dtype == dtype and a.flags.writeable
        assert a.flags.f_contiguous if order == "F" else a.flags.c_contiguous
        assert a.ctypes.data % 64 == 0
    for i, a in enumerate(arrays):  # fill each with its index: an overlap would overwrite one
        a[...] = i
    for i, a in enumerate(arrays):
        assert np.all(a == i)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are a Linux feature")
def test_loaded_llama_weights_are_advised_onto_huge_pages(tmp_path):
    """The matrices live in mappings marked MADV_HUGEPAGE ('hg' in /proc/self/smaps).
    Whether the kernel then finds free 2 MiB pages depends on the machine, so the test
    checks the request, which is ours, not the outcome."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("this kernel has transparent huge pages off")
    model = Llama.from_pretrained(make_tiny_llama(tmp_path, TINY_CONFIGS["gqa_tied"]))
    advised = []
    start = end = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
        elif line.startswith("VmFlags:") and "hg" in line.split()[1:]:
            advised.append((start, end))
    for layer in model.layers:
        for w in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
            assert any(lo <= w.ctypes.data and w.ctypes.data + w.nbytes <= hi for lo, hi in advised)
