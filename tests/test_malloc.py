"""refllm.malloc: glibc's thresholds are raised once, by refllm's entry points (the command
line, the server) and by an explicit call, never by building a model; and
REFLLM_RETAIN_FREED_MEMORY=0 leaves them alone."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from tests.llama_util import TINY_CONFIGS, make_tiny_llama

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")

# Run in a fresh interpreter after SETUP: allocate a 1 MiB block, above glibc's initial
# 128 KiB mmap threshold. With the default thresholds malloc maps it for itself (and
# would unmap it when freed, so the next one faults its pages in again); with refllm's
# it comes from the heap. Prints 1 if the block was mapped for itself, else 0.
MEASURE = """
import ctypes
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Mallinfo2
before = libc.mallinfo2().hblks  # blocks served by mmap so far (the imports made some)
p = libc.malloc(1 << 20)
print("MAPPED", libc.mallinfo2().hblks - before)
libc.free(p)
"""


def mapped_after(setup: str, env_value: str | None = None) -> tuple[int, str]:
    """(1 if a 1 MiB block is still mmapped after `setup` ran, else 0; setup's output)."""
    env = {"PATH": "/usr/bin:/bin"}
    if env_value is not None:
        env["REFLLM_RETAIN_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", setup + MEASURE], capture_output=True, text=True, env=env, check=True)
    head, _, count = out.stdout.rpartition("MAPPED ")
    return int(count), head


def test_thresholds_are_raised_so_a_large_block_comes_from_the_heap():
    mapped, out = mapped_after("from refllm.malloc import retain_freed_memory\nprint(retain_freed_memory())\n")
    assert out.strip() == "True" and mapped == 0


def test_the_environment_can_leave_glibc_defaults_alone():
    mapped, out = mapped_after("from refllm.malloc import retain_freed_memory\nprint(retain_freed_memory())\n", "0")
    assert out.strip() == "False" and mapped == 1


def test_building_and_running_models_leaves_glibc_defaults_alone(tmp_path):
    """A library user who builds a Llama and a Bert keeps glibc's defaults (issue 15)."""
    d = make_tiny_llama(tmp_path / "llama", TINY_CONFIGS["mha"])
    mapped, _ = mapped_after(f"""
import numpy as np
from refllm.bert import Bert, BertEmbeddings, LayerNorm
from refllm.config import BertConfig
from refllm.llama import Llama
Llama.from_pretrained({str(d)!r})([1, 2, 3])
z = np.zeros((4, 8), np.float32)
config = BertConfig(vocab_size=4, hidden_size=8, num_attention_heads=2, num_hidden_layers=0, max_position_embeddings=4)
Bert(config, BertEmbeddings(z, z, z[:2], LayerNorm(np.ones(8, np.float32), np.zeros(8, np.float32), 1e-12)), [])([[1, 2]])
""")
    assert mapped == 1


def test_the_command_line_raises_them(tmp_path):
    mapped, _ = mapped_after(f"from refllm.cli import main\nmain(['models', '--models-dir', {str(tmp_path)!r}])\n")
    assert mapped == 0
    assert mapped_after(f"from refllm.cli import main\nmain(['models', '--models-dir', {str(tmp_path)!r}])\n", "0")[0] == 1


def test_the_server_raises_them(tmp_path):
    pytest.importorskip("uvicorn")
    mapped, _ = mapped_after(f"""
import refllm.serve.app as app
app.run = lambda *args, **kwargs: None  # everything `python -m refllm.serve` does but listen
app.main(['--models-dir', {str(tmp_path)!r}])
""")
    assert mapped == 0
