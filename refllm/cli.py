"""The command line: a thin front over `refllm.api`, `refllm.weights` and `refllm.serve`.

    refllm pull NAME                    fetch a default model into the models root
    refllm models                       what is on disk, with sizes
    refllm show NAME                    a model's config, files, sizes, sha256s and chat template
    refllm rm NAME...                   delete models from disk
    refllm infer [-m NAME] PROMPT       stream generated text (PROMPT, -p PROMPT, -f FILE, or - for stdin)
    refllm chat [-m NAME]               an interactive chat under the model's chat template
    refllm embed [-m NAME] TEXT...      print embedding vectors (no TEXT: one text a line of stdin or -f FILE)
    refllm serve                        the HTTP server (Spin, Hugging Face, OpenAI); the `serve` extra
    refllm bench                        tokens/s and GB/s beside the installed peers
    refllm golden --out DIR             write the float64 golden set of the default models
    refllm trace PROMPT                 one infer, step by step through the sampler
    refllm conform --against URL        check another backend against the golden set

Flags follow llama.cpp's where they mean the same: -m model, -p prompt, -f prompt file,
-n max tokens, -s seed, -c context size, -t threads. `refllm` alone prints the usage.

Every failure ends with one line on stderr and an exit code (EXIT_HELP below): 2 for a
bad command line or invalid input (Spin's invalid-input, which is also what an unknown
model name is, SPEC section 5), 3 for a model that exists but not for this command
(model-not-supported), 4 for a runtime error (unreadable model files, a missing optional
dependency, anything unexpected), 130 when interrupted. Set REFLLM_DEBUG=1 to see
tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_LLM = "smollm2-135m-instruct"
DEFAULT_EMBEDDING = "all-minilm-l6-v2"
EXIT_CODES = {"invalid-input": 2, "model-not-supported": 3, "runtime-error": 4}
EXIT_RUNTIME = EXIT_CODES["runtime-error"]
EXIT_HELP = """\
exit codes:
  0    success
  2    invalid input: a bad flag or value, an unknown model name (Spin's invalid-input)
  3    model not supported: the model exists, but not for this command (model-not-supported)
  4    runtime error: unreadable model files, a missing extra, anything unexpected (runtime-error)
  130  interrupted (Ctrl-C)
  (refllm conform also exits 1 when the backend does not conform)
Every failure is one line on stderr; REFLLM_DEBUG=1 shows the traceback."""
SERVE_EXTRA_HINT = ("refllm serve needs the 'serve' extra (fastapi, uvicorn): pip install 'refllm[serve]' "
                    "(from a checkout: pip install '.[serve]')")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr, not the usage block."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

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


def _positive(text: str) -> int:
    value = _u32(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _u64(text: str) -> int:
    if not text.isdigit() or int(text) >= 2**64:
        raise argparse.ArgumentTypeError(f"not an integer in [0, 2^64): {text!r}")
    return int(text)


def add_param_flags(p, max_tokens: int | None = None) -> None:
    """One flag per WIT inferencing-param, defaulting to the WIT defaults."""
    from .types import InferencingParams

    d = InferencingParams()
    g = p.add_argument_group("sampling (the WIT's inferencing-params, applied in SPEC section 3's order)")
    n = d.max_tokens if max_tokens is None else max_tokens
    g.add_argument("-n", "--max-tokens", type=_u32, default=n, metavar="N",
                   help=f"generate at most N tokens (default: {n}" + (")" if max_tokens is None else
                                                                        f", not the WIT's {d.max_tokens})"))
    g.add_argument("--temperature", "--temp", type=_finite_float, default=d.temperature, metavar="T",
                   help=f"divide the logits by T; T <= 0 means greedy (the most likely token) (default: {d.temperature})")
    g.add_argument("--top-k", type=_u32, default=d.top_k, metavar="K",
                   help=f"sample from the K most likely tokens (default: {d.top_k})")
    g.add_argument("--top-p", type=_finite_float, default=d.top_p, metavar="P",
                   help=f"then from the fewest of them whose probability reaches P (default: {d.top_p})")
    g.add_argument("--repeat-penalty", type=_finite_float, default=d.repeat_penalty, metavar="R",
                   help=f"penalise tokens seen in the last N ids by R; 1 is none (default: {d.repeat_penalty})")
    g.add_argument("--repeat-penalty-last-n-token-count", "--repeat-last-n", type=_u32,
                   default=d.repeat_penalty_last_n_token_count, metavar="N",
                   help=f"the repeat penalty's window, prompt included (default: {d.repeat_penalty_last_n_token_count})")


def params_from_args(args):
    """The InferencingParams of the flags `add_param_flags` added."""
    from .types import InferencingParams

    return InferencingParams(
        max_tokens=args.max_tokens, repeat_penalty=args.repeat_penalty,
        repeat_penalty_last_n_token_count=args.repeat_penalty_last_n_token_count,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
    )


def _common(p, results: bool = True):
    """The flags of the commands that run a model; `results`: those that print a WIT result."""
    g = p.add_argument_group("model and output")
    g.add_argument("--models-dir", metavar="DIR",
                   help="the models root (default: $REFLLM_MODELS_DIR, ./.spin/ai-models, the user cache)")
    g.add_argument("--backend", choices=["numpy", "triton"], help="compute backend (default: triton with CUDA, else numpy)")
    g.add_argument("--precision", choices=["float32", "float64"], default="float32", help="(default: float32)")
    if results:
        g.add_argument("--profile", choices=["spec", "spin"], default="spec",
                       help="spin: reproduce Spin 3's engine (default: spec)")
        g.add_argument("--json", action="store_true", help="print the WIT result as JSON")
    g.add_argument("--no-pull", action="store_true", help="do not pull a missing default model")
    g.add_argument("-t", "--threads", type=_positive, metavar="N", help="BLAS threads (default: the BLAS's own, one a core)")
    g.add_argument("-v", "--verbose", action="store_true", help="timings on stderr: load, prompt and generation tokens/s")


def _generation_flags(p, results: bool = True):
    """The flags `infer` and `chat` share beside the sampling ones."""
    p.add_argument("-m", "--model", default=DEFAULT_LLM, help=f"the text-generation model (default: {DEFAULT_LLM})")
    add_param_flags(p)
    g = p.add_argument_group("generation")
    g.add_argument("-s", "--seed", type=_u64, help="sampling seed (default: random, printed with --json)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before TEXT (repeatable)")
    g.add_argument("--system", help="a system message for the chat template")
    g.add_argument("-c", "--ctx-size", type=_positive, metavar="N",
                   help="context length in tokens, prompt and answer together (default: the model's)")
    _common(p, results)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="refllm", description="A NumPy reference for Spin's Serverless AI interface.",
                     epilog="Run 'refllm COMMAND --help' for a command's options.\n\n" + EXIT_HELP)
    parser.add_argument("--version", action="version", version=f"refllm {__version__}")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("pull", help="fetch a default model (or convert a GGUF file) into the models root")
    p.add_argument("name", help="smollm2-135m-instruct or all-minilm-l6-v2; with --gguf, the name to install it as")
    p.add_argument("--gguf", metavar="FILE", help="convert this Llama GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, "
                                                   "Q4_K, Q6_K) into <models root>/llama/NAME")
    p.add_argument("--models-dir")
    p.add_argument("--force", action="store_true", help="pull again even if present")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("models", help="list the models on disk")
    p.add_argument("--models-dir")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("show", help="a model's config, files, sizes, sha256s and chat template")
    p.add_argument("name")
    p.add_argument("--models-dir")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("rm", help="delete models from disk")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--models-dir")

    p = sub.add_parser("infer", help="generate text", epilog=EXIT_HELP,
                       description="Generate text from a prompt, streamed to stdout; why it stopped goes to stderr.")
    p.add_argument("prompt", nargs="?", help="the prompt ('-': read it from stdin, without its last newline)")
    p.add_argument("-p", "--prompt", dest="prompt_flag", metavar="PROMPT", help="the prompt, as a flag")
    p.add_argument("-f", "--file", metavar="FILE", help="read the prompt from FILE, without its last newline ('-': stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as a user message")
    _generation_flags(p)

    p = sub.add_parser("chat", help="chat interactively (the model's chat template)", epilog=EXIT_HELP,
                       description="An interactive chat: each answer sees the whole conversation, rendered with "
                                   "the model's chat template. /exit or Ctrl-D leaves, /clear forgets, "
                                   "Ctrl-C stops an answer.")
    _generation_flags(p, results=False)

    p = sub.add_parser("embed", help="compute sentence embeddings", epilog=EXIT_HELP)
    p.add_argument("texts", nargs="*", help="texts to embed (default: one per line on stdin)")
    p.add_argument("-f", "--file", metavar="FILE", help="embed each line of FILE ('-': stdin)")
    p.add_argument("-m", "--model", default=DEFAULT_EMBEDDING, help=f"the embedding model (default: {DEFAULT_EMBEDDING})")
    _common(p)

    try:
        from .serve.app import add_serve_arguments
    except ImportError:  # the serve extra is not installed: say so when it is asked for
        p = sub.add_parser("serve", help="serve the Spin, Hugging Face and OpenAI HTTP APIs (needs the serve extra)",
                           description=SERVE_EXTRA_HINT, add_help=False, prefix_chars="\0")
        p.add_argument("rest", nargs="*")  # every argument, --help and flags included: cmd_serve gives the hint
    else:
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


# ---------------------------------------------------------------------------------------
# Input: prompts and texts from arguments, files or stdin, as UTF-8
# ---------------------------------------------------------------------------------------


def decode_utf8(data: bytes, source: str) -> str:
    """`data` as text; bytes that are not UTF-8 are invalid-input naming the line and column."""
    from .errors import InvalidInputError

    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise InvalidInputError(f"{source}, line {line}, column {column}: not UTF-8 text "
                                f"(byte 0x{data[e.start]:02x}: {e.reason})") from None


def _read(path: str) -> str:
    """The text of file `path`, or of stdin for '-'."""
    from .errors import InvalidInputError

    if path == "-":
        return decode_utf8(sys.stdin.buffer.read(), "stdin")
    try:
        with open(path, "rb") as f:
            return decode_utf8(f.read(), path)
    except OSError as e:
        raise InvalidInputError(f"cannot read {path}: {e.strerror}") from None


def _lines(text: str) -> list[str]:
    """One text a line ('\\n' or '\\r\\n'), a final newline ending the last one."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _prompt(args) -> str:
    from .errors import InvalidInputError

    given = [x for x in (args.prompt, args.prompt_flag, args.file) if x is not None]
    if len(given) != 1:
        raise InvalidInputError("give one prompt: PROMPT, -p PROMPT, -f FILE, or - to read it from stdin"
                                if not given else "give the prompt once: PROMPT, -p PROMPT or -f FILE")
    if args.file is None and args.prompt != "-":
        return given[0]
    text = _read("-" if args.file is None else args.file)
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text  # a file's last newline


# ---------------------------------------------------------------------------------------
# Process settings, loading, and what --verbose reports
# ---------------------------------------------------------------------------------------


def set_threads(n: int | None) -> None:
    """Use n threads in NumPy's BLAS (already loaded: threadpoolctl sets it in place) and
    in libraries loaded later (the OMP/OPENBLAS/MKL environment variables), torch included."""
    if n is None:
        return
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def blas_threads() -> str:
    """What the BLAS libraries of this process run on now, e.g. "openblas 2 threads"."""
    from threadpoolctl import threadpool_info

    pools = [f"{p['internal_api']} {p['num_threads']} thread{'s' * (p['num_threads'] != 1)}"
             for p in threadpool_info() if p.get("user_api") == "blas"]
    return ", ".join(dict.fromkeys(pools)) or "no BLAS found"


def load_llm(args):
    """The decoder of `--model`, pulled on first use, with `--ctx-size` applied."""
    import dataclasses

    from . import api
    from .errors import InvalidInputError

    llm = api.load_llm(args.model, backend=args.backend, precision=args.precision, models_dir=args.models_dir,
                       pull=not args.no_pull)
    if args.ctx_size is not None:
        if args.ctx_size > llm.context_length:
            raise InvalidInputError(f"--ctx-size {args.ctx_size} is more than the {llm.context_length} tokens "
                                    f"of context model '{args.model}' was trained for")
        llm = dataclasses.replace(llm, context_length=args.ctx_size)
    return llm


def stop_reason(gen) -> str:
    """Why generation `gen` stopped, as "[stopped: ...]" says it."""
    reason = gen.result.finish_reason
    if reason == "length":
        return f"max-tokens {gen.params.max_tokens}"
    if reason == "context":
        return f"context {gen.llm.context_length}"
    if reason == "stop":
        return f"stop {gen.stop_sequence!r}"
    return reason


def timings(gen, load_s: float | None = None) -> str:
    """llama.cpp's timing summary: the load, the prompt (prefill and the first token), and
    the generation of every later token."""
    lines = []
    if load_s is not None:
        lines.append(f"load:        {load_s:8.2f} s    ({gen.llm.name}, {gen.llm.model.backend}, "
                     f"{blas_threads()})")
    n_prompt, n_gen = len(gen.prompt_ids), len(gen.tokens)
    if gen.first_token_at is not None:
        prompt_s = gen.first_token_at - gen.started_at
        lines.append(f"prompt:      {prompt_s:8.2f} s    {n_prompt} tokens, {n_prompt / prompt_s:8.1f} tokens/s")
        decode_s = gen.finished_at - gen.first_token_at
        if n_gen > 1 and decode_s > 0:
            lines.append(f"generation:  {decode_s:8.2f} s    {n_gen - 1} tokens after the first, "
                         f"{(n_gen - 1) / decode_s:8.1f} tokens/s")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------


def cmd_pull(args) -> int:
    from .weights.pull import pull, pull_gguf

    if args.gguf:
        path = pull_gguf(args.gguf, args.name, args.models_dir, progress=not args.quiet, force=args.force)
    else:
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


def cmd_show(args) -> int:
    from .registry import describe_model

    info = describe_model(args.name, args.models_dir)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    print(f"{info['name']}  ({info['kind']}, {info['path']})")
    if info["parameters"] is not None:
        print(f"parameters  {info['parameters']:,}")
    for file_name in ("config", "generation_config", "sentence_bert_config"):
        if info.get(file_name):
            print(f"\n{file_name}.json")
            for key, value in info[file_name].items():
                print(f"  {key:<32} {json.dumps(value)}")
    print("\nfiles")
    width = max(len(f["path"]) for f in info["files"])
    for f in info["files"]:
        print(f"  {f['path']:<{width}}  {f['size_bytes']:>13,} bytes  sha256 {f['sha256']}")
    print(f"  {'total':<{width}}  {info['size_bytes']:>13,} bytes")
    if info.get("chat_template"):
        print("\nchat template")
        print("  " + info["chat_template"].replace("\n", "\n  "))
    return 0


def cmd_rm(args) -> int:
    from .registry import remove_model

    for name in args.names:
        for path in remove_model(name, args.models_dir):
            print(f"deleted '{name}' ({path})")
    return 0


def cmd_infer(args) -> int:
    from .api import as_profile
    from .errors import InvalidInputError
    from .generate import Generation

    set_threads(args.threads)
    prompt = _prompt(args)
    params = params_from_args(args)
    started = time.perf_counter()
    llm = load_llm(args)
    load_s = time.perf_counter() - started
    if args.system is not None and not args.chat:
        raise InvalidInputError("--system needs --chat (a system message is part of the chat template)")
    if args.chat:  # the template's text, tokenized without adding special tokens (SPEC 2.1)
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        prompt = llm.apply_chat_template(messages)
    gen = Generation(llm, prompt, params, seed=args.seed, stop=args.stop)
    if args.json:
        r = as_profile(gen.run(), prompt, args.profile)
        print(json.dumps({"text": r.text, "usage": {"prompt-token-count": r.usage.prompt_token_count,
                                                   "generated-token-count": r.usage.generated_token_count},
                          "seed": r.seed, "finish-reason": r.finish_reason}, ensure_ascii=False))
    else:
        if args.profile == "spin":
            sys.stdout.write(prompt)
        for piece in gen:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(f"[stopped: {stop_reason(gen)}]", file=sys.stderr)
    if args.verbose:
        print(timings(gen, load_s), file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .chat_repl import run_chat

    set_threads(args.threads)
    started = time.perf_counter()
    llm = load_llm(args)
    if args.verbose:
        print(f"load: {time.perf_counter() - started:.2f} s ({llm.name}, {llm.model.backend}, {blas_threads()})",
              file=sys.stderr)
    return run_chat(llm, params_from_args(args), system=args.system, seed=args.seed, stop=args.stop,
                    verbose=args.verbose)


def cmd_embed(args) -> int:
    from . import api
    from .errors import InvalidInputError

    set_threads(args.threads)
    if args.texts and args.file is not None:
        raise InvalidInputError("give the texts as arguments or with -f FILE, not both")
    texts = args.texts or _lines(_read("-" if args.file is None else args.file))
    started = time.perf_counter()
    r = api.generate_embeddings(args.model, texts, backend=args.backend, precision=args.precision,
                                profile=args.profile, models_dir=args.models_dir, pull=not args.no_pull)
    if args.json:
        print(json.dumps({"embeddings": r.embeddings, "usage": {"prompt-token-count": r.usage.prompt_token_count}}))
    else:
        for vector in r.embeddings:
            print(" ".join(f"{x:.7g}" for x in vector))
    if args.verbose:
        seconds = time.perf_counter() - started
        print(f"embed: {seconds:.2f} s (load included), {len(texts)} texts, {r.usage.prompt_token_count} tokens "
              f"({blas_threads()})", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    if hasattr(args, "rest"):  # the stub parser: the serve extra is missing
        from .errors import LLMRuntimeError

        raise LLMRuntimeError(SERVE_EXTRA_HINT)
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
    elif (args.command == "golden" and not args.list and not args.model
          or args.command == "conform" and not args.golden):
        _ensure(DEFAULT_LLM, "llama", args)
        _ensure(DEFAULT_EMBEDDING, "embedding", args)
    return ORACLE[args.command](args)


COMMANDS = {"pull": cmd_pull, "models": cmd_models, "show": cmd_show, "rm": cmd_rm,
            "infer": cmd_infer, "chat": cmd_chat, "embed": cmd_embed, "serve": cmd_serve, "bench": cmd_bench,
            "golden": cmd_oracle, "trace": cmd_oracle, "conform": cmd_oracle}


def main(argv=None) -> int:
    from .errors import LLMError
    from .malloc import retain_freed_memory

    retain_freed_memory()  # a process-wide allocator setting: the application's call (refllm.malloc)

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # `refllm` alone: what it can do
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except LLMError as e:
        print(f"refllm: error: {e}", file=sys.stderr)
        return EXIT_CODES.get(e.variant, EXIT_RUNTIME)
    except KeyboardInterrupt:
        print("refllm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # never a traceback for a user: one line, and how to see more
        if os.environ.get("REFLLM_DEBUG"):
            raise
        print(f"refllm: error: runtime-error: {type(e).__name__}: {e} (set REFLLM_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
