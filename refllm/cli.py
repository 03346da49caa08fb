"""The command line: a thin front over `refllm.api`, `refllm.weights` and `refllm.serve`.

    refllm pull NAME                      fetch a default model into the models root
    refllm models                         what is on disk, with sizes
    refllm infer [--model NAME] PROMPT    stream generated text to the terminal
    refllm embed [--model NAME] TEXT...   print embedding vectors (stdin: one text a line)
    refllm serve                          the HTTP server (Spin, Hugging Face, OpenAI)
    refllm bench                          tokens/s and GB/s beside the installed peers
    refllm golden --out DIR               write the float64 golden set of the default models
    refllm trace PROMPT                   one infer, step by step through the sampler
    refllm conform --against URL          check another backend against the golden set

Every failure ends with one line on stderr and a non-zero exit: 2 for a bad command
line or invalid input, 3 for an unsupported model, 4 for a runtime error.
Set REFLLM_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_LLM = "smollm2-135m-instruct"
DEFAULT_EMBEDDING = "all-minilm-l6-v2"
EXIT_CODES = {"invalid-input": 2, "model-not-supported": 3, "runtime-error": 4}


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr, not the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _finite_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _u32(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"out of range [0, 2^32): {value}")
    return value


def _u64(text: str) -> int:
    if not text.isdigit() or int(text) >= 2**64:
        raise argparse.ArgumentTypeError(f"not an integer in [0, 2^64): {text!r}")
    return int(text)


def add_param_flags(p, max_tokens: int | None = None) -> None:
    """One flag per WIT inferencing-param, defaulting to the WIT defaults."""
    from .types import InferencingParams

    d = InferencingParams()
    p.add_argument("--max-tokens", type=_u32, default=d.max_tokens if max_tokens is None else max_tokens,
                   help=None if max_tokens is None else f"(default: {max_tokens}, not the WIT's {d.max_tokens})")
    p.add_argument("--repeat-penalty", type=_finite_float, default=d.repeat_penalty)
    p.add_argument("--repeat-penalty-last-n-token-count", type=_u32, default=d.repeat_penalty_last_n_token_count)
    p.add_argument("--temperature", type=_finite_float, default=d.temperature)
    p.add_argument("--top-k", type=_u32, default=d.top_k)
    p.add_argument("--top-p", type=_finite_float, default=d.top_p)


def params_from_args(args):
    """The InferencingParams of the flags `add_param_flags` added."""
    from .types import InferencingParams

    return InferencingParams(
        max_tokens=args.max_tokens, repeat_penalty=args.repeat_penalty,
        repeat_penalty_last_n_token_count=args.repeat_penalty_last_n_token_count,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
    )


def _common(p):
    p.add_argument("--models-dir", help="the models root (default: $REFLLM_MODELS_DIR, ./.spin/ai-models, the user cache)")
    p.add_argument("--backend", choices=["numpy", "triton"], help="compute backend (default: triton with CUDA, else numpy)")
    p.add_argument("--precision", choices=["float32", "float64"], default="float32")
    p.add_argument("--profile", choices=["spec", "spin"], default="spec", help="spin: reproduce Spin 3's engine")
    p.add_argument("--json", action="store_true", help="print the WIT result as JSON")
    p.add_argument("--no-pull", action="store_true", help="do not pull a missing default model")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="refllm", description="A NumPy reference for Spin's Serverless AI interface.")
    parser.add_argument("--version", action="version", version=f"refllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("pull", help="fetch a default model into the models root")
    p.add_argument("name", help="smollm2-135m-instruct or all-minilm-l6-v2")
    p.add_argument("--models-dir")
    p.add_argument("--force", action="store_true", help="pull again even if present")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("models", help="list the models on disk")
    p.add_argument("--models-dir")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("infer", help="generate text")
    p.add_argument("prompt")
    p.add_argument("--model", default=DEFAULT_LLM)
    add_param_flags(p)
    p.add_argument("--seed", type=_u64, help="sampling seed (default: random, printed with --json)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as a user message")
    p.add_argument("--system", help="with --chat: a system message")
    _common(p)

    p = sub.add_parser("embed", help="compute sentence embeddings")
    p.add_argument("texts", nargs="*", help="texts to embed (default: one per line on stdin)")
    p.add_argument("--model", default=DEFAULT_EMBEDDING)
    _common(p)

    try:
        from .serve.app import add_serve_arguments
    except ImportError:
        add_serve_arguments = None
    if add_serve_arguments is not None:
        add_serve_arguments(sub.add_parser("serve", help="serve the Spin, Hugging Face and OpenAI HTTP APIs"))

    from .bench import add_bench_arguments

    add_bench_arguments(sub.add_parser("bench", help="benchmark refllm beside the installed peers (tokens/s, GB/s)"))

    from .oracle_cli import register as register_oracle

    register_oracle(sub)  # golden, trace, conform
    return parser


def _ensure(name: str, kind: str, args) -> None:
    """Pull a default model on first use (unless --no-pull)."""
    if getattr(args, "no_pull", False):
        return
    from .weights.catalog import CATALOG

    if name in CATALOG:
        from .weights.pull import ensure_model

        ensure_model(name, kind, args.models_dir)


def cmd_pull(args) -> int:
    from .weights.pull import pull

    path = pull(args.name, args.models_dir, progress=not args.quiet, force=args.force)
    print(path)
    return 0


def cmd_models(args) -> int:
    from .registry import list_models, models_root

    entries = list_models(args.models_dir)
    if args.json:
        print(json.dumps([{"name": e.name, "kind": e.kind, "path": str(e.path), "size_bytes": e.size_bytes} for e in entries], indent=2))
        return 0
    if not entries:
        print(f"no models in {models_root(args.models_dir)} (try: refllm pull {DEFAULT_LLM})")
        return 0
    width = max(len(e.name) for e in entries)
    for e in entries:
        print(f"{e.name:<{width}}  {e.kind:<9}  {e.size_bytes / 2**20:8.1f} MiB  {e.path}")
    return 0


def cmd_infer(args) -> int:
    from . import api

    _ensure(args.model, "llama", args)
    params = params_from_args(args)
    prompt = args.prompt
    if args.chat:
        from . import engine, registry

        llm = engine.get_llm(registry.find_llm(args.model, args.models_dir), precision=args.precision, backend=args.backend)
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        prompt = llm.apply_chat_template(messages)
    kwargs = dict(seed=args.seed, stop=args.stop, backend=args.backend, precision=args.precision, models_dir=args.models_dir)
    if args.json:
        r = api.infer(args.model, prompt, params, profile=args.profile, **kwargs)
        print(json.dumps({"text": r.text, "usage": {"prompt-token-count": r.usage.prompt_token_count,
                                                   "generated-token-count": r.usage.generated_token_count},
                          "seed": r.seed, "finish-reason": r.finish_reason}, ensure_ascii=False))
        return 0
    gen = api.infer_stream(args.model, prompt, params, **kwargs)
    if args.profile == "spin":
        sys.stdout.write(prompt)
    for piece in gen:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_embed(args) -> int:
    from . import api

    texts = args.texts if args.texts else [line.rstrip("\n") for line in sys.stdin]
    _ensure(args.model, "embedding", args)
    r = api.generate_embeddings(args.model, texts, backend=args.backend, precision=args.precision,
                                profile=args.profile, models_dir=args.models_dir)
    if args.json:
        print(json.dumps({"embeddings": r.embeddings, "usage": {"prompt-token-count": r.usage.prompt_token_count}}))
    else:
        for vector in r.embeddings:
            print(" ".join(f"{x:.7g}" for x in vector))
    return 0


def cmd_serve(args) -> int:
    from .serve.app import serve_from_args

    return serve_from_args(args) or 0


def cmd_bench(args) -> int:
    from .bench import bench_from_args

    _ensure(DEFAULT_LLM, "llama", args)
    _ensure(DEFAULT_EMBEDDING, "embedding", args)
    return bench_from_args(args)


def cmd_oracle(args) -> int:
    """golden / trace / conform (refllm.oracle_cli), with the default models pulled first."""
    from .oracle_cli import COMMANDS as ORACLE

    if args.command == "trace":
        _ensure(args.model, "llama", args)
    elif args.command == "golden" and not args.list or args.command == "conform" and not args.golden:
        _ensure(DEFAULT_LLM, "llama", args)
        _ensure(DEFAULT_EMBEDDING, "embedding", args)
    return ORACLE[args.command](args)


COMMANDS = {"pull": cmd_pull, "models": cmd_models, "infer": cmd_infer, "embed": cmd_embed, "serve": cmd_serve,
            "bench": cmd_bench, "golden": cmd_oracle, "trace": cmd_oracle, "conform": cmd_oracle}


def main(argv=None) -> int:
    from .errors import LLMError
    from .malloc import retain_freed_memory

    retain_freed_memory()  # a process-wide allocator setting: the application's call (refllm.malloc)

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except LLMError as e:
        print(f"refllm: error: {e}", file=sys.stderr)
        return EXIT_CODES.get(e.variant, 1)
    except KeyboardInterrupt:
        print("refllm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # never a traceback for a user: one line, and how to see more
        if os.environ.get("REFLLM_DEBUG"):
            raise
        print(f"refllm: error: {type(e).__name__}: {e} (set REFLLM_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
