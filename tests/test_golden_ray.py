"""`refllm golden --ray ADDRESS` (refllm.golden.fanout) writes, byte for byte, the golden
set one process writes: a local Ray cluster on 127.0.0.1 (`ray start --head --block`,
2 CPUs), 2 workers, a tiny model and a 50-case suite (greedy and sampled generation,
chat messages, embeddings, errors). The cluster is stopped by signalling the
`ray start --block` process the test started (it stops what it started).

Needs the `ray` extra (pip install 'refllm[ray]'); skipped without it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refllm.golden import Models, write_golden
from tests.tiny_models import make_tiny_llm

pytestmark = pytest.mark.slow

PROMPTS = ["The quick brown fox", "Why is the sky blue?", "def f(x):", "Héllo wörld", "Rayleigh scattering",
           "return x * 2", "lazy dog.", "emoji 🙂"]


def fifty_cases() -> list[dict]:
    cases = []
    for i in range(24):  # greedy, with and without a penalty
        cases.append({"name": f"greedy-{i}", "prompt": PROMPTS[i % len(PROMPTS)] * (1 + i // 8),
                      "params": {"max_tokens": 6, "temperature": 0, "repeat_penalty": 1.0 + 0.1 * (i % 3)}})
    for i in range(8):  # sampled, two seeds each: 16 cases
        cases.append({"name": f"sampled-{i}", "prompt": PROMPTS[i], "seeds": [i, 100 + i],
                      "params": {"max_tokens": 5, "temperature": 0.7 + 0.1 * (i % 3), "top_k": 10 + i,
                                 "top_p": 0.9}})
    cases.append({"name": "chat", "messages": [{"role": "user", "content": "Hi"}],
                  "params": {"max_tokens": 4, "temperature": 0}})
    cases.append({"name": "max-tokens-0", "prompt": "x", "params": {"max_tokens": 0, "temperature": 0}})
    cases += [{"name": f"embed-{i}", "input": PROMPTS[i: i + 1 + i % 3]} for i in range(4)]
    cases += [{"name": "top-k-0", "prompt": "x", "params": {"top_k": 0}, "error": "invalid-input"},
              {"name": "too-long", "prompt": "fox " * 200, "error": "invalid-input"},
              {"name": "nan", "prompt": "x", "params": {"temperature": "NaN"}, "error": "invalid-input"},
              {"name": "no-model", "prompt": "x", "model": "no-such-model", "error": "invalid-input"}]
    return cases


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict:
    """The environment of every Ray process of the test: token authentication (Ray's
    default for local clusters from 2.59) with a token of the test's own, so that neither
    ~/.ray/auth_token nor the user's RAY_* settings change what runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}


TOKEN = secrets.token_hex(32)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """`ray start --head --block` on 127.0.0.1 with 2 CPUs; its address. Stopped after."""
    if os.environ.get("CI") or os.environ.get("REFLLM_REQUIRE_RAY"):
        import ray  # noqa: F401  (CI installs the ray extra: this test must run there, not skip)
    else:
        pytest.importorskip("ray")
    ray_bin = Path(sys.executable).with_name("ray")
    port = _free_port()
    temp = Path(f"/tmp/rg{os.getpid()}")  # short: Ray's socket paths are length-limited
    log = tmp_path_factory.mktemp("ray") / "ray-start.log"
    proc = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false",
                             "--object-store-memory", str(100 * 2**20), "--temp-dir", str(temp),
                             "--disable-usage-stats"],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True, env=ray_env())
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # ready once a client can connect
            if proc.poll() is not None:
                pytest.fail(f"ray start exited {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
            r = subprocess.run([str(ray_bin), "status", "--address", address], capture_output=True, text=True,
                               env=ray_env())
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not come up: {r.stdout[-1000:]} {r.stderr[-1000:]}")
            time.sleep(2)
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_output_is_byte_identical(ray_cluster, tmp_path, minilm_dir):
    model = make_tiny_llm(tmp_path / "models", name="tiny", context=128)
    suite = tmp_path / "fifty.jsonl"
    suite.write_text("".join(json.dumps(c) + "\n" for c in fifty_cases()), encoding="utf-8")

    single = write_golden(tmp_path / "single", suite=suite, models=Models.from_paths(model, minilm_dir))
    lines = single.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 + 50

    env = {**ray_env(), "REFLLM_DEBUG": "1"}
    r = subprocess.run([sys.executable, "-m", "refllm.cli", "golden", "--model", str(model), "--suite", str(suite),
                        "--embedding-model", str(minilm_dir), "--out", str(tmp_path / "ray"),
                        "--ray", ray_cluster, "--workers", "2"], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 Ray workers ready" in r.stderr
    for f in sorted(p.relative_to(tmp_path / "single") for p in (tmp_path / "single").rglob("*") if p.is_file()):
        assert (tmp_path / "ray" / f).read_bytes() == (tmp_path / "single" / f).read_bytes(), f
    assert (tmp_path / "ray" / "golden.jsonl").read_bytes() == single.read_bytes()
