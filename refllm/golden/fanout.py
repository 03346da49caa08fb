"""A golden set's cases spread over a Ray cluster: the same file, byte for byte.

    lines, facts = run_on_ray(specs, models, "10.0.0.1:6379", workers=8, threads=1)
    refllm golden --model ckpt/ --suite cases.jsonl --out DIR --ray 10.0.0.1:6379

Golden generation is embarrassingly parallel across cases: each case depends only on
the model and its own inputs. `run_on_ray` starts `workers` actors (`GoldenWorker`),
each holding the model once, loaded from a path every node can read (a shared file
system, or the same path on every node); an actor takes the next case as soon as it is
done with one, and the driver puts each case's line back in suite order.

Why the bytes are the same as `write_golden` in one process: every actor runs the same
refllm (its version and the sha256 of each computing module are compared with the
driver's before any case runs; `record.compute_digest`), on the same model files (their
sha256s are compared too), with the BLAS at the same thread count (`threads`, the
actor's `num_cpus`), and serialises its case with the same `dumps`; nothing a case
computes depends on which cases ran before it in that process.

Ray is an optional extra (``pip install 'refllm[ray]'``); nothing else in refllm
imports this module or Ray.
"""

from __future__ import annotations

import sys
import time
from typing import Sequence

from .models import Models
from .reader import dumps
from .record import compute_digest, record
from .suite import CaseSpec
from .writer import blas_threads


def fingerprint(models: Models, names) -> dict:
    """What must be equal on every node: refllm's computing code and the models' sha256s."""
    return {"code": compute_digest(),
            "models": {n: models.source(n).sha256() for n in sorted(set(names)) if models.kind(n) is not None}}


class GoldenWorker:
    """A Ray actor holding the models of one golden run; `run` records one case."""

    def __init__(self, models: Models, names: list[str], threads: int):
        import socket

        self.models, self.names, self.threads = models, names, threads
        self.host = socket.gethostname()
        with blas_threads(threads):
            for name in sorted(set(names)):  # load now, once, not in the first case
                kind = models.kind(name)
                if kind == "llama":
                    models.llm(name)
                elif kind == "embedding":
                    models.embedder(name)

    def fingerprint(self) -> tuple[str, dict]:
        return self.host, fingerprint(self.models, self.names)

    def decoder_facts(self) -> dict:
        """The header's facts of each decoder, from the model this actor holds."""
        return {n: self.models.decoder_facts(n) for n in sorted(set(self.names)) if self.models.kind(n) == "llama"}

    def run(self, spec: CaseSpec) -> str:
        with blas_threads(self.threads):
            return dumps(record(spec, self.models))

    def close(self) -> None:
        self.models.close()


def run_on_ray(specs: Sequence[CaseSpec], models: Models, address: str | None = None, *, workers: int | None = None,
               threads: int = 1, progress: bool = False) -> tuple[list[str], dict]:
    """Every case's golden line, in suite order, computed by `workers` Ray actors, and
    the decoders' facts for the header (`Models.decoder_facts`, from an actor).

    `address`: a running cluster's (``host:port``, ``ray://host:10001`` or ``auto``);
    None starts a local one unless RAY_ADDRESS names one. `workers` defaults to the
    cluster's CPUs divided by `threads`, at most one per case."""
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("--ray needs Ray: pip install 'refllm[ray]'") from e
    names = [s.model for s in specs]
    started = not ray.is_initialized()
    if started:
        kwargs = {"include_dashboard": False, "log_to_driver": False}
        if address is None and workers is not None:
            kwargs["num_cpus"] = workers * threads
        ray.init(address=address, **kwargs)
    actors = []
    try:
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
        workers = max(1, min(workers, len(specs)))
        env = {k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        actor_class = ray.remote(num_cpus=threads, runtime_env={"env_vars": env})(GoldenWorker)
        t0 = time.monotonic()
        actors = [actor_class.remote(models, names, threads) for _ in range(workers)]
        want = fingerprint(models, names)
        for host, got in _get(ray, [a.fingerprint.remote() for a in actors]):
            if got != want:
                what = "refllm" if got["code"] != want["code"] else "model files"
                raise RuntimeError(f"the Ray worker on {host} has other {what} than this machine: "
                                   f"{_diff(want, got)}; install the same refllm and give every node the same model")
        (facts,) = _get(ray, [actors[0].decoder_facts.remote()])
        if progress:
            print(f"golden: {workers} Ray workers ready in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        lines: list[str | None] = [None] * len(specs)
        todo = iter(range(len(specs)))
        pending = {}

        def submit(actor) -> None:
            i = next(todo, None)
            if i is not None:
                pending[actor.run.remote(specs[i])] = (i, actor)

        for a in actors:
            submit(a)
        done_count = 0
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            i, actor = pending.pop(ref)
            (lines[i],) = _get(ray, [ref])
            submit(actor)
            done_count += 1
            if progress:
                print(f"golden: [{done_count}/{len(specs)}] {specs[i].name}", file=sys.stderr)
        return lines, facts
    finally:
        try:
            ray.get([a.close.remote() for a in actors], timeout=60)
        except Exception:  # noqa: BLE001 - a dead actor has nothing left to clean
            pass
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()


def _get(ray, refs):
    """ray.get, re-raising a case's own exception (CaseError, LLMError, ...) as itself."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        raise e.as_instanceof_cause() from None


def _diff(want: dict, got: dict) -> str:
    out = []
    for part in ("code", "models"):
        for k in sorted(set(want[part]) | set(got[part])):
            if want[part].get(k) != got[part].get(k):
                out.append(f"{k}: {str(got[part].get(k))[:12]} there, {str(want[part].get(k))[:12]} here")
    return "; ".join(out)


__all__ = ["run_on_ray", "GoldenWorker", "fingerprint"]
