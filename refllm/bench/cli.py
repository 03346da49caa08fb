"""`refllm bench` and `python -m refllm.bench`: the command line over `runner.run`.

    refllm bench [--rounds 5] [--engines ...] [--tasks prefill,decode,embed,memory]
                 [--streams 1,2,4,8] [--stream-modes invariant,throughput]
                 [--chart bench.png] [--json raw.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .report import format_report, write_chart
from .runner import run
from .workloads import ALL_ENGINES, ALL_TASKS, DEFAULT_TASKS, STREAM_COUNTS, STREAM_MODES


def add_bench_arguments(parser) -> None:
    parser.add_argument("--models-dir", help="the models root (default: $REFLLM_MODELS_DIR, ./.spin/ai-models, the user cache)")
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="the decoder to measure: a model name, or a PATH (a checkpoint directory or .gguf) for "
                             "load time, peak RSS and s/token beside transformers, one process at a time (big_model.py)")
    parser.add_argument("--embedding-model", default="all-minilm-l6-v2", help="the embedding model to measure")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per measurement; the median is reported")
    parser.add_argument("--engines", default=",".join(ALL_ENGINES),
                        help=f"comma-separated subset of: {', '.join(ALL_ENGINES)} (peers not installed are skipped)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help=f"comma-separated subset of: {', '.join(ALL_TASKS)} (default: all but streams)")
    parser.add_argument("--streams", metavar="N,N,...",
                        help="also measure refllm decoding N sequences together (Llama.decode_batch), e.g. "
                             f"{','.join(map(str, STREAM_COUNTS))}: aggregate tokens/s at each N, side by side in "
                             "each mode (default counts with --tasks streams)")
    parser.add_argument("--stream-modes", default=",".join(STREAM_MODES),
                        help=f"comma-separated subset of: {', '.join(STREAM_MODES)}")
    parser.add_argument("--in-process", action="store_true",
                        help="load every engine in this one process (default: each in a process of its own)")
    parser.add_argument("--chart", help="write the PNG chart here")
    parser.add_argument("--json", dest="json_out", help="write the raw measurements here")
    parser.add_argument("--no-pull", action="store_true", help="do not pull a missing default model")
    from .big_model import add_arguments as add_big_model_arguments

    add_big_model_arguments(parser)  # --prompt-tokens, --new-tokens (with --model PATH)


def _pick(text: str, allowed) -> list[str]:
    """Comma-separated names, each matched case-insensitively by its start ("llama" ->
    "llama.cpp F32"); ValueError naming a word that matches none."""
    by_lower = {a.lower(): a for a in allowed}
    picked = []
    for word in filter(None, (w.strip() for w in text.split(","))):
        match = by_lower.get(word.lower()) or next((a for a in allowed if a.lower().startswith(word.lower())), None)
        if match is None:
            raise ValueError(f"unknown choice {word!r}; choose from {', '.join(allowed)}")
        picked.append(match)
    return picked


def _stream_counts(text: str | None) -> list[int]:
    """"1,2,4,8" -> [1, 2, 4, 8] (STREAM_COUNTS when None); ValueError for anything but
    positive whole numbers."""
    if text is None:
        return list(STREAM_COUNTS)
    try:
        counts = sorted({int(w) for w in text.split(",") if w.strip()})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise ValueError(f"--streams takes stream counts such as 1,2,4,8, not {text!r}")
    return counts


def bench_from_args(args) -> int:
    """`refllm bench`: measure, print the table; 2 for a bad command line."""
    from .. import registry

    if Path(args.model).exists():  # a checkpoint of the user's own (refllm.bench.big_model)
        from . import big_model

        results = big_model.run(args.model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                log=lambda s: print(s, file=sys.stderr, flush=True))
        print(big_model.report(args.model, results))
        return 0 if all("error" not in r for r in results) else 4

    try:
        if args.rounds < 1:
            raise ValueError("--rounds must be at least 1")
        engines, tasks = _pick(args.engines, ALL_ENGINES), _pick(args.tasks, ALL_TASKS)
        streams, stream_modes = _stream_counts(args.streams), _pick(args.stream_modes, STREAM_MODES)
        if args.streams is not None and "streams" not in tasks:
            tasks.append("streams")
    except ValueError as e:
        print(f"refllm bench: error: {e}", file=sys.stderr)
        return 2
    if not args.no_pull:
        from ..weights.catalog import CATALOG
        from ..weights.pull import ensure_model

        for name, kind in ((args.model, "llama"), (args.embedding_model, "embedding")):
            if name in CATALOG:
                ensure_model(name, kind, args.models_dir)
    llama_dir = (registry.find_llm(args.model, args.models_dir)
                 if {"prefill", "decode", "memory", "streams"} & set(tasks) else None)
    minilm_dir = registry.find_embedding_model(args.embedding_model, args.models_dir) if "embed" in tasks else None
    report = run(llama_dir, minilm_dir, rounds=args.rounds, engines=engines, tasks=tasks,
                 models_dir=args.models_dir, llm_name=args.model, isolate=not args.in_process, streams=streams,
                 stream_modes=stream_modes, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_report(report))
    if args.chart:
        written = write_chart(report, args.chart)
        print(f"\nchart: {written}" if written else "\nchart: not written (pip install matplotlib)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report.to_json(), indent=1))
    return 0


def main(argv=None) -> int:
    import argparse

    from . import __doc__ as package_doc

    parser = argparse.ArgumentParser(prog="refllm bench", description=package_doc.split("\n")[0])
    add_bench_arguments(parser)
    return bench_from_args(parser.parse_args(argv))

