"""What every kernel wrapper shares: where kernels run, and the checks before a launch.

Triton kernels run in one of two modes, fixed when a kernel is decorated (that is,
when a module of `refllm.kernels` is imported):

- compiled, on a CUDA device: the tensors are `cuda` torch tensors;
- interpreted (`TRITON_INTERPRET=1`): each program of the grid is run one after the
  other in Python, every `tl` operation a NumPy operation on the whole block, on CPU
  torch tensors. `refllm.kernels` turns this on by itself when torch sees no CUDA
  device (unless `TRITON_INTERPRET` is already set), so the same kernels are tested on
  a laptop. It is slow: each `tl` operation of each program costs about a
  millisecond of Python whatever the block size, so the wrappers pick few, large
  blocks there (`INTERPRET` below) and the GPU's sizes otherwise.

Known gap of the interpreter (triton 3.x, `interpreter.py: create_dot`): bfloat16 is
held as raw uint16 bits and `tl.dot` multiplies those bits as integers. Kernels widen
bfloat16 operands to float32 before `tl.dot` when interpreted (`DOT_UPCAST`), which is
exact: a product of two bfloat16 numbers (8-bit significands) fits a float32.
"""

from __future__ import annotations

import torch
from triton import knobs

INTERPRET = bool(knobs.runtime.interpret)  # read from TRITON_INTERPRET, as triton.jit reads it

# What kernels load and store. They compute in float32 whatever they load: float32 dots
# run in full IEEE float32 (`input_precision="ieee"`, not TF32, whose 10-bit significand
# would break the 1e-4 agreement with the NumPy reference), half-precision dots use the
# tensor cores with a float32 accumulator.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether `tl.dot` operands of this dtype must be widened to float32 first."""
    return INTERPRET and dtype == torch.bfloat16


def check_tensor(name: str, t, ndim: int, dtypes=DTYPES, last_contiguous: bool = True) -> None:
    """A kernel argument: a torch tensor of `ndim` dims, a supported dtype, on the
    device the kernels run on, with unit stride along its last dim (kernels take the
    other strides as arguments, so views need no copy)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {list(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, dtypes))}")
    if not (t.is_cuda or INTERPRET):
        raise RuntimeError(
            f"{name} is on {t.device}: Triton kernels need CUDA tensors, or CPU tensors under "
            "TRITON_INTERPRET=1 set before refllm.kernels is imported")
    if INTERPRET and t.is_cuda:
        raise RuntimeError(f"{name} is a CUDA tensor but Triton is in interpreter mode (TRITON_INTERPRET=1)")
    if last_contiguous and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dim, got strides {t.stride()}")


def check_same(names: str, *tensors, what: str = "dtype") -> None:
    values = [getattr(t, what) for t in tensors]
    if any(v != values[0] for v in values):
        raise TypeError(f"{names} must share one {what}, got {', '.join(map(str, values))}")


def device() -> torch.device:
    """The device kernel tensors live on: cuda, or the CPU under the interpreter."""
    return torch.device("cpu" if INTERPRET else "cuda")
