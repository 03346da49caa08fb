"""Writing a golden set: the header, every case in suite order, and the files beside them.

    write_golden(out_dir)                            the built-in suite on the default models
    write_golden(out_dir, suite="cases.jsonl",       a user's suite on a user's model
                 models=Models.from_paths("ckpt/"))  (a Llama directory or a .gguf)
    write_golden(..., ray="10.0.0.1:6379")           the cases spread over a Ray cluster
                                                     (refllm.golden.fanout): the same bytes

The directory written (FORMAT.md, beside this file, is its specification):

    golden.jsonl          the header line, then one case a line
    tokenizers/<m>.json   each model's tokenizer.json
    FORMAT.md             the format
    suite.jsonl           a user's suite file, as given (not for the built-in suite)

The same models, suite and refllm give the same file, byte for byte: no timestamps,
floats as the shortest text that reads back as the same float64, and the BLAS run with
a fixed number of threads (`threads`, 1 by default, written in the header): OpenBLAS
splits its sums differently with another thread count, which moves float64 results by
an ulp or so (never a token). Every Ray worker uses the same count.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Sequence

from .. import SPEC_VERSION, __version__
from .models import BACKEND, PRECISION, Models
from .reader import FORMAT, FORMAT_DOC, FORMAT_VERSION, GOLDEN_FILE, dumps
from .record import TOP_N, record
from .suite import SUITE, SUITE_FORMAT_VERSION, SUITE_VERSION, CaseSpec, load_suite, select

RNG = "numpy.random.Generator(numpy.random.PCG64(seed)).random(), one draw per sampled token"
SUITE_COPY = "suite.jsonl"


@contextmanager
def blas_threads(n: int):
    """Run the BLAS (and OpenMP) with exactly `n` threads inside the block."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n):
        yield


def build_header(models: Models, specs: Sequence[CaseSpec], suite: Path | None, threads: int,
                 decoder_facts=None) -> dict:
    from .models import sha256_file

    if suite is None:
        about = {"suite": SUITE, "suite_version": SUITE_VERSION}
    else:
        about = {"suite": suite.name, "suite_version": SUITE_FORMAT_VERSION, "suite_sha256": sha256_file(suite)}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **about, "cases": [s.name for s in specs],
            "refllm_version": __version__, "spec_version": SPEC_VERSION, "precision": PRECISION,
            "backend": BACKEND, "blas_threads": threads, "top_n": TOP_N, "rng": RNG,
            "models": models.header((s.model for s in specs), decoder_facts)}


def suite_specs(models: Models, suite=None, cases: Iterable[str] | None = None) -> list[CaseSpec]:
    """The cases to run: the built-in suite's (all, or those named), or a suite file's."""
    if suite is None:
        return select(cases)
    specs = load_suite(suite, models.llm_name, models.embedder_name)
    if cases is not None:
        names = list(cases)
        missing = sorted(set(names) - {s.name for s in specs})
        if missing:
            raise ValueError(f"no case(s) {', '.join(missing)} in {suite}")
        specs = [s for s in specs if s.name in names]
    return specs


def run_local(specs: Sequence[CaseSpec], models: Models, threads: int, progress: bool) -> list[str]:
    """Every case's golden line, in order, in this process."""
    lines = []
    with blas_threads(threads):
        for i, spec in enumerate(specs):
            t = time.monotonic()
            lines.append(dumps(record(spec, models)))
            if progress:
                print(f"golden: [{i + 1}/{len(specs)}] {spec.name} ({time.monotonic() - t:.1f} s)", file=sys.stderr)
    return lines


def write_golden(out_dir, models_root=None, *, cases: Iterable[str] | None = None, suite=None,
                 models: Models | None = None, threads: int = 1, ray: str | bool | None = None,
                 workers: int | None = None, progress: bool = False) -> Path:
    """Run a suite and write its golden set into `out_dir`; returns the path of golden.jsonl.

    Without `suite`, the built-in suite (or its named `cases`) on the default models
    under `models_root` (SPEC 5's order when None). With `suite` (a file, SUITE.md), its
    cases on `models` (`Models.from_paths`). `ray`: an address of a Ray cluster, or True
    for `ray.init()`'s default (RAY_ADDRESS, else a local cluster); the cases are spread
    over `workers` actors (default: as many as the cluster has CPUs for, `threads`
    each), and the file is byte for byte the one this process would write."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if models is None:
        if suite is not None:
            raise ValueError("a suite needs the models it runs on (models=Models.from_paths(...))")
        models = Models.builtin(models_root)
    suite = None if suite is None else Path(suite)
    specs = suite_specs(models, suite, cases)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with models:
        if ray is None or ray is False:
            with blas_threads(threads):
                header = build_header(models, specs, suite, threads)  # loads the models, before any case
            lines = run_local(specs, models, threads, progress)
        else:
            from .fanout import run_on_ray

            lines, facts = run_on_ray(specs, models, None if ray is True else ray, workers=workers,
                                      threads=threads, progress=progress)
            header = build_header(models, specs, suite, threads, facts.__getitem__)
        (out_dir / "tokenizers").mkdir(exist_ok=True)
        for name in header["models"]:
            shutil.copyfile(models.tokenizer_file(name), out_dir / "tokenizers" / f"{name}.json")
    shutil.copyfile(FORMAT_DOC, out_dir / "FORMAT.md")
    if suite is not None:
        shutil.copyfile(suite, out_dir / SUITE_COPY)
    target = out_dir / GOLDEN_FILE
    tmp = target.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join([dumps(header), *lines]) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    if progress:
        print(f"golden: {len(specs)} cases in {time.monotonic() - t0:.1f} s -> {target}", file=sys.stderr)
    return target


__all__ = ["write_golden", "build_header", "suite_specs", "run_local", "blas_threads", "RNG"]
