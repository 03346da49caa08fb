"""A big half-precision checkpoint, refllm beside transformers: load time, peak RSS, seconds a token.

    refllm bench --model PATH [--prompt-tokens 16] [--new-tokens 8]     PATH: a directory or .gguf
    python -m refllm.bench.big_model PATH [--engines refllm,transformers]
    pytest bench/test_big_model.py -s     (writes the 32-layer 7B-shaped bf16 checkpoint once)

Each engine runs in a process of its own, one after the other, never two at once: a 7B
bfloat16 checkpoint is 13.5 GB and this is meant for a machine where two would not fit.

- refllm: `Llama.from_pretrained(PATH)`, its automatic choice (`refllm.half_weights`):
  when the float32 copy would not fit (27 GB for 7B), the half-precision matrices stay in
  the mapped file and are widened to float32 one at a time, as each layer uses them.
- transformers: `AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.bfloat16)`,
  computing in bfloat16 (its float32 would not fit either).

Both run the same prompt (token ids), prefill it, then decode greedily. Measured in the
child: the load (`from_pretrained`, imports not counted, from the file in the page
cache or on disk, as it is), the prefill, the median seconds of a decode step, and the peak resident set
(`ru_maxrss`, which counts the file's pages mapped and read). The two engines compute
in different precisions, so their greedy tokens may part after a few steps; the report
says how many agree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ("refllm", "transformers")


def measure(engine: str, model_dir: str, prompt: list[int], new_tokens: int) -> dict:
    """In this process: load `model_dir` with `engine`, prefill `prompt`, decode `new_tokens` greedily."""
    import resource

    import numpy as np

    if engine == "refllm":  # the imports first: "load" is from_pretrained alone
        from refllm.half_weights import WidenedLayer
        from refllm.llama import Llama

        t0 = time.perf_counter()
        model = Llama.from_pretrained(model_dir)
        mode = "widened on use" if isinstance(model.layers[0], WidenedLayer) else "float32 copy"
        load = time.perf_counter() - t0
        cache = model.new_cache(len(prompt) + new_tokens)
        t1 = time.perf_counter()
        logits = model(prompt, cache, last_only=True)[0]
        prefill = time.perf_counter() - t1

        def step(token):
            return model.decode(token, cache)
    elif engine == "transformers":
        import torch
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
        mode = "bfloat16"
        load = time.perf_counter() - t0
        t1 = time.perf_counter()
        with torch.no_grad():
            out = model(torch.tensor([prompt]), use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1].float().numpy()
        prefill = time.perf_counter() - t1

        def step(token):
            nonlocal past
            with torch.no_grad():
                out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            return out.logits[0, -1].float().numpy()
    else:
        raise ValueError(f"unknown engine {engine!r}; choose from {ENGINES}")

    tokens, seconds = [], []
    for _ in range(new_tokens):
        tokens.append(int(np.argmax(logits)))
        t = time.perf_counter()
        logits = step(tokens[-1])
        seconds.append(time.perf_counter() - t)
    return {"engine": engine, "mode": mode, "load_s": load, "prefill_s": prefill, "prompt_tokens": len(prompt),
            "decode_s": seconds, "s_per_token": float(np.median(seconds)), "tokens": tokens,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB


def run(model_dir, engines=ENGINES, prompt_tokens: int = 16, new_tokens: int = 8, threads: int | None = None,
        log=None) -> list[dict]:
    """Each engine measured in a child process, one at a time (a .gguf is converted first)."""
    from refllm.weights.pull import local_model_dir

    model_dir = local_model_dir(model_dir)
    import numpy as np

    from refllm.config import LlamaConfig

    config = LlamaConfig.from_file(Path(model_dir) / "config.json")
    prompt = np.random.default_rng(0).integers(3, config.vocab_size, prompt_tokens).tolist()
    results = []
    for engine in engines:
        if log:
            log(f"big model: {engine} on {model_dir} ...")
        env = dict(os.environ)
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
        child = subprocess.run([sys.executable, "-m", "refllm.bench.big_model", "--child", engine, str(model_dir),
                                json.dumps(prompt), str(new_tokens)], env=env, capture_output=True, text=True)
        if child.returncode != 0:
            results.append({"engine": engine, "error": child.stderr.strip().splitlines()[-1:] or [f"exit {child.returncode}"]})
            continue
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        if log:
            log(json.dumps({k: v for k, v in results[-1].items() if k != "decode_s"}))
    return results


def checkpoint_bytes(model_dir) -> int:
    from refllm.weights.pull import local_model_dir

    return sum(p.stat().st_size for p in local_model_dir(model_dir).glob("*.safetensors"))


def report(model_dir, results: list[dict]) -> str:
    """A Markdown table of the results, with the checkpoint's size and the RSS bound."""
    size = checkpoint_bytes(model_dir)
    lines = [f"checkpoint: {model_dir} ({size / 1e9:.2f} GB of safetensors)", "",
             "| engine | weights | load s | prefill s (tokens) | s / token (median) | peak RSS GB | RSS - file GB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['engine']} | failed: {' '.join(r['error'])} | | | | | |")
            continue
        lines.append(f"| {r['engine']} | {r['mode']} | {r['load_s']:.1f} | {r['prefill_s']:.1f} ({r['prompt_tokens']}) "
                     f"| {r['s_per_token']:.2f} | {r['peak_rss'] / 1e9:.2f} | {(r['peak_rss'] - size) / 1e9:+.2f} |")
    ok = [r for r in results if "error" not in r]
    if len(ok) == 2:
        a, b = ok[0]["tokens"], ok[1]["tokens"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        lines += ["", f"greedy tokens agree for the first {same} of {len(a)} steps "
                      f"({ok[0]['mode']} vs {ok[1]['mode']} arithmetic)"]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-tokens", type=int, default=16, help="with --model: prompt length")
    p.add_argument("--new-tokens", type=int, default=8, help="with --model: greedy decode steps timed")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs=4, metavar=("ENGINE", "PATH", "PROMPT", "N"))
    p.add_argument("model", nargs="?")
    p.add_argument("--engines", default=",".join(ENGINES))
    add_arguments(p)
    args = p.parse_args(argv)
    if args.child:
        engine, path, prompt, n = args.child
        print(json.dumps(measure(engine, path, json.loads(prompt), int(n))))
        return 0
    results = run(args.model, args.engines.split(","), args.prompt_tokens, args.new_tokens)
    print(report(args.model, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
