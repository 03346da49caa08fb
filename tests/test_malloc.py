"""refllm.malloc: glibc's thresholds are raised once, and REFLLM_RETAIN_FREED_MEMORY=0 leaves them alone."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")

# In a fresh interpreter: allocate a 1 MiB block, above glibc's initial 128 KiB mmap
# threshold. With the default thresholds malloc maps it for itself (and would unmap it
# when freed, so the next one faults its pages in again); with refllm's it comes from
# the heap.
PROBE = """
import ctypes, sys
from refllm.malloc import retain_freed_memory
took = retain_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Mallinfo2
before = libc.mallinfo2().hblks  # blocks served by mmap so far (the imports made some)
p = libc.malloc(1 << 20)
print(took, libc.mallinfo2().hblks - before)  # 1 if the 1 MiB block was mapped for itself
libc.free(p)
"""


def run_probe(env_value):
    env = {"PATH": "/usr/bin:/bin"}
    if env_value is not None:
        env["REFLLM_RETAIN_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    took, mapped = out.stdout.split()
    return took == "True", int(mapped)


def test_thresholds_are_raised_so_a_large_block_comes_from_the_heap():
    took, mmapped = run_probe(None)
    assert took and mmapped == 0


def test_the_environment_can_leave_glibc_defaults_alone():
    took, mmapped = run_probe("0")
    assert not took and mmapped == 1
