"""The peer benchmarks: pytest-benchmark suites over `refllm.bench`'s engines.

    pip install -e '.[bench]'            # pytest-benchmark, matplotlib, psutil
    pip install llama-cpp-python         # optional peer: builds llama.cpp (~9 minutes)
    pytest bench/ --benchmark-columns=median,min,max,rounds

Every engine runs in this pytest process, on the same token ids and sentences (`refllm
bench` loads each in a process of its own and alternates their rounds); a peer that is
not installed is skipped with the reason. At the end the session prints the table of
`refllm.bench.format_report` (rates, refllm's ratio to each peer, bandwidth achieved
against the bandwidth measured here, peak memory of `refllm infer`) and writes it, with
the chart and the raw seconds, to bench/results/ (latest.md, latest.png, latest.json).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

try:  # as tests/conftest.py: without CUDA the Triton kernels run under the interpreter, a
    import torch  # mode fixed when triton is first imported (transformers' probe for the

    if not torch.cuda.is_available():  # hub's `kernels` package finds this repo's kernels/)
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # the NumPy path needs no torch
    pass

from refllm import bench  # noqa: E402

RESULTS_DIR = Path(__file__).parent / "results"
REPORT = bench.Report(results=[], machine=bench.machine_info())
_ENGINES: dict = {}


def pytest_addoption(parser):
    parser.addoption("--bench-rounds", type=int, default=5, help="timed rounds per measurement (median reported)")
    parser.addoption("--bench-no-write", action="store_true", help="print the table, write nothing to bench/results/")


@pytest.fixture(scope="session")
def rounds(request) -> int:
    return request.config.getoption("--bench-rounds")


@pytest.fixture(scope="session")
def models_root() -> Path:
    from refllm.registry import user_cache_root
    from refllm.weights.pull import pull

    root = Path(os.environ.get("REFLLM_TEST_MODELS_DIR") or user_cache_root())
    pull("smollm2-135m-instruct", root=root, progress=False)
    pull("all-minilm-l6-v2", root=root, progress=False)
    return root


@pytest.fixture(scope="session")
def llama_dir(models_root) -> Path:
    from refllm.weights.pull import model_path

    path = model_path("smollm2-135m-instruct", models_root)
    from refllm.config import LlamaConfig

    costs = bench.llama_costs(LlamaConfig.from_file(path / "config.json"), bench.PROMPT_TOKENS, bench.DECODE_TOKENS)
    REPORT.decode_bytes_per_token, REPORT.prefill_flops, REPORT.weight_bytes = costs
    return path


@pytest.fixture(scope="session")
def minilm_dir(models_root) -> Path:
    from refllm.weights.pull import model_path

    return model_path("all-minilm-l6-v2", models_root)


def _close(loaded) -> None:
    if loaded is not None and hasattr(loaded, "close"):
        loaded.close()


@pytest.fixture(scope="session", autouse=True)
def _close_engines_at_the_end():
    yield
    for loaded, _ in _ENGINES.values():
        _close(loaded)
    _ENGINES.clear()


def engine(kind: str, name: str, factory):
    """One loaded engine per (kind, name) for the session, or a skip with the reason.
    Engines of the other kind are dropped first, so only one model set is resident."""
    key = (kind, name)
    if key not in _ENGINES:
        for other in [k for k in _ENGINES if k[0] != kind]:
            _close(_ENGINES.pop(other)[0])
        _ENGINES[key] = bench.load_peer(name, factory)
    loaded, skipped = _ENGINES[key]
    if loaded is None:
        pytest.skip(f"{name}: {skipped}")
    return loaded


def record(task: str, name: str, units: int, unit: str, benchmark) -> bench.Result:
    seconds = list(benchmark.stats.stats.data)
    result = bench.Result(task, name, units, unit, seconds=seconds)
    REPORT.results.append(result)
    benchmark.extra_info["rate"] = f"{result.rate:.2f} {unit}"
    return result


def pytest_terminal_summary(terminalreporter, config):
    if not REPORT.results and REPORT.read_bandwidth is None:
        return
    order = {t: i for i, t in enumerate(["prefill", "decode", "embed b1", f"embed b{bench.EMBED_BATCH}"])}
    engines = {e: i for i, e in enumerate(bench.ALL_ENGINES)}
    REPORT.results.sort(key=lambda r: (order.get(r.task, 99), engines.get(r.engine, 99)))
    REPORT.machine = bench.machine_info()  # the load average at the end of the run
    if REPORT.read_bandwidth:  # no decode figure above the bandwidth reported (issue 17, item 12)
        bench.settle_bandwidth(REPORT, REPORT.read_bandwidth_probe or REPORT.read_bandwidth)
    table = bench.format_report(REPORT)
    terminalreporter.write_sep("=", "refllm bench")
    terminalreporter.write_line(table)
    if config.getoption("--bench-no-write"):
        return
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "latest.md").write_text(table + "\n")
    (RESULTS_DIR / "latest.json").write_text(json.dumps(REPORT.to_json(), indent=1) + "\n")
    chart = bench.write_chart(REPORT, RESULTS_DIR / "latest.png")
    terminalreporter.write_line(f"\nwritten: {RESULTS_DIR / 'latest.md'}, {chart or '(no chart: pip install matplotlib)'}")
