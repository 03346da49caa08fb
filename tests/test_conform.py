"""`refllm conform` (refllm.conform): refllm's own server conforms fully in each dialect;
backends that are subtly wrong are caught and the fault is named.

The wrong backends are refllm's own server on loopback with one thing broken (pytest's
monkeypatch, undone after each test): (a) the repeat penalty dropped, (b) embeddings
mean-pooled over the padding, (c) usage counted like Spin 3 (the server's spin
profile), (d) logits perturbed by +-1e-2. A small canned http.server checks the
near-tie logic without a model. Every conform call names its cases, so the number of
requests is bounded (at most the quick subset, 22 cases, once).
"""

from __future__ import annotations

import argparse
import dataclasses
import http.server
import json
import shutil
import socket
import threading
import urllib.error

import numpy as np
import pytest

import refllm.embeddings
import refllm.engine
import refllm.sampling
from refllm.conform import conform
from refllm.golden import QUICK, builtin_golden_dir, load_golden

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from refllm.serve.app import ServerThread  # noqa: E402
from refllm.serve.core import ServerConfig  # noqa: E402


@pytest.fixture(scope="module")
def golden_dir(models_root):
    return builtin_golden_dir(models_root, QUICK)


@pytest.fixture(scope="module")
def server(models_root):
    with ServerThread(ServerConfig(models_dir=str(models_root))) as s:
        yield s


def _run(url, golden_dir, tmp_path, cases, capsys, **kw):
    report = tmp_path / "report.json"
    code = conform(url, golden_dir=golden_dir, cases=cases, report=report, **kw)
    out = capsys.readouterr().out
    return code, json.loads(report.read_text()), out


def _case(doc, name):
    return next(c for c in doc["cases"] if c["name"] == name)


# ----------------------------------------------------------------------------- refllm conforms

def test_refllm_server_conforms_fully_spin(server, golden_dir, tmp_path, capsys):
    code, doc, out = _run(server.url, golden_dir, tmp_path, None, capsys, dialect="spin")
    assert code == 0, out
    s = doc["summary"]
    assert (s["pass"], s["fail"], s["warn"], s["skip"], s["faults"]) == (len(QUICK), 0, 0, 0, {})
    assert doc["requests"] == len(QUICK)
    for c in doc["cases"]:
        if c["kind"] == "generate":
            assert c["match"] == c["steps"] and c["text"]["equal"] and c["usage"]["equal"], c["name"]
        if c["kind"] == "embed":
            assert c["cosine_min"] > 1 - 1e-9 and c["usage"]["equal"]
        if c["kind"] == "error":  # refllm's Spin dialect carries the WIT variant
            assert 400 <= c["error"]["status"] < 500 and c["error"]["variant"] == c["error"]["expected"]
    assert "exit 0" in out and "22 passed" in out


def test_refllm_server_conforms_tgi_and_openai(server, golden_dir, tmp_path, capsys):
    cases = ["greedy-repeat-penalty", "max-tokens-0", "embed-batch", "err-top-k-zero", "err-unknown-model",
             "err-infer-embedding-model"]
    code, doc, out = _run(server.url, golden_dir, tmp_path, cases, capsys, dialect="tgi")
    assert code == 0, out
    assert [c["name"] for c in doc["cases"] if c["status"] == "skip"] == ["max-tokens-0", "err-infer-embedding-model"]
    c = _case(doc, "greedy-repeat-penalty")
    assert c["compared_by"] == "id" and c["logprobs"]["max_abs_diff"] < 1e-4 and c["usage"]["equal"]
    cases = ["wit-defaults", "embed-single", "err-unknown-model", "err-infer-embedding-model"]
    code, doc, out = _run(server.url, golden_dir, tmp_path, cases, capsys, dialect="openai")
    assert code == 0, out
    c = _case(doc, "wit-defaults")
    assert c["compared_by"] == "token-text" and c["match"] == c["steps"] and c["logprobs"]["max_abs_diff"] < 1e-4
    assert _case(doc, "err-infer-embedding-model")["status"] == "pass"


# ----------------------------------------------------------------------------- wrong backends

@pytest.fixture
def broken_server(models_root, monkeypatch):
    """A fresh refllm server; the test breaks something with monkeypatch first."""
    servers = []

    def start(**config):
        s = ServerThread(ServerConfig(models_dir=str(models_root), **config)).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def test_dropped_repeat_penalty_is_caught(broken_server, golden_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(refllm.sampling, "apply_repeat_penalty", lambda z, ids, rp, n: np.array(z, dtype=np.float32))
    s = broken_server()
    code, doc, out = _run(s.url, golden_dir, tmp_path, ["greedy-repeat-penalty"], capsys)
    assert code == 1
    c = _case(doc, "greedy-repeat-penalty")
    assert c["status"] == "fail" and c["faults"] == ["repeat-penalty"]
    d = c["divergence"]
    assert d["step"] == 0 and d["got"]["retokenized"] and d["margin"] > 0.1  # not a near tie
    assert doc["summary"]["faults"] == {"repeat-penalty": ["greedy-repeat-penalty"]}
    assert "fault repeat-penalty: greedy-repeat-penalty" in out and "exit 1" in out


def test_unmasked_pooling_is_caught(broken_server, golden_dir, tmp_path, capsys, monkeypatch):
    # A backend that averages over the padded positions too, whose states are not zero
    # there (transformers gives them states; refllm's are zeros, so fill them with [CLS]'s).
    def unmasked_pool(hidden, mask):  # [B, T, H], [B, T] -> [B, H]
        padded = (np.asarray(mask) == 0)[..., None]  # [B, T, 1]
        return np.where(padded, hidden[:, :1], hidden).mean(axis=1)

    monkeypatch.setattr(refllm.embeddings, "mean_pool", unmasked_pool)
    s = broken_server()
    code, doc, out = _run(s.url, golden_dir, tmp_path, ["embed-single", "embed-batch"], capsys)
    assert code == 1
    assert _case(doc, "embed-single")["status"] == "pass"  # one text: no padding
    c = _case(doc, "embed-batch")
    assert c["faults"] == ["embeddings-padding"] and c["cosine_min"] < 0.999
    assert "fault embeddings-padding: embed-batch" in out


def test_spin3_usage_is_caught_and_conforms_to_the_spin_profile(broken_server, golden_dir, tmp_path, capsys):
    s = broken_server(profile="spin")
    cases = ["chat-eos", "embed-batch"]
    code, doc, out = _run(s.url, golden_dir, tmp_path, cases, capsys)
    assert code == 1
    gen, emb = _case(doc, "chat-eos"), _case(doc, "embed-batch")
    assert "usage-spin3" in gen["faults"] and "text-includes-prompt" in gen["faults"]
    assert gen["match"] == gen["steps"]  # the completion itself is right
    assert gen["usage"]["got"] == {"prompt": 24, "generated": 3}
    assert "usage-spin3" in emb["faults"]
    assert "fault usage-spin3: chat-eos, embed-batch" in out
    code, doc, out = _run(s.url, golden_dir, tmp_path, cases, capsys, profile="spin")
    assert code == 0, out  # it is exactly what it claims with --profile spin


def test_perturbed_logits_are_caught(broken_server, golden_dir, tmp_path, capsys, monkeypatch):
    real_get_llm = refllm.engine.get_llm

    class Perturbed:  # the model's logits +1e-2 on even ids, -1e-2 on odd ids
        def __init__(self, model):
            self.model = model

        def __call__(self, *args, **kwargs):
            return self.perturb(self.model(*args, **kwargs))

        def decode(self, token, cache):  # the one-token path generation takes
            return self.perturb(self.model.decode(token, cache))

        @staticmethod
        def perturb(out):
            return out + np.where(np.arange(out.shape[-1]) % 2 == 0, 1e-2, -1e-2).astype(out.dtype)

        def __getattr__(self, name):
            return getattr(self.model, name)

    def get_llm(*args, **kwargs):
        llm = real_get_llm(*args, **kwargs)
        return dataclasses.replace(llm, model=Perturbed(llm.model))

    monkeypatch.setattr(refllm.engine, "get_llm", get_llm)
    s = broken_server()
    code, doc, out = _run(s.url, golden_dir, tmp_path, ["greedy"], capsys, dialect="tgi")
    assert code == 1
    c = _case(doc, "greedy")
    assert "logprobs" in c["faults"] and 5e-3 < c["logprobs"]["max_abs_diff"] < 3e-2
    assert "fault logprobs: greedy" in out


# ----------------------------------------------------------------------------- near ties, no model

class _Canned(http.server.BaseHTTPRequestHandler):
    answer: dict = {}

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["content-length"]))
        body = json.dumps(self.answer).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def canned():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_near_tie_is_told_from_a_bug(canned, golden_dir, tmp_path, capsys):
    g = load_golden(golden_dir)
    case = g.case("greedy")
    k = 2  # a backend that agrees for two tokens, then says something else
    _Canned.answer = {"text": case["text"][: case["steps"][k - 1]["text_end"]] + " Berlin",
                      "usage": {"promptTokenCount": case["usage"]["prompt_token_count"],
                                "generatedTokenCount": case["usage"]["generated_token_count"]}}
    code, doc, out = _run(canned, golden_dir, tmp_path, ["greedy"], capsys)
    c = _case(doc, "greedy")
    assert code == 1 and c["faults"] == ["token-mismatch"] and c["match"] == k
    assert c["divergence"]["expected"]["id"] == case["tokens"][k] and c["divergence"]["got"]["text"] == " Berlin"

    tied = tmp_path / "tied"  # the same golden set, but refllm's margin at that step is a near tie
    shutil.copytree(golden_dir, tied)
    lines = (tied / "golden.jsonl").read_text(encoding="utf-8").rstrip("\n").split("\n")
    for i, line in enumerate(lines[1:], 1):
        obj = json.loads(line)
        if obj["name"] == "greedy":
            step = obj["steps"][k]
            step["margin"] = 1e-4  # and the backend's token a hair behind refllm's
            top = step["top"]
            got_id = c["divergence"]["got"]["id"]
            at = next((j for j, (t, _) in enumerate(top) if t == got_id), len(top) - 1)
            top[at] = [got_id, step["logit"] - 1e-4]
            lines[i] = json.dumps(obj, ensure_ascii=False)
    (tied / "golden.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, doc, out = _run(canned, tied, tmp_path, ["greedy"], capsys)
    c = _case(doc, "greedy")
    assert code == 0 and c["status"] == "warn" and c["faults"] == [], out
    assert "near tie at step 2" in out


def test_token_list_without_the_eos(canned, golden_dir, tmp_path, capsys):
    """An OpenAI-compatible server that stops on the EOS but leaves it out of its logprobs."""
    case = load_golden(golden_dir).case("chat-eos")
    steps = case["steps"][:-1]
    _Canned.answer = {"choices": [{"index": 0, "text": case["text"], "finish_reason": "stop",
                                   "logprobs": {"tokens": [s["text"] for s in steps],
                                                "token_logprobs": [s["logprob"] for s in steps]}}],
                      "usage": {"prompt_tokens": 21, "completion_tokens": 3, "total_tokens": 24}}
    code, doc, out = _run(canned, golden_dir, tmp_path, ["chat-eos"], capsys, dialect="openai")
    c = _case(doc, "chat-eos")
    assert code == 0 and c["match"] == 3 and c["logprobs"]["max_abs_diff"] == 0.0, out
    assert "leaves out the EOS" in c["notes"][0]


def test_unreachable_backend_exits_2(golden_dir, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert conform(f"http://127.0.0.1:{port}", golden_dir=golden_dir, cases=["err-top-k-zero"]) == 2
    assert "cannot connect" in capsys.readouterr().out


def test_cli_conform(server, golden_dir, tmp_path, capsys):
    from refllm import oracle_cli

    parser = argparse.ArgumentParser()
    oracle_cli.register(parser.add_subparsers(dest="command"))
    report = tmp_path / "r.json"
    args = parser.parse_args(["conform", "--against", server.url, "--dialect", "openai", "--golden", str(golden_dir),
                              "--case", "err-top-k-zero", "--case", "embed-single", "--report", str(report), "--quiet"])
    assert args.handler(args) == 0
    doc = json.loads(report.read_text())
    assert doc["dialect"] == "openai" and doc["summary"]["pass"] == 2


# ----------------------------------------------------------------------------- sampling, by statistics

STATS_CASES = ["all-knobs", "top-k"]  # all-knobs: T 0.7 with top-k 10 and top-p 0.8; top-k: 3 at T 1


def _top_p_before_temperature(logits, ids, params, u):
    """A wrong sampler: SPEC 3's steps, but top-k and top-p choose on softmax(z) at T = 1,
    and the temperature only reweights the survivors."""
    s = refllm.sampling
    z = s.apply_repeat_penalty(logits, ids, params.repeat_penalty, params.repeat_penalty_last_n_token_count)
    if params.temperature <= 0:
        return s.greedy(z)
    kept, _ = s.top_p_filter(*s.top_k_candidates(s.softmax_with_temperature(z, 1.0), params.top_k), params.top_p)
    p = s.softmax_with_temperature(z, params.temperature)
    return s.draw(kept, p[kept], u)


@pytest.fixture(scope="module")
def stats_golden(models_root):
    return builtin_golden_dir(models_root, STATS_CASES)


def _stats(doc, name):
    c = _case(doc, name)
    assert c["compared_by"] == "statistics", c
    return c, c["stats"]


@pytest.mark.slow
def test_statistical_check_passes_correct_samplers(broken_server, models_root, stats_golden, tmp_path, capsys, monkeypatch):
    """refllm's own server passes the G-test under each profile whose order it samples in."""
    import functools

    import refllm.profiles as profiles

    s = broken_server()
    code, doc, out = _run(s.url, stats_golden, tmp_path, STATS_CASES, capsys, dialect="openai", sampled="stats",
                          models_root=models_root)
    assert code == 0, out
    for name in STATS_CASES:
        c, t = _stats(doc, name)
        assert c["status"] == "pass" and t["pvalue"] >= 1e-3 and t["n"] >= 300 and t["df"] >= 1, c
    assert _case(doc, "all-knobs")["stats"]["step"] > 0  # the first token is all but certain there
    # the same server sampling in llama.cpp's order (min-p 0, as conform sends) passes --profile llama.cpp
    monkeypatch.setattr(refllm.sampling, "sample_token", functools.partial(profiles.sample_token_llama_cpp, min_p=0.0))
    code, doc, out = _run(s.url, stats_golden, tmp_path, STATS_CASES, capsys, dialect="openai", profile="llama.cpp",
                          backend="refllm", models_root=models_root)
    assert code == 0, out
    # and in transformers' order, over TGI's dialect (compared by id), --profile hf
    monkeypatch.setattr(refllm.sampling, "sample_token", profiles.sample_token_hf)
    code, doc, out = _run(s.url, stats_golden, tmp_path, STATS_CASES, capsys, dialect="tgi", profile="hf",
                          models_root=models_root)
    assert code == 0, out
    assert _case(doc, "top-k")["stats"]["by"] == "id"


@pytest.mark.slow
def test_statistical_check_catches_wrong_samplers(broken_server, models_root, stats_golden, tmp_path, capsys, monkeypatch):
    """At the same N: a sampler that applies top-p before the temperature fails all-knobs,
    a proxy that drops top_k fails top-k; each failure names the tokens."""
    monkeypatch.setattr(refllm.sampling, "sample_token", _top_p_before_temperature)
    s = broken_server()
    code, doc, out = _run(s.url, stats_golden, tmp_path, ["all-knobs"], capsys, dialect="openai", sampled="stats",
                          models_root=models_root)
    c, t = _stats(doc, "all-knobs")
    assert code == 1 and c["status"] == "fail", out
    assert set(c["faults"]) <= {"sampling-distribution", "sampling-impossible-token"} and t["pvalue"] < 1e-3
    monkeypatch.undo()
    with _DropTopK(s.url) as proxy:
        code, doc, out = _run(proxy.url, stats_golden, tmp_path, ["top-k"], capsys, dialect="openai", sampled="stats",
                              models_root=models_root)
    c, t = _stats(doc, "top-k")
    assert code == 1 and c["status"] == "fail" and t["pvalue"] < 1e-3, out
    assert '"top_k": 3' in json.dumps(c["exchanges"][0]["request"])  # conform asked for it; the proxy dropped it


class _DropTopK:
    """An HTTP proxy that forwards every POST with the JSON body's "top_k" removed."""

    def __init__(self, target: str):
        import urllib.request

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                body.pop("top_k", None)
                req = urllib.request.Request(target + self.path, data=json.dumps(body).encode(), method="POST",
                                             headers={"content-type": "application/json"})
                try:
                    with urllib.request.urlopen(req) as r:
                        status, data = r.status, r.read()
                except urllib.error.HTTPError as e:
                    status, data = e.code, e.read()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
