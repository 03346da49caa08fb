"""The oracle's commands, for `refllm.cli` to mount: `golden`, `trace` and `conform`.

    refllm golden --out DIR [--case NAME ...] [--quick] [--list] [--models-dir D]
    refllm golden --model PATH --suite FILE --out DIR [--name N] [--embedding-model PATH]
                  [--threads N] [--ray [ADDRESS]] [--workers N] [--case NAME ...] [--list]
    refllm trace PROMPT [--model M] [--max-tokens N] [WIT params] [--seed S] [--top N] [--json]
    refllm conform --against URL [--dialect spin|tgi|openai] [--golden DIR] [--token T]
                   [--report FILE] [--profile spec|spin|hf|llama.cpp] [--backend NAME]
                   [--case NAME ...] [--skip KIND ...] [--quick] [--sampled strict|stats|info|skip]
                   [--stats-n N] [--models-dir D]

    from refllm import oracle_cli
    oracle_cli.register(subparsers)        # adds the three subcommands; each parser gets
                                           # set_defaults(handler=...) and COMMANDS maps
                                           # the command name to the same handler
    exit_code = args.handler(args)

Handlers return an exit code: golden and trace 0; conform 0 (conforms), 1 (a scored case
failed), 2 (the backend or the golden set could not be used). refllm's errors
(`LLMError`) propagate to the caller, which maps them to its exit codes.
"""

from __future__ import annotations

import json
import sys

from .cli import DEFAULT_LLM  # noqa: E402
TRACE_MAX_TOKENS = 16


from .cli import _u64, add_param_flags, params_from_args  # noqa: E402  (the flags of `refllm infer`)


def register(subparsers) -> None:
    """Add `golden`, `trace` and `conform` to an argparse subparsers object."""

    p = subparsers.add_parser("golden", help="write a golden set (float64 reference): the built-in suite, or yours "
                                             "on your model",
                              description="Run a suite in float64 and write a golden set (golden.jsonl, tokenizers/, "
                                          "FORMAT.md) into DIR: the built-in suite on the default models, or with "
                                          "--model and --suite your cases on your Llama-family checkpoint "
                                          "(a safetensors directory, single or sharded, or a .gguf file).")
    p.add_argument("--out", metavar="DIR", help="directory to write into (required unless --list)")
    p.add_argument("--model", metavar="PATH", help="a Llama-family safetensors directory or .gguf file (with --suite)")
    p.add_argument("--suite", metavar="FILE", help="your cases, one JSON object a line (refllm/golden/SUITE.md)")
    p.add_argument("--name", help="the name the set gives --model (default: its directory or file name); "
                                  "the name a backend is asked for when the set is replayed")
    p.add_argument("--embedding-model", metavar="PATH", help="a sentence-transformers directory for the suite's "
                                                             "embedding cases")
    p.add_argument("--embedding-name", help="the name the set gives --embedding-model (default: its directory name)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="BLAS threads per process (default: 1; the header records it: the same N, the same bytes)")
    p.add_argument("--ray", nargs="?", const=True, metavar="ADDRESS",
                   help="spread the cases over a Ray cluster (host:port, ray://host:10001 or auto; without "
                        "ADDRESS: $RAY_ADDRESS, else a local cluster); the file is byte for byte the same")
    p.add_argument("--workers", type=int, metavar="N", help="with --ray: actors, each holding the model (default: "
                                                            "the cluster's CPUs / --threads)")
    p.add_argument("--models-dir", help="models root (default: $REFLLM_MODELS_DIR, ./.spin/ai-models, the cache)")
    p.add_argument("--case", action="append", metavar="NAME", help="only this case (repeatable)")
    p.add_argument("--quick", action="store_true", help="only the quick subset the tests replay (built-in suite)")
    p.add_argument("--list", action="store_true", help="list the cases (built-in, or of --suite) and exit")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(handler=cmd_golden)

    p = subparsers.add_parser("trace", help="trace one infer through the sampling pipeline, step by step",
                              description="Run one infer and print, per generated token, the top logits before "
                                          "and after each sampling step, the kept candidates, u and the choice.")
    p.add_argument("prompt")
    p.add_argument("--model", default=DEFAULT_LLM)
    add_param_flags(p, max_tokens=TRACE_MAX_TOKENS)
    p.add_argument("--seed", type=_u64, help="sampling seed (default: random, printed)")
    p.add_argument("--top", type=int, default=10, help="candidates shown per stage (default: 10)")
    p.add_argument("--width", type=int, default=5, help="candidates per line of logits (default: 5)")
    p.add_argument("--models-dir")
    p.add_argument("--backend", choices=["numpy", "triton"])
    p.add_argument("--precision", choices=["float32", "float64"], default="float32")
    p.add_argument("--json", action="store_true", help="print the trace as JSON")
    p.set_defaults(handler=cmd_trace)

    p = subparsers.add_parser("conform", help="check a running backend against the golden set",
                              description="Replay the golden cases against a backend over HTTP and report, per "
                                          "case, the exact-match length, the first divergence and refllm's margin "
                                          "there, embedding cosines, usage and errors. Exit 0: conforms; 1: a case "
                                          "failed; 2: the backend or the golden set could not be used.")
    p.add_argument("--against", required=True, metavar="URL", help="the backend's base URL")
    p.add_argument("--dialect", choices=["spin", "tgi", "openai"], default="spin")
    p.add_argument("--golden", metavar="DIR", help="a golden set (default: the built-in one, generated into the "
                                                   "cache from the local models on first use)")
    p.add_argument("--token", help="bearer token")
    p.add_argument("--report", metavar="FILE", help="write the JSON report here")
    p.add_argument("--profile", choices=["spec", "spin", "hf", "llama.cpp"], default="spec",
                   help="the behaviour the backend claims (default: spec)")
    p.add_argument("--case", action="append", metavar="NAME", help="only this case (repeatable)")
    p.add_argument("--quick", action="store_true", help="the quick subset of the built-in set")
    p.add_argument("--backend", choices=["refllm", "llama-cpp-python", "llama-server", "tgi", "vllm", "openai"],
                   help="the engine behind the URL: its parameter names, defaults, EOS counting, penalty window and "
                        "known behaviours (default: the one the profile names for the dialect)")
    p.add_argument("--skip", action="append", choices=["embed", "error", "sampled", "greedy"], default=[],
                   metavar="KIND", help="leave out a kind of case: embed, error, sampled, greedy (repeatable)")
    p.add_argument("--sampled", choices=["strict", "stats", "info", "skip"],
                   help="how sampled cases count: strict (token by token, SPEC 3's u; the spec profile's default), "
                        "stats (a G-test over N seeds; the other profiles' default), info, skip")
    p.add_argument("--stats-n", type=int, metavar="N", help="generations per sampled case for the statistical check "
                                                            "(default: chosen for power, see refllm.conform.stats)")
    p.add_argument("--models-dir", help="models root for building the built-in golden set")
    p.add_argument("--llm-model", help="the name the backend knows the golden decoder by")
    p.add_argument("--embedding-model", help="the name the backend knows the golden encoder by")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default: 600)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(handler=cmd_conform)


def cmd_golden(args) -> int:
    from . import golden
    from .errors import InvalidInputError

    if bool(args.model) != bool(args.suite):
        raise InvalidInputError("golden: --model PATH and --suite FILE go together (neither: the built-in suite)")
    if args.threads < 1 or (args.workers is not None and args.workers < 1):
        raise InvalidInputError("golden: --threads and --workers are at least 1")
    if args.suite and args.quick:
        raise InvalidInputError("golden: --quick picks from the built-in suite; with --suite, name cases with --case")
    models = None
    if args.model:
        try:
            models = golden.Models.from_paths(args.model, args.embedding_model, llm_name=args.name,
                                              embedder_name=args.embedding_name)
        except InvalidInputError as e:
            raise InvalidInputError(f"golden: {e.message}") from None
    elif args.embedding_model or args.name or args.embedding_name:
        raise InvalidInputError("golden: --name, --embedding-model and --embedding-name go with --model and --suite")
    try:
        if args.list:
            specs = golden.load_suite(args.suite, models.llm_name, models.embedder_name) if args.suite \
                else golden.BUILTIN
            for c in specs:
                print(golden.describe(c))
            return 0
        if not args.out:
            raise InvalidInputError("golden: --out DIR is required (or --list)")
        cases = args.case or (list(golden.QUICK) if args.quick else None)
        path = golden.write_golden(args.out, args.models_dir, cases=cases, suite=args.suite, models=models,
                                   threads=args.threads, ray=args.ray, workers=args.workers,
                                   progress=not args.quiet)
    except (golden.SuiteError, golden.CaseError, ValueError) as e:
        raise InvalidInputError(f"golden: {e}") from None
    print(path)
    return 0


def cmd_trace(args) -> int:
    from .trace import print_trace, trace

    params = params_from_args(args)
    t = trace(args.model, args.prompt, params, seed=args.seed, top=args.top, precision=args.precision,
              backend=args.backend, models_dir=args.models_dir)
    if args.json:
        print(json.dumps(t.to_dict(), ensure_ascii=False))
    else:
        print_trace(t, width=args.width)
    return 0


def cmd_conform(args) -> int:
    from . import golden
    from .conform import conform

    golden_dir = args.golden
    if golden_dir is None and args.quick:
        golden_dir = golden.builtin_golden_dir(args.models_dir, golden.QUICK, progress=not args.quiet)
    model_map = {}
    if args.llm_model:
        model_map[golden.LLM] = args.llm_model
    if args.embedding_model:
        model_map[golden.EMBEDDER] = args.embedding_model
    return conform(args.against, args.dialect, golden_dir, token=args.token, profile=args.profile,
                   report=args.report, cases=args.case, models_root=args.models_dir, sampled=args.sampled,
                   timeout=args.timeout, model_map=model_map, progress=not args.quiet, out=sys.stdout,
                   backend=args.backend, skip=args.skip, stats_n=args.stats_n)


COMMANDS = {"golden": cmd_golden, "trace": cmd_trace, "conform": cmd_conform}

__all__ = ["register", "COMMANDS", "cmd_golden", "cmd_trace", "cmd_conform"]
