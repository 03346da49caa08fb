"""Compile every kernel, with the launch configurations its wrapper picks on a GPU, for
a CUDA target - on a machine without a GPU.

    python -m refllm.kernels.compile_check [--arch 80 90] [-v]

The interpreter runs a kernel's Python on NumPy, so it does not see what only the
compiler checks: block shapes `tl.dot` accepts, dtypes that must agree across loop
iterations, shared-memory use. This script calls each wrapper on `meta` tensors (shapes
and strides, no data) with the launches replaced by a recorder, then compiles each
recorded launch through Triton's whole pipeline (TTIR, TTGIR, LLVM, PTX, and a cubin
from the `ptxas` that ships with the triton wheel) for each architecture, and prints
the shared memory each needs. A failure is a compile error a GPU would have raised.

It needs the interpreter off (`TRITON_INTERPRET=0`), since the mode is fixed when the
kernels are defined at import, and importing `refllm.kernels` without CUDA turns it on.
Started with it on (as `python -m` does: the package is imported before this module), it
runs itself again in a fresh interpreter with `TRITON_INTERPRET=0`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from types import SimpleNamespace

import torch

MODULES = ("matmul", "rms_norm", "layer_norm", "rope", "flash_attention", "decode_attention", "activations")
SM_COUNT = 132  # an H100 SXM, for the wrappers' split heuristics

_TL_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int32: "*i32",
             torch.int64: "*i64"}


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` is recorded."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.fn, grid, args, kwargs))


def _record_launches() -> list:
    """Run each wrapper on meta tensors in the shapes of the two default models."""
    log: list = []
    mods = {name: importlib.import_module(f"refllm.kernels.{name}") for name in MODULES}
    for mod in mods.values():
        for attr, obj in list(vars(mod).items()):
            if attr.startswith("_") and attr.endswith("_kernel"):
                setattr(mod, attr, _Recorder(obj, log))
        if hasattr(mod, "check_tensor"):
            mod.check_tensor = lambda *a, **k: None
    torch.cuda.get_device_properties = lambda *a: SimpleNamespace(multi_processor_count=SM_COUNT)
    torch.cuda.current_device = lambda: 0

    def t(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device="meta")

    mm, fa, da = mods["matmul"].matmul, mods["flash_attention"], mods["decode_attention"].decode_attention
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for M in (1, 1823):  # split-K and tiled
            mm(t(M, 576, dtype=dt), t(1536, 576, dtype=dt))
            mm(t(M, 384, dtype=dt), t(1536, 384, dtype=dt), t(1536, dtype=dt), act="gelu")
            mm(t(M, 384, dtype=dt), t(1536, 384, dtype=dt), t(1536, dtype=dt), act="gelu_tanh")
            mm(t(M, 576, dtype=dt), t(3072, 576, dtype=dt), act="swiglu")
        x = t(257, 576, dtype=dt)
        mods["rms_norm"].rms_norm(x, t(576, dtype=dt), 1e-5)
        mods["rms_norm"].rms_norm(x, t(576, dtype=dt), 1e-5, residual=t(257, 576, dtype=dt))
        mods["layer_norm"].layer_norm(x, t(576, dtype=dt), t(576, dtype=dt), 1e-12)
        mods["layer_norm"].layer_norm(x, t(576, dtype=dt), t(576, dtype=dt), 1e-12, residual=t(257, 576, dtype=dt))
        mods["rope"].rope(t(257, 12, 64, dtype=dt), t(257, 64), t(257, 64))
        fa.causal_attention(t(257, 9, 64, dtype=dt), t(300, 3, 64, dtype=dt), t(300, 3, 64, dtype=dt), 43)
        fa.causal_attention(t(17, 4, 128, dtype=dt), t(17, 4, 128, dtype=dt), t(17, 4, 128, dtype=dt), 0)
        fa.masked_attention(t(4, 12, 33, 32, dtype=dt), t(4, 12, 33, 32, dtype=dt), t(4, 12, 33, 32, dtype=dt),
                            torch.empty((4, 33), dtype=torch.int64, device="meta"))
        da(t(1, 9, 64, dtype=dt), t(4000, 3, 64, dtype=dt), t(4000, 3, 64, dtype=dt))
        mods["activations"].swiglu(t(7, 1536, dtype=dt), t(7, 1536, dtype=dt))
        mods["activations"].gelu(t(7, 1536, dtype=dt), approximate="tanh")
        mods["activations"].gelu(t(7, 1536, dtype=dt))
    return log


def _signature(fn, args, kwargs):
    sig, constexprs, options = {}, {}, {}
    params = {p.name: p for p in fn.params}
    bound = dict(zip(fn.arg_names, args))
    for k, v in kwargs.items():
        if k in params:
            bound[k] = v
        else:
            options[k] = v  # num_warps, num_stages
    for name in fn.arg_names:
        v = bound[name]
        if params[name].is_constexpr:
            sig[name], constexprs[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = _TL_TYPES[v.dtype]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={v!r}")
    return sig, constexprs, options


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="CUDA compute capabilities (80 = A100, 90 = H100)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    from .common import INTERPRET

    if INTERPRET:  # the kernels were defined for the interpreter: compile them in a fresh process
        if os.environ.get("TRITON_INTERPRET") == "0":  # already the fresh process, and still on
            print("compile_check: the kernels were defined for the interpreter although TRITON_INTERPRET=0")
            return 2
        argv = sys.argv[1:] if argv is None else list(argv)
        env = dict(os.environ, TRITON_INTERPRET="0")
        return subprocess.call([sys.executable, "-m", "refllm.kernels.compile_check", *argv], env=env)
    import triton
    from triton.backends.compiler import GPUTarget

    seen, failures = set(), 0
    for fn, grid, a, kw in _record_launches():
        sig, constexprs, options = _signature(fn, a, kw)
        key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())), tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        ptrs = ",".join(sorted({v[1:] for v in sig.values() if v.startswith("*")}))
        desc = f"{fn.__name__}[{ptrs}] " + " ".join(f"{k}={v}" for k, v in constexprs.items())
        for arch in args.arch:
            try:
                src = triton.compiler.ASTSource(fn, signature=sig, constexprs=constexprs)
                ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                if args.verbose:
                    print(f"ok   sm_{arch} shared={ck.metadata.shared:>6}B  {desc} {options}")
            except Exception as e:  # noqa: BLE001 - report every failure, then fail
                failures += 1
                print(f"FAIL sm_{arch} {desc} {options}\n     {type(e).__name__}: {str(e).strip()[:2000]}")
    print(f"compile_check: {len(seen)} kernel configurations x {len(args.arch)} targets, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
