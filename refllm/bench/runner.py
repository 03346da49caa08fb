"""The whole `refllm bench` run: every task on every engine, in turns, into a `Report`.

Each figure is the median of `rounds` timed rounds after one untimed warm-up round,
and the rounds of the engines are taken in turn, A B C A B C ..., so that a burst of
load on a shared machine hits all of them (`_measure_interleaved`). The streams task
takes its stream counts and modes in turn the same way. The read-bandwidth probe is
sampled between the decode turns, and `settle_bandwidth` makes the reported bandwidth
one that no decode round exceeded.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .engines import time_task
from .isolation import EngineProcess, close_engines, load_engines
from .probes import ReadBandwidth, infer_peak_rss_both, llama_costs, machine_info, n_threads, read_bandwidth
from .workloads import (ALL_ENGINES, DECODE_TOKENS, DEFAULT_TASKS, EMBED_BATCH, EMBED_PASSES, PROMPT_TOKENS, REFLLM,
                        SENTENCES, STREAM_COUNTS, STREAM_MODES, STREAM_STEPS, parse_streams_task, prompt_ids,
                        streams_task)


@dataclass
class Result:
    """One (task, engine) measurement: `seconds` of each timed round for `units` units."""

    task: str  # "prefill", "decode", "embed b1", "embed b32", "streams 8 invariant"
    engine: str
    units: int  # tokens or sentences per round
    unit: str  # "tok/s" or "sent/s"
    seconds: list[float] = field(default_factory=list)
    skipped: str | None = None  # why the engine was not measured

    @property
    def rate(self) -> float:  # units/s of the median round
        return self.units / statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def best_rate(self) -> float:  # units/s of the fastest round
        return self.units / min(self.seconds) if self.seconds else float("nan")


@dataclass
class Report:
    results: list[Result]
    machine: dict
    read_bandwidth: float | None = None  # bytes/s, no decode round above it (settle_bandwidth)
    read_bandwidth_probe: float | None = None  # bytes/s, the probe's best sample
    read_bandwidth_samples: int = 0  # how many samples the probe took
    read_bandwidth_note: str = ""  # set when a decode round read faster than the probe
    decode_bytes_per_token: float | None = None
    prefill_flops: float | None = None  # per prompt
    weight_bytes: int | None = None  # float32 bytes of the Llama's weights
    peak_rss: int | None = None  # bytes, `refllm infer` as a user runs it
    peak_rss_numpy: int | None = None  # bytes, `refllm infer --backend numpy` (no CUDA probe)
    peak_rss_note: str = ""
    isolated: bool = False  # each engine timed in a process of its own

    def rate(self, task: str, engine: str) -> float | None:
        for r in self.results:
            if r.task == task and r.engine == engine and r.seconds:
                return r.rate
        return None

    def streams(self) -> dict[str, dict[int, float]]:  # mode -> {streams: aggregate tok/s}
        out: dict[str, dict[int, float]] = {}
        for r in self.results:
            if (parsed := parse_streams_task(r.task)) is not None and r.seconds:
                n, mode = parsed
                out.setdefault(mode, {})[n] = r.rate
        return {mode: dict(sorted(rates.items())) for mode, rates in out.items()}

    def to_json(self) -> dict:
        return {**asdict(self), "rates": {f"{r.task} / {r.engine}": r.rate for r in self.results if r.seconds}}


def settle_bandwidth(report: Report, probe_best: float) -> None:
    """The machine's read bandwidth for the report: the probe's best sample, unless a
    decode round read faster (its tokens/s x the bytes a token reads), which then sets
    it. A decode round that streams every weight from memory is itself a reader, and any
    reader that reaches a rate proves the memory delivers it; so no decode figure can
    exceed 100% of the bandwidth reported, and the report says when the probe read less
    than a decode round did."""
    report.read_bandwidth_probe = report.read_bandwidth = probe_best
    bpt = report.decode_bytes_per_token
    decoded = [r for r in report.results if r.task == "decode" and r.seconds]
    if not bpt or not decoded:
        return
    fastest = max(decoded, key=lambda r: r.best_rate)
    achieved = fastest.best_rate * bpt
    if achieved > probe_best:
        report.read_bandwidth = achieved
        report.read_bandwidth_note = (f"set by the fastest decode round ({fastest.engine}): the probe's best sample "
                                      f"read {probe_best / 1e9:.1f} GB/s, less than that round streamed")


def run(llama_dir=None, minilm_dir=None, *, rounds: int = 5, engines=ALL_ENGINES, tasks=DEFAULT_TASKS,
        models_dir=None, llm_name: str | None = None, isolate: bool = True, streams=STREAM_COUNTS,
        stream_modes=STREAM_MODES, log=print) -> Report:
    """Measure everything asked for; a missing model directory skips its tasks. With
    `isolate` (the default) each engine runs in its own process (`EngineProcess`);
    without it, all of them in this one. The "streams" task measures refllm alone:
    aggregate decode tokens/s of each count in `streams`, in each of `stream_modes`."""
    threads = n_threads()
    report = Report(results=[], machine=machine_info(), isolated=isolate)
    log(f"# machine: {report.machine}")
    probe = ReadBandwidth()  # sampled between the decode rounds, or on its own
    if llama_dir is not None:
        from ..config import LlamaConfig

        config = LlamaConfig.from_file(Path(llama_dir) / "config.json")
        report.decode_bytes_per_token, report.prefill_flops, report.weight_bytes = llama_costs(
            config, PROMPT_TOKENS, DECODE_TOKENS)
    llm_tasks = [t for t in ("prefill", "decode") if t in tasks]
    if llama_dir is not None and "streams" in tasks:
        llm_tasks += [streams_task(n, mode) for n in streams for mode in stream_modes]
    if llama_dir is not None and llm_tasks:
        log("# loading the decoders ...")
        if "streams" in tasks and REFLLM not in engines:
            log(f"# streams: not measured ({REFLLM} is not among the engines)")
        peers = {"prefill", "decode"} & set(tasks)  # the streams task alone needs refllm alone
        loaded = load_engines("llm", llama_dir, [e for e in engines if peers or e == REFLLM], threads, isolate)
        try:
            _measure_interleaved(_jobs(loaded, llm_tasks, prompt_ids(llama_dir)), rounds, report, log,
                                 probe={"decode": probe})
        finally:
            close_engines(loaded)
        del loaded
    if not probe.samples:  # no decode rounds to sample between
        log("# measuring read bandwidth ...")
        probe.sample()
        probe.samples.clear()  # the warm-up pass
        for _ in range(7):
            probe.sample()
    settle_bandwidth(report, probe.best())
    report.read_bandwidth_samples = len(probe.samples)
    log(f"# read bandwidth: {report.read_bandwidth / 1e9:.1f} GB/s (the best of {len(probe.samples)} samples"
        + (f"; {report.read_bandwidth_note})" if report.read_bandwidth_note else ")"))
    del probe

    if minilm_dir is not None and "embed" in tasks:
        log("# loading the embedders ...")
        loaded = load_engines("embed", minilm_dir, engines, threads, isolate)
        try:
            _measure_interleaved(_jobs(loaded, ["embed b1", f"embed b{EMBED_BATCH}"]), rounds, report, log)
        finally:
            close_engines(loaded)
        del loaded

    if "memory" in tasks and llm_name is not None:
        log("# measuring the peak memory of `refllm infer` ...")
        try:
            report.peak_rss, report.peak_rss_numpy = infer_peak_rss_both(llm_name, models_dir)
        except Exception as e:
            report.peak_rss_note = f"not measured: {e}"
    return report


def _jobs(loaded, tasks, ids=None) -> dict:
    """{turn group: [(Result, engine or None, timed round)]} for `_measure_interleaved`:
    a task's group holds its engines; the streams tasks share one group ("streams"),
    refllm's alone, so that their counts and modes take turns too."""
    def timed(engine, task):
        if isinstance(engine, EngineProcess):
            return lambda: engine.time(task)
        return lambda: time_task(engine, task, ids)

    units = {"prefill": (PROMPT_TOKENS, "tok/s"), "decode": (DECODE_TOKENS, "tok/s")}
    jobs: dict = {}
    for task in tasks:
        if (parsed := parse_streams_task(task)) is not None:
            n_streams, _ = parsed
            jobs.setdefault("streams", []).extend(
                (Result(task, name, n_streams * STREAM_STEPS, "tok/s", skipped=skipped), engine, timed(engine, task))
                for name, engine, skipped in loaded if name == REFLLM)
            continue
        n, unit = units.get(task, (EMBED_PASSES * len(SENTENCES), "sent/s"))
        jobs[task] = [(Result(task, name, n, unit, skipped=skipped), engine, timed(engine, task))
                      for name, engine, skipped in loaded]
    return jobs


def _measure_interleaved(jobs: dict, rounds: int, report: Report, log, probe: dict | None = None) -> None:
    """For each group of turns, one warm-up round of each, then the timed rounds in turn
    (engine A, B, C, A, B, C, ...): on a shared machine a burst of load falls on every
    engine alike, and the ratios of one run stay fair. `probe[group]`, when given, is a
    `ReadBandwidth` sampled once per turn (A, B, C, probe, A, B, C, probe, ...)."""
    for group, entries in jobs.items():
        live = [(result, timed) for result, engine, timed in entries if engine is not None]
        sample = (probe or {}).get(group)
        for _, timed in live:
            timed()  # warm-up
        if sample is not None and live:
            sample.sample()
            sample.samples.pop()  # the warm-up pass
        for _ in range(rounds):
            for result, timed in live:
                result.seconds.append(timed())
            if sample is not None and live:
                sample.sample()
        for result, engine, _ in entries:
            report.results.append(result)
            what = f"{result.rate:8.1f} {result.unit}" if engine is not None else f"skipped: {result.skipped}"
            log(f"# {result.task:9} {result.engine:22} {what}")
