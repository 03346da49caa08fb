"""`refllm serve`'s semantics: each dialect's errors, models, limits, loading and cache.

Most requests here fail before any model compute; the few that generate ask for a
token or two.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import httpx
import pytest

import refllm
import refllm.engine
from refllm.serve.app import ServerThread, add_serve_arguments, config_from_args
from refllm.serve.core import ServerConfig
from refllm.serve.limits import Limits, denial

pytestmark = pytest.mark.usefixtures("hf_hub_online")

LLAMA = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
ALICE, BOB = "alice-token", "bob-token"  # bob may only embed


@pytest.fixture(scope="module")
def srv(models_root):
    config = ServerConfig(models_dir=models_root, tokens=(ALICE, BOB), token_models={BOB: [MINILM]},
                          max_tokens_cap=6, max_body_bytes=2000)
    with ServerThread(config) as s:
        yield s


def post(server, path, body=None, token=ALICE, content=None, headers=None, timeout=120):
    h = {"authorization": f"Bearer {token}"} if token else {}
    h.update(headers or {})
    if content is None:
        content = json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers=h, timeout=timeout)


def tgi_error(r, status=422):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == "validation", body
    return body["error"]


def openai_error(r, status=400):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


def spin_error(r, status=400):
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body["error"], str)
    return body


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("parameters, message", [
    ({"temperature": 0}, "`temperature` must be strictly positive"),
    ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"max_new_tokens": "4"}, "`max_new_tokens` must be an integer"),
    ({"max_new_tokens": 10**30}, "`max_new_tokens` must be strictly positive"),
    ({"repetition_penalty": -1}, "`repetition_penalty` must be strictly positive"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences"),
    ({"seed": -1}, "`seed`"),
    ({"best_of": 2}, "`best_of`"),
    ({"details": "yes"}, "`details` must be a boolean"),
])
def test_tgi_validation_errors_are_422(srv, parameters, message):
    for path in ("/", "/generate", "/generate_stream", f"/models/{LLAMA}"):
        error = tgi_error(post(srv, path, {"inputs": "Hi", "parameters": parameters}))
        assert error.startswith("Input validation error: ") and message in error


def test_tgi_inputs_validation(srv):
    assert "`inputs` cannot be empty" in tgi_error(post(srv, "/generate", {"inputs": "", "parameters": {}}))
    assert "`inputs` must be a string" in tgi_error(post(srv, "/generate", {"inputs": 5, "parameters": {}}))
    assert "`inputs`" in tgi_error(post(srv, "/", {"inputs": [1, 2]}))  # feature extraction of non-strings


def test_huge_numbers_are_validation_errors(srv):
    r = post(srv, "/generate", content=b'{"inputs": "Hi", "parameters": {"temperature": 1e999}}')
    assert "`temperature` must be finite" in tgi_error(r)
    r = post(srv, "/v1/completions", content=b'{"prompt": "Hi", "top_p": -1e400}')
    assert openai_error(r)["param"] == "top_p"
    r = post(srv, "/infer", content=b'{"prompt": "Hi", "options": {"topK": 1e20}}')
    assert spin_error(r)["variant"] == "invalid-input"


def test_huggingface_hub_raises_its_validation_error(srv):
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import ValidationError

    client = InferenceClient(base_url=srv.url, api_key=ALICE)
    with pytest.raises(ValidationError, match="temperature"):
        client.text_generation("Hi", temperature=-1.0, max_new_tokens=2)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "temperature": 3}, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "n": 2}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": "x"}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "seed": -5}, "seed"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "presence_penalty": 1}, "presence_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stop": ["a"] * 5}, "stop"),
    ("/v1/chat/completions", {"messages": "Hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, None),
    ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "temperature": 2.5}, "temperature"),
    ("/v1/embeddings", {"input": []}, "input"),
    ("/v1/embeddings", {"input": "Hi", "encoding_format": "int8"}, "encoding_format"),
])
def test_openai_validation_errors_are_400(srv, path, body, param):
    err = openai_error(post(srv, path, body))
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_openai_client_raises_bad_request(srv):
    import openai

    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=ALICE, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=LLAMA, messages=[{"role": "user", "content": "Hi"}], temperature=5)
    assert e.value.param == "temperature"


@pytest.mark.parametrize("options, message", [
    ({"topK": 0}, "top_k must be > 0"),
    ({"repeatPenalty": 0}, "repeat_penalty must be > 0"),
    ({"temperature": "hot"}, "`temperature` must be a number"),
    ({"maxTokens": -1}, "`maxTokens` must be in"),
    ({"maxTokens": 1.5}, "`maxTokens` must be an integer"),
])
def test_spin_validation_errors_are_400_invalid_input(srv, options, message):
    body = spin_error(post(srv, "/infer", {"model": LLAMA, "prompt": "Hi", "options": {"maxTokens": 1, **options}}))
    assert message in body["error"] and body["variant"] == "invalid-input"


def test_spin_body_errors(srv):
    assert "`prompt` is required" in spin_error(post(srv, "/infer", {"model": LLAMA}))["error"]
    assert "`input` must be a list" in spin_error(post(srv, "/embed", {"model": MINILM, "input": "one"}))["error"]
    assert "must not be empty" in spin_error(post(srv, "/embed", {"model": MINILM, "input": []}))["error"]


MALFORMED = [
    b"{not json",
    b'{"inputs": "\xff\xfe broken utf-8"}',
    b"[1, 2, 3]",
    b'{"inputs": NaN}',
    b"",
    b"[" * 100_000 + b"]" * 100_000,
    b'{"inputs": "x", "parameters": {"seed": ' + b"9" * 5000 + b"}}",
    b'{"inputs": "lone \\ud800 surrogate", "prompt": "\\udc00", "input": ["\\ud800"], "messages": "\\ud800"}',
]


@pytest.mark.parametrize("path", ["/infer", "/embed", "/", "/generate", "/v1/chat/completions", "/v1/embeddings"])
def test_malformed_bodies_are_400_and_the_server_keeps_serving(models_root, path):
    with ServerThread(ServerConfig(models_dir=models_root, max_body_bytes=1 << 20)) as s:
        for content in MALFORMED:
            r = post(s, path, content=content, token=None)
            assert r.status_code == 400, (content[:40], r.text)
        r = post(s, "/infer", {"prompt": "Hi", "options": {"maxTokens": 0}}, token=None)
        assert r.status_code == 200 and r.json()["text"] == ""


def test_unknown_routes_answer_in_the_dialect(srv):
    r = httpx.get(srv.url + "/v1/nothing", headers={"authorization": f"Bearer {ALICE}"})
    assert r.status_code == 404 and "message" in r.json()["error"]
    r = httpx.get(srv.url + "/nothing")
    assert r.status_code == 404 and isinstance(r.json()["error"], str)


# ----------------------------------------------------------------------------- models

def test_unknown_model_is_404_in_each_dialect(srv):
    body = spin_error(post(srv, "/infer", {"model": "nope", "prompt": "Hi"}), 404)
    assert body == {"error": "no model directory found in registry for model 'nope'", "variant": "invalid-input"}
    spin_error(post(srv, "/embed", {"model": "nope", "input": ["Hi"]}), 404)
    r = post(srv, "/models/nope", {"inputs": "Hi"})
    assert r.status_code == 404 and r.json() == {"error": "Model nope does not exist"}
    r = post(srv, "/models/org/nope", {"inputs": "Hi"})  # Hub-style ids with a slash
    assert r.status_code == 404
    for path, body in (("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "Hi"}]}),
                       ("/v1/completions", {"model": "nope", "prompt": "Hi"}),
                       ("/v1/embeddings", {"model": "nope", "input": "Hi"})):
        err = openai_error(post(srv, path, body), 404)
        assert err["code"] == "model_not_found" and err["param"] == "model" and "`nope`" in err["message"]
    r = httpx.get(srv.url + "/v1/models/nope", headers={"authorization": f"Bearer {ALICE}"})
    assert r.status_code == 404


def test_a_model_of_the_other_kind_is_not_supported(srv):
    body = spin_error(post(srv, "/infer", {"model": MINILM, "prompt": "Hi"}))
    assert body["variant"] == "model-not-supported"
    err = openai_error(post(srv, "/v1/embeddings", {"model": LLAMA, "input": "Hi"}))
    assert err["code"] == "model_not_supported"


def test_placeholders_and_no_model_mean_the_default(srv):
    r = post(srv, "/v1/chat/completions", {"model": "dummy", "messages": [{"role": "user", "content": "Hi"}],
                                           "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200 and r.json()["model"] == LLAMA
    r = post(srv, "/models/tgi", {"inputs": "Hi", "parameters": {"max_new_tokens": 1}})
    assert r.status_code == 200 and isinstance(r.json()[0]["generated_text"], str)
    r = post(srv, "/v1/embeddings", {"input": "Hi"})
    assert r.status_code == 200 and r.json()["model"] == MINILM
    r = post(srv, "/infer", {"prompt": "Hi", "options": {"maxTokens": 0}})
    assert r.status_code == 200


def test_models_route_picks_the_task_from_the_model(srv):
    r = post(srv, f"/models/{MINILM}", {"inputs": ["a", "b"]})
    assert r.status_code == 200 and len(r.json()) == 2 and len(r.json()[0]) == 384
    r = post(srv, f"/models/{LLAMA}", {"inputs": "Hi", "parameters": {"max_new_tokens": 1}})
    assert r.status_code == 200 and list(r.json()[0]) == ["generated_text"]


# ----------------------------------------------------------------------------- auth and allow-lists

def test_auth_is_required_except_for_health(srv):
    assert httpx.get(srv.url + "/health").status_code == 200
    for token in (None, "wrong"):
        r = post(srv, "/infer", {"model": LLAMA, "prompt": "Hi"}, token=token)
        assert r.status_code == 401 and "error" in r.json() and r.headers["www-authenticate"] == "Bearer"
        assert post(srv, "/generate", {"inputs": "Hi"}, token=token).status_code == 401
        assert openai_error(post(srv, "/v1/embeddings", {"input": "Hi"}, token=token), 401)["code"] == "invalid_api_key"
    r = httpx.post(srv.url + "/infer", content=b'{"prompt":"Hi","options":{"maxTokens":0}}',
                   headers={"authorization": f"bearer {ALICE}"})  # Spin's lower-case scheme
    assert r.status_code == 200
    r = httpx.post(srv.url + "/infer", content=b'{"prompt":"Hi","options":{"maxTokens":0}}',
                   headers={"authorization": f"BEARER {ALICE}"})
    assert r.status_code == 200


def test_openai_client_with_a_wrong_key(srv):
    import openai

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_per_token_allow_list_denies_with_spins_message(srv):
    message = ("The component does not have access to use 'smollm2-135m-instruct'. To give the component access, "
               "add 'smollm2-135m-instruct' to the 'ai_models' key for the component in your spin.toml manifest")
    assert denial(LLAMA) == message
    assert spin_error(post(srv, "/infer", {"model": LLAMA, "prompt": "Hi"}, token=BOB), 403)["error"] == message
    assert openai_error(post(srv, "/v1/completions", {"prompt": "Hi"}, token=BOB), 403)["message"] == message
    r = post(srv, "/generate", {"inputs": "Hi"}, token=BOB)
    assert r.status_code == 403 and r.json()["error"] == message
    assert post(srv, "/embed", {"model": MINILM, "input": ["Hi"]}, token=BOB).status_code == 200
    r = httpx.get(srv.url + "/v1/models", headers={"authorization": f"Bearer {BOB}"})
    assert [m["id"] for m in r.json()["data"]] == [MINILM]


def test_server_wide_allow_list(models_root):
    with ServerThread(ServerConfig(models_dir=models_root, allowed_models=[MINILM])) as s:
        r = post(s, "/infer", {"model": LLAMA, "prompt": "Hi"}, token=None)
        assert r.status_code == 403 and r.json()["error"] == denial(LLAMA)
        assert post(s, "/embed", {"model": MINILM, "input": ["Hi"]}, token=None).status_code == 200


# ----------------------------------------------------------------------------- quotas, token cap, body size

def test_hourly_quotas_answer_429_with_retry_after(models_root):
    config = ServerConfig(models_dir=models_root, tokens=("a", "b"), inference_quota=2, embedding_quota=3)
    with ServerThread(config) as s:
        infer = {"prompt": "Hi", "options": {"maxTokens": 0}}
        for _ in range(2):
            assert post(s, "/infer", infer, token="a").status_code == 200
        r = post(s, "/infer", infer, token="a")
        assert r.status_code == 429 and "quota" in r.json()["error"]
        assert 3000 <= int(r.headers["retry-after"]) <= 3600
        err = openai_error(post(s, "/v1/completions", {"prompt": "Hi", "max_tokens": 1}, token="a"), 429)
        assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests"
        assert post(s, "/generate", {"inputs": "Hi"}, token="a").status_code == 429
        for _ in range(3):  # embeddings have their own quota
            assert post(s, "/embed", {"input": ["Hi"]}, token="a").status_code == 200
        r = post(s, "/v1/embeddings", {"input": "Hi"}, token="a")
        assert r.status_code == 429 and "retry-after" in r.headers
        assert post(s, "/infer", infer, token="b").status_code == 200  # per token


def test_quota_window_slides():
    now = [1000.0]
    limits = Limits(ServerConfig(inference_quota=2, quota_window_s=60), clock=lambda: now[0])
    limits.take("t", "inference")
    now[0] += 30
    limits.take("t", "inference")
    with pytest.raises(Exception) as e:
        limits.take("t", "inference")
    assert e.value.kind == "rate_limited" and e.value.headers["retry-after"] == "30"
    now[0] += 30.5  # the first request left the window
    limits.take("t", "inference")
    assert limits.remaining("t", "inference") == 0


def test_generated_token_cap(srv):
    error = tgi_error(post(srv, "/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 7}}))
    assert "`max_new_tokens` must be <= 6. Given: 7" in error
    err = openai_error(post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                          "max_tokens": 7}))
    assert err["param"] == "max_tokens"
    r = post(srv, "/infer", {"prompt": "Hi", "options": {"maxTokens": 500, "temperature": 0}})  # Spin: lowered to the cap
    assert r.status_code == 200 and r.json()["usage"]["generatedTokenCount"] <= 6
    r = post(srv, "/generate", {"inputs": "Hi", "parameters": {"details": True}})  # TGI's default, capped
    assert r.status_code == 200 and r.json()["details"]["generated_tokens"] <= 6


def test_body_size_limit(srv):
    big = {"model": LLAMA, "prompt": "x" * 3000}
    for path in ("/infer", "/generate", "/v1/completions"):
        r = post(srv, path, big)
        assert r.status_code == 413, r.text
    assert openai_error(post(srv, "/v1/completions", big), 413)["code"] == "request_too_large"

    def chunks():  # no content-length: the limit holds while reading
        for _ in range(10):
            yield b" " * 500

    r = httpx.post(srv.url + "/infer", content=chunks(), headers={"authorization": f"Bearer {ALICE}"})
    assert r.status_code == 413
    assert post(srv, "/infer", {"prompt": "Hi", "options": {"maxTokens": 0}}).status_code == 200


# ----------------------------------------------------------------------------- loading and the cache

def test_503_while_a_model_loads_unless_x_wait_for_model(srv, monkeypatch):
    real = refllm.engine.loading
    monkeypatch.setattr(refllm.engine, "loading", lambda: real() | {LLAMA, MINILM})
    for path, body in (("/", {"inputs": "Hi", "parameters": {"max_new_tokens": 1}}), ("/", {"inputs": "Hi"}),
                       (f"/models/{LLAMA}", {"inputs": "Hi"}), ("/generate", {"inputs": "Hi"})):
        r = post(srv, path, body)
        assert r.status_code == 503, r.text
        body503 = r.json()
        assert body503["error"].endswith("is currently loading") and body503["estimated_time"] > 0
    assert r.json()["error"] == f"Model {LLAMA} is currently loading"
    r = post(srv, "/", {"inputs": "Hi", "parameters": {"max_new_tokens": 1}}, headers={"x-wait-for-model": "true"})
    assert r.status_code == 200
    r = post(srv, "/", {"inputs": "Hi", "options": {"wait_for_model": True}})
    assert r.status_code == 200
    # the other dialects wait for the model
    assert post(srv, "/infer", {"prompt": "Hi", "options": {"maxTokens": 0}}).status_code == 200


def test_503_during_a_real_preload(models_root, tmp_path, monkeypatch):
    """A copy of MiniLM under a new name, preloaded at startup while a hook holds its load."""
    copy = tmp_path / "minilm-copy"
    copy.mkdir()
    for f in (models_root / MINILM).iterdir():
        (copy / f.name).symlink_to(f)
    release = threading.Event()
    real = refllm.engine.get_embedder

    def slow_get_embedder(path, **kw):
        release.wait(60)
        return real(path, **kw)

    monkeypatch.setattr(refllm.engine, "get_embedder", slow_get_embedder)
    config = ServerConfig(models_dir=tmp_path, default_embedding_model="minilm-copy", preload=True)
    with ServerThread(config) as s:
        r = post(s, "/", {"inputs": "Hi"}, token=None)
        assert r.status_code == 503 and r.json()["error"] == "Model minilm-copy is currently loading"
        assert httpx.get(s.url + "/health").json()["loading"] == ["minilm-copy"]
        result = {}
        waiter = threading.Thread(target=lambda: result.setdefault(
            "r", post(s, "/", {"inputs": "Hi"}, token=None, headers={"x-wait-for-model": "1"})))
        waiter.start()
        time.sleep(0.5)
        release.set()
        waiter.join(60)
        assert result["r"].status_code == 200 and len(result["r"].json()[0]) == 384
        assert post(s, "/", {"inputs": "Hi"}, token=None).status_code == 200


def test_x_use_cache(srv):
    seeded = {"inputs": "Hi", "parameters": {"max_new_tokens": 2, "do_sample": True, "seed": 3}}
    stats = srv.engine.stats
    first = post(srv, "/", seeded)
    assert first.status_code == 200 and first.headers["x-cache"] == "miss"
    units = stats["units"]
    again = post(srv, "/", seeded)
    assert again.headers["x-cache"] == "hit" and again.content == first.content
    assert stats["units"] == units  # answered without the model
    fresh = post(srv, "/", seeded, headers={"x-use-cache": "0"})
    assert "x-cache" not in fresh.headers and stats["units"] > units and fresh.json() == first.json()
    unseeded = {"inputs": "Hi", "parameters": {"max_new_tokens": 1, "do_sample": True}}
    assert "x-cache" not in post(srv, "/", unseeded).headers  # random: never cached
    assert post(srv, "/", {"inputs": "cache me"}).headers["x-cache"] == "miss"
    assert post(srv, "/", {"inputs": "cache me"}).headers["x-cache"] == "hit"


def test_a_client_that_disconnects_mid_stream_stops_its_generation(models_root):
    with ServerThread(ServerConfig(models_dir=models_root)) as s:
        stats = s.engine.stats
        before = dict(stats)
        with httpx.stream("POST", s.url + "/generate_stream", timeout=120,
                          json={"inputs": "Once upon a time", "parameters": {"max_new_tokens": 500}}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            assert first.startswith("data: {")
        deadline = time.monotonic() + 60
        while stats["cancelled"] == before["cancelled"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stats["cancelled"] == before["cancelled"] + 1
        assert stats["units"] - before["units"] < 100  # it did not run on to 500 tokens
        assert httpx.get(s.url + "/health").status_code == 200


def test_runtime_errors_are_500(tmp_path):
    broken = tmp_path / "llama" / "broken"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text('{"vocab_size": ')
    with ServerThread(ServerConfig(models_dir=tmp_path, default_llm="broken")) as s:
        body = spin_error(post(s, "/infer", {"model": "broken", "prompt": "Hi"}, token=None), 500)
        assert body["variant"] == "runtime-error" and "config.json" in body["error"]
        r = post(s, "/generate", {"inputs": "Hi"}, token=None)
        assert r.status_code == 500 and r.json()["error_type"] == "generation"
        assert openai_error(post(s, "/v1/completions", {"prompt": "Hi"}, token=None), 500)["type"] == "server_error"


# ----------------------------------------------------------------------------- the CLI contract

def test_serve_arguments_make_the_config():
    parser = add_serve_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--port", "9000", "--token", "t1", "--token-models", "t2", f"{MINILM}, {LLAMA}",
                              "--quota", "--max-tokens-cap", "64", "--ai-models", MINILM, "--models-dir", "/m"])
    c = config_from_args(args)
    assert args.port == 9000 and args.host == "127.0.0.1"
    assert c.tokens == ("t1", "t2") and c.token_models == {"t2": [MINILM, LLAMA]}
    assert (c.inference_quota, c.embedding_quota, c.quota_window_s) == (75, 200, 3600.0)
    assert c.max_tokens_cap == 64 and c.allowed_models == [MINILM] and c.models_dir == "/m"
    c = config_from_args(parser.parse_args(["--quota", "5,7"]))
    assert (c.inference_quota, c.embedding_quota, c.tokens, c.max_tokens_cap) == (5, 7, (), 1024)
    with pytest.raises(SystemExit):
        parser.parse_args(["--quota", "lots"])
    c = config_from_args(parser.parse_args([]))  # issue 14's options and their defaults
    assert (c.max_batch, c.max_queue, c.max_client_batch, c.batch_mode) == (8, 128, 2048, "invariant")
    assert (c.forwarded_allow_ips, c.header_timeout_s, c.body_timeout_s) == (None, 10.0, 60.0)
    c = config_from_args(parser.parse_args(["--max-batch", "4", "--max-queue", "9", "--max-client-batch", "3",
                                            "--batch-mode", "throughput", "--forwarded-allow-ips", "10.0.0.1",
                                            "--header-timeout", "2", "--body-timeout", "5"]))
    assert (c.max_batch, c.max_queue, c.max_client_batch, c.batch_mode) == (4, 9, 3, "throughput")
    assert (c.forwarded_allow_ips, c.header_timeout_s, c.body_timeout_s) == ("10.0.0.1", 2.0, 5.0)


def test_spin_profile_reproduces_spins_engine(models_root):
    with ServerThread(ServerConfig(models_dir=models_root, profile="spin")) as s:
        params = refllm.InferencingParams(2, 1.1, 64, 0.0, 40, 0.9)
        r = post(s, "/infer", {"model": LLAMA, "prompt": "Hi there", "options": {"maxTokens": 2, "temperature": 0.0}},
                 token=None)
        want = refllm.infer(LLAMA, "Hi there", params, profile="spin", models_dir=models_root)
        assert r.json() == {"text": want.text, "usage": {"promptTokenCount": want.usage.prompt_token_count,
                                                          "generatedTokenCount": want.usage.generated_token_count}}
        assert r.json()["text"].startswith("Hi there")
        r = post(s, "/embed", {"model": MINILM, "input": ["a", "longer text"]}, token=None)
        want = refllm.generate_embeddings(MINILM, ["a", "longer text"], profile="spin", models_dir=models_root)
        assert r.json()["usage"] == {"promptTokenCount": want.usage.prompt_token_count}
        assert r.json()["embeddings"] == want.embeddings
