"""``zhtune serve`` against clients nobody here wrote: the official openai package, plain HTTP, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from infer_models import free_port, never_stopping_model, running_server, wait_healthy

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

KEY = "sk-test-0123456789"
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def looping_model(tmp_path_factory, bpe_tokenizer_dir):
    return never_stopping_model(bpe_tokenizer_dir, tmp_path_factory.mktemp("looping_serve"), context=4096)


@pytest.fixture(scope="module")
def served(looping_model):
    cfg = {
        "model_name_or_path": str(looping_model),
        "served_model_name": "tiny",
        "api_key": KEY,
        "max_batch_size": 2,
        "max_queue": 1,
        "max_request_bytes": 20000,
    }
    with running_server(cfg) as (url, app):
        yield url, app


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def wait_idle(url: str) -> dict:
    deadline = time.time() + 10
    while True:
        h = httpx.get(url + "/health").json()
        if h["in_flight"] == 0 or time.time() > deadline:
            return h
        time.sleep(0.05)


def test_openai_chat_streaming_and_usage(served, client):
    url, app = served
    assert [m.id for m in client.models.list().data] == ["tiny"]
    msgs = [{"role": "system", "content": "简短回答"}, {"role": "user", "content": "你好"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)
    text = r.choices[0].message.content
    assert len(text) == 6 and set(text) <= set("好的")
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    n_prompt = len(app.state.server.engine.prompt_ids(msgs))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        n_prompt,
        6,
        n_prompt + 6,
    )

    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=msgs,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2 and "".join(pieces) == text  # token by token, same greedy text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6

    r = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=40, temperature=0, stop=["的好的"]
    )
    assert r.choices[0].finish_reason == "stop" and "的好的" not in r.choices[0].message.content


def test_openai_completions(served, client):
    r = client.completions.create(model="tiny", prompt="北京", max_tokens=4, temperature=0)
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    r2 = client.completions.create(
        model="tiny", prompt=["北京", "上海"], max_tokens=3, temperature=0, echo=True
    )
    assert [c.index for c in r2.choices] == [0, 1]
    assert r2.choices[0].text.startswith("北京") and r2.choices[1].text.startswith("上海")
    stream = client.completions.create(model="tiny", prompt="北京", max_tokens=4, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_raw_sse_format(served):
    url, _ = served
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "你好"}],
        "max_tokens": 3,
        "stream": True,
    }
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_errors_are_openai_shaped(served, client):
    url, _ = served
    for key in (None, "sk-wrong"):
        c = openai.OpenAI(base_url=url + "/v1", api_key=key or "x", max_retries=0)
        if key is None:
            r = httpx.get(url + "/v1/models")
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            continue
        with pytest.raises(openai.AuthenticationError) as e:
            c.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    msgs = [{"role": "user", "content": "你好"}]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=msgs)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10**6)
    assert (
        e.value.body["code"] == "context_length_exceeded"
        and "context is 4096 tokens" in e.value.body["message"]
    )
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        client.chat.completions.create(model="tiny", messages=msgs, n=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=msgs, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="last message must be from the user"):
        client.chat.completions.create(model="tiny", messages=msgs + [{"role": "assistant", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:  # the record check's ValueError, named by its field
        client.chat.completions.create(model="tiny", messages=msgs + msgs)
    assert e.value.body["param"] == "messages" and e.value.body["message"].startswith(
        "messages: out-of-order"
    )
    with pytest.raises(openai.BadRequestError, match="--backend generate"):
        client.chat.completions.create(model="tiny", messages=msgs, extra_body={"num_beams": 2})
    big = {"model": "tiny", "messages": [{"role": "user", "content": "长" * 20000}]}
    r = httpx.post(url + "/v1/chat/completions", json=big, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and "larger than 20000 bytes" in r.json()["error"]["message"]
    r = httpx.get(url + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_queue_bound_and_disconnect_cancel(served):
    """Beyond max_batch_size + max_queue a request gets 429; a client that goes away cancels its job."""
    url, app = served
    before = wait_idle(url)
    assert before["max_in_flight"] == 3
    headers = {"Authorization": f"Bearer {KEY}"}
    # 3000 events do not fit in the socket buffers of a client that does not read: the streams stay open
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "你好"}],
        "max_tokens": 3000,
        "temperature": 0,
        "stream": True,
    }
    clients, streams, lines = [], [], []
    try:
        for _ in range(3):
            c = httpx.Client(timeout=30)
            cm = c.stream("POST", url + "/v1/chat/completions", json=body, headers=headers)
            resp = cm.__enter__()
            assert resp.status_code == 200
            lines.append(resp.iter_lines())  # keep the iterator: dropping it would close the response
            next(lines[-1])  # the first event: the request is running
            clients.append(c)
            streams.append(cm)
        r = httpx.post(
            url + "/v1/chat/completions", json={**body, "stream": False}, headers=headers, timeout=60
        )
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        for cm, c in zip(streams, clients):
            cm.__exit__(None, None, None)  # hang up mid-stream
            c.close()
    after = wait_idle(url)
    assert after["in_flight"] == 0
    assert after["cancelled"] - before["cancelled"] == 3 and after["rejected"] - before["rejected"] == 1
    deadline = time.time() + 5
    while app.state.server.engine.pending() and time.time() < deadline:
        time.sleep(0.05)
    assert app.state.server.engine.pending() == 0  # the batch slots were given back


def test_page_health_and_schema(served):
    url, _ = served
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "connect-src 'self'" in page.headers["content-security-policy"]
    for element in (
        'id="messages"',
        'id="send"',
        'id="clear"',
        'id="apikey"',
        'id="temperature"',
        'id="stop"',
    ):
        assert element in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing loaded from elsewhere
    h = httpx.get(url + "/health").json()
    assert h["status"] == "ok" and h["backend"] == "continuous" and h["context_length"] == 4096
    schema = httpx.get(url + "/openapi.json").json()
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions", "/health"} <= set(schema["paths"])


def test_cli_serves_on_loopback_and_logs_no_prompts_or_keys(tmp_path, looping_model):
    key_file = tmp_path / "key.txt"
    key_file.write_text("sk-cli-secret-42\n")
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "zhtune",
        "--log_level",
        "debug",
        "serve",
        "--model_name_or_path",
        str(looping_model),
        "--port",
        str(port),
        "--api_key_file",
        str(key_file),
        "--log_level",
        "debug",
        "--max_batch_size",
        "2",
    ]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, log, timeout=120)
        c = openai.OpenAI(base_url=url + "/v1", api_key="sk-cli-secret-42", max_retries=0)
        name = c.models.list().data[0].id
        secret = "秘密提示词-do-not-log"
        r = c.chat.completions.create(
            model=name, messages=[{"role": "user", "content": secret}], max_tokens=3
        )
        assert r.usage.completion_tokens == 3
        list(
            c.chat.completions.create(
                model=name, messages=[{"role": "user", "content": secret}], max_tokens=3, stream=True
            )
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    assert f"Uvicorn running on http://127.0.0.1:{port}" in text
    assert "POST /v1/chat/completions" in text  # the access log is there...
    assert secret not in text and "sk-cli-secret-42" not in text  # ...but no prompt and no key


def test_sse_events_survive_a_splitlines_reader():
    """U+0085, U+2028 and U+2029 end a line for str.splitlines (and httpx's iter_lines) but are left raw by JSON:
    the server escapes them, so each event stays one line whatever text a model samples."""
    from zhtune.serve.runner import sse

    obj = {"choices": [{"delta": {"content": "甲\x85乙\u2028丙\u2029丁\n"}}]}
    lines = sse(obj).splitlines()
    assert lines[1:] == [""] and json.loads(lines[0].removeprefix("data: ")) == obj
