"""The report of a `refllm bench` run: a markdown table and a PNG chart.

    format_report(report)        rates, refllm's ratio to each peer, bandwidth achieved
                                 and GFLOP/s; the streams table when it was measured
    write_chart(report, path)    decode and prefill bars against the bandwidth floor,
                                 and aggregate tokens/s against the number of streams
"""

from __future__ import annotations

from pathlib import Path

from .runner import Report
from .workloads import (ALL_ENGINES, DECODE_TOKENS, EMBED_BATCH, LLAMA_CPP, PROMPT_TOKENS, REFLLM, STREAM_STEPS,
                        TRANSFORMERS, parse_streams_task)


def format_report(report: Report) -> str:
    """The markdown table: each engine's rate, refllm's ratio to it, and the physics."""
    lines = []
    m = report.machine
    lines.append(f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('blas', 'BLAS unknown')}; "
                 f"load average {m.get('load average', '?')}.")
    bw = report.read_bandwidth
    bpt = report.decode_bytes_per_token
    if bw:
        how = (f"streaming reads of 512 MiB on huge pages, {m.get('cores')} threads, the fastest of three readers; "
               f"the best of {report.read_bandwidth_samples or 'its'} samples")
        if report.read_bandwidth_note:
            how += f"; {report.read_bandwidth_note}"
        lines.append(f"Measured read bandwidth: {bw / 1e9:.1f} GB/s ({how})"
                     + (f"; decode reads {bpt / 1e6:.0f} MB a token, so the bandwidth floor is "
                        f"{bw / bpt:.1f} tok/s." if bpt else "."))
    lines.append("Each engine ran in a process of its own." if report.isolated else
                 "All engines ran in one process (`--in-process`).")
    lines.append("")
    lines.append("| task | engine | median | refllm ÷ engine | physics |")
    lines.append("| --- | --- | ---: | ---: | --- |")
    labels = {"prefill": f"prefill ({PROMPT_TOKENS}-token prompt)", "decode": f"decode ({DECODE_TOKENS} tokens, batch 1)",
              "embed b1": "embeddings, batch 1", f"embed b{EMBED_BATCH}": f"embeddings, batch {EMBED_BATCH}"}
    task_order = {t: i for i, t in enumerate(labels)}
    engine_order = {e: i for i, e in enumerate(ALL_ENGINES)}
    per_engine = [r for r in report.results if parse_streams_task(r.task) is None]  # streams: a table of their own
    for r in sorted(per_engine, key=lambda r: (task_order.get(r.task, 99), engine_order.get(r.engine, 99))):
        label = labels.get(r.task, r.task)
        if not r.seconds:
            lines.append(f"| {label} | {r.engine} | skipped: {r.skipped} | | |")
            continue
        ours = report.rate(r.task, REFLLM)
        ratio = "" if r.engine == REFLLM or ours is None else f"{ours / r.rate:.2f}×"
        physics = ""
        if r.task == "decode" and bpt:
            achieved = r.rate * bpt
            physics = f"{achieved / 1e9:.1f} GB/s" + (f" ({bandwidth_share(achieved, bw)})" if bw else "")
        elif r.task == "prefill" and report.prefill_flops:
            physics = f"{r.rate / PROMPT_TOKENS * report.prefill_flops / 1e9:.0f} GFLOP/s"
        lines.append(f"| {label} | {r.engine} | {r.rate:.1f} {r.unit} | {ratio} | {physics} |")
    if report.streams():
        lines.append("")
        lines.append(format_streams(report))
    if report.peak_rss is not None and report.weight_bytes:
        w = report.weight_bytes
        lines.append("")
        lines.append(f"Peak resident memory of `refllm infer` (default model): {report.peak_rss / 1e6:.0f} MB = "
                     f"{report.peak_rss / w:.2f}× the {w / 1e6:.0f} MB of float32 weights")
        if report.peak_rss_numpy is not None and report.peak_rss > 1.05 * report.peak_rss_numpy:
            lines[-1] += (f"; with `--backend numpy` {report.peak_rss_numpy / 1e6:.0f} MB = {report.peak_rss_numpy / w:.2f}× "
                          f"(the default backend's CUDA probe imported torch).")
        else:
            lines[-1] += "."
    elif report.peak_rss_note:
        lines.append("")
        lines.append(f"Peak resident memory of `refllm infer`: {report.peak_rss_note}")
    return "\n".join(lines)


def bandwidth_share(achieved: float, bandwidth: float) -> str:
    """"83% of measured"; above 100% (a report written before `settle_bandwidth`, or
    figures put together by hand) the bandwidth figure is wrong, and it says so."""
    if achieved > bandwidth:
        return "above the measured bandwidth: that figure is unreliable"
    return f"{achieved / bandwidth:.0%} of measured"


def format_streams(report: Report) -> str:
    """Aggregate decode tokens/s of n streams (`Llama.decode_batch`) in each mode, side
    by side, each as a multiple of one stream decoding alone in the invariant mode (the
    single-sequence step, bit for bit)."""
    streams = report.streams()
    modes = [m for m in ("invariant", "throughput") if m in streams] + sorted(set(streams) - {"invariant", "throughput"})
    one = streams.get("invariant", {}).get(1)
    counts = sorted({n for rates in streams.values() for n in rates})
    head = " | ".join(f"{m}{' (default)' if m == 'invariant' else ''} | × 1 stream" for m in modes)
    lines = [f"Concurrent streams, refllm (NumPy) `Llama.decode_batch`: aggregate decode tokens/s of n sequences "
             f"stepped together ({STREAM_STEPS} steps after the {PROMPT_TOKENS}-token prompt); × 1 stream is against "
             f"one stream in the invariant mode.",
             "",
             f"| streams | {head} |",
             "| ---: |" + " ---: | ---: |" * len(modes)]
    for n in counts:
        cells = []
        for m in modes:
            rate = streams[m].get(n)
            cells.append("" if rate is None else f"{rate:.1f} tok/s")
            cells.append("" if rate is None or not one else f"{rate / one:.2f}×")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_chart(report: Report, path) -> Path | None:
    """A PNG: decode and prefill tokens/s of each engine, decode against the bandwidth
    floor; and aggregate tokens/s against the number of streams, when measured."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = Path(path)
    tasks = [t for t in ("decode", "prefill") if any(r.task == t and r.seconds for r in report.results)]
    streams = report.streams()
    panels = len(tasks) + bool(streams)
    if not panels:
        return None
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.4), dpi=100, squeeze=False)
    axes = list(axes[0])
    colours = {REFLLM: "#2b6cb0", LLAMA_CPP: "#718096", TRANSFORMERS: "#dd6b20"}
    if streams:
        _streams_panel(axes.pop(), streams)
    for ax, task in zip(axes, tasks):
        rows = [r for r in report.results if r.task == task and r.seconds]
        names = [r.engine for r in rows]
        rates = [r.rate for r in rows]
        bars = ax.barh(names, rates, color=[colours.get(n, "#4a5568") for n in names])
        ax.bar_label(bars, fmt="%.0f", padding=3, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("tokens/s")
        title = f"decode, batch 1 ({DECODE_TOKENS} tokens)" if task == "decode" else f"prefill ({PROMPT_TOKENS}-token prompt)"
        if task == "decode" and report.read_bandwidth and report.decode_bytes_per_token:
            floor = report.read_bandwidth / report.decode_bytes_per_token
            ax.axvline(floor, color="#c53030", linestyle="--", linewidth=1.2)
            ax.text(floor, len(rows) - 0.5, f" bandwidth floor\n {floor:.0f} tok/s\n ({report.read_bandwidth / 1e9:.0f} GB/s)",
                    color="#c53030", fontsize=7, va="bottom")
            ax.set_xlim(0, max(rates + [floor]) * 1.35)
        elif rates:
            ax.set_xlim(0, max(rates) * 1.2)
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"SmolLM2-135M float32 on {report.machine.get('cores')} cores of {report.machine.get('cpu')}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _streams_panel(ax, streams: dict) -> None:
    """Aggregate tokens/s against streams, a line per mode, beside n x one stream."""
    styles = {"invariant": ("#2b6cb0", "o"), "throughput": ("#dd6b20", "s")}
    one = streams.get("invariant", {}).get(1)
    for mode, rates in streams.items():
        colour, marker = styles.get(mode, ("#4a5568", "^"))
        ns = list(rates)
        ax.plot(ns, [rates[n] for n in ns], marker=marker, color=colour, label=mode)
        for n in ns:
            ax.annotate(f"{rates[n]:.0f}", (n, rates[n]), textcoords="offset points", xytext=(0, 5), fontsize=7,
                        ha="center", color=colour)
    if one:
        ns = sorted({n for rates in streams.values() for n in rates})
        ax.plot(ns, [one * n for n in ns], linestyle=":", color="#a0aec0", label="n × one stream")
        ax.set_ylim(0, max(max(r.values()) for r in streams.values()) * 1.3)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({n for rates in streams.values() for n in rates}))
    ax.get_xaxis().set_major_formatter("{x:.0f}")
    ax.set_xlabel("streams (sequences decoded together)")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title("decode_batch, aggregate", fontsize=10)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=8)
