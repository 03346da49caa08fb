"""The speedup of `refllm golden --ray` with 2 workers over 1, on the default model.

    python bench/golden_ray.py [--cases 12] [--max-tokens 8] [--models-dir D]

A suite of greedy cases on smollm2-135m-instruct (float64, NumPy, one BLAS thread per
worker, as `refllm golden` runs by default) is written four ways: in this process
(no Ray), and on a local Ray cluster (`ray.init(num_cpus=2)`, started and stopped here)
with 1 worker and with 2. Each golden.jsonl must be byte-identical to the single-process
one. Reported: the wall time of each run, split into starting the workers (each loads
the model and checks its sha256) and the cases; the speedup is of the case time and of
the whole run. Written to bench/results/golden_ray.{md,json}.

On a shared machine other processes take cores too: the load average before and after
is reported beside the times, and the numbers are of one run each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from refllm import registry
from refllm.golden import Models, write_golden

PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 1, 2, 3,", "Why is the sky blue?",
           "def fibonacci(n):", "The quick brown fox", "Water boils at", "In 1969, the first"]
RESULTS = Path(__file__).parent / "results"


def suite(path: Path, n: int, max_tokens: int) -> Path:
    lines = [{"name": f"greedy-{i}", "prompt": PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)),
              "params": {"max_tokens": max_tokens, "temperature": 0}} for i in range(n)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def run(label: str, out: Path, suite_path: Path, model_dir: Path, **kw) -> dict:
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    t0 = time.perf_counter()
    with redirect_stderr(err):
        path = write_golden(out, suite=suite_path, models=Models.from_paths(model_dir), progress=True, **kw)
    total = time.perf_counter() - t0
    log = err.getvalue()
    startup = None
    for line in log.splitlines():  # "golden: 2 Ray workers ready in 12.3 s"
        if "Ray workers ready in" in line:
            startup = float(line.split("ready in")[1].split()[0])
    return {"label": label, "total_s": total, "startup_s": startup, "cases_s": total - (startup or 0.0),
            "bytes": path.read_bytes()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--models-dir")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    import ray

    model_dir = registry.find_llm("smollm2-135m-instruct", args.models_dir)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        s = suite(tmp / "suite.jsonl", args.cases, args.max_tokens)
        runs = [run("one process, no Ray", tmp / "local", s, model_dir)]
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            runs.append(run("Ray, 1 worker", tmp / "ray1", s, model_dir, ray=True, workers=1))
            runs.append(run("Ray, 2 workers", tmp / "ray2", s, model_dir, ray=True, workers=2))
        finally:
            ray.shutdown()
    load_after = os.getloadavg()
    identical = all(r["bytes"] == runs[0]["bytes"] for r in runs)
    one, two = runs[1], runs[2]
    result = {
        "model": "smollm2-135m-instruct", "cases": args.cases, "max_tokens": args.max_tokens,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "runs": [{k: v for k, v in r.items() if k != "bytes"} for r in runs],
        "byte_identical": identical,
        "speedup_cases_2_over_1": one["cases_s"] / two["cases_s"],
        "speedup_total_2_over_1": one["total_s"] / two["total_s"],
    }
    md = [f"# `refllm golden --ray`: 2 workers over 1 ({args.cases} greedy cases x {args.max_tokens} tokens, "
          f"smollm2-135m-instruct, float64)", "",
          f"Machine: {os.cpu_count()} CPUs; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
          f"(shared with other processes). One run each. Outputs byte-identical: {identical}.", "",
          "| run | workers start (load + sha256) | cases | total |", "| --- | ---: | ---: | ---: |"]
    for r in runs:
        st = f"{r['startup_s']:.1f} s" if r["startup_s"] is not None else "-"
        md.append(f"| {r['label']} | {st} | {r['cases_s']:.1f} s | {r['total_s']:.1f} s |")
    md += ["", f"Speedup of 2 workers over 1: {result['speedup_cases_2_over_1']:.2f}x on the cases, "
               f"{result['speedup_total_2_over_1']:.2f}x on the whole run."]
    text = "\n".join(md) + "\n"
    print(text)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "golden_ray.md").write_text(text, encoding="utf-8")
        (RESULTS / "golden_ray.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
