"""``zhtune serve`` under abuse, on loopback: malformed requests get OpenAI-shaped 4xx errors; 64 streaming
clients for 60 s on the embedded default (some hanging up mid-stream) complete with zero errors, leak no work
and keep memory flat (slow); schemathesis fuzzes every route of the OpenAPI schema (slow)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from infer_models import free_port, never_stopping_model, running_server, wait_healthy

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

KEY = "sk-abuse-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def small_server(tmp_path_factory, bpe_tokenizer_dir):
    """A model that never stops, with a 64-token context: every request is short whatever it asks."""
    model = never_stopping_model(bpe_tokenizer_dir, tmp_path_factory.mktemp("abuse"), context=64)
    cfg = {"model_name_or_path": str(model), "served_model_name": "tiny", "api_key": KEY, "max_batch_size": 2}
    with running_server(cfg) as (url, app):
        yield url, app


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4}
# (what is wrong, request body as bytes or JSON, headers, expected status)
MALFORMED = [
    ("malformed JSON", b'{"model": "tiny", "messages": [', AUTH, 400),
    ("not JSON at all", b"\xff\xfe garbage", AUTH, 400),
    ("a JSON array", b"[1, 2]", AUTH, 400),
    ("empty body", b"", AUTH, 400),
    ("messages is a string", {**CHAT, "messages": "hi"}, AUTH, 400),
    ("messages missing", {"model": "tiny"}, AUTH, 400),
    ("messages empty", {**CHAT, "messages": []}, AUTH, 400),
    ("content is a number", {**CHAT, "messages": [{"role": "user", "content": 5}]}, AUTH, 400),
    ("unknown role", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, AUTH, 400),
    ("model missing", {"messages": CHAT["messages"]}, AUTH, 400),
    ("model is a number", {**CHAT, "model": 7}, AUTH, 400),
    ("max_tokens negative", {**CHAT, "max_tokens": -1}, AUTH, 400),
    ("max_tokens zero", {**CHAT, "max_tokens": 0}, AUTH, 400),
    ("max_tokens a string", {**CHAT, "max_tokens": "many"}, AUTH, 400),
    ("max_tokens huge", {**CHAT, "max_tokens": 10**12}, AUTH, 400),
    ("max_tokens a float", {**CHAT, "max_tokens": 1.5}, AUTH, 400),
    (
        "temperature NaN",
        b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        AUTH,
        400,
    ),
    ("top_p zero", {**CHAT, "top_p": 0}, AUTH, 400),
    ("five stop strings", {**CHAT, "stop": list("abcde")}, AUTH, 400),
    ("stream is a string", {**CHAT, "stream": "yes please"}, AUTH, 400),
    ("unknown model", {**CHAT, "model": "gpt-4"}, AUTH, 404),
    ("no API key", CHAT, {}, 401),
    ("wrong API key", CHAT, {"Authorization": "Bearer sk-wrong"}, 401),
    ("key without Bearer", CHAT, {"Authorization": KEY}, 401),
    ("key of another length", CHAT, {"Authorization": f"Bearer {KEY}x"}, 401),
]


@pytest.mark.parametrize("what,body,headers,status", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_openai_shaped_4xx(small_server, what, body, headers, status):
    url, app = small_server
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(
        url + "/v1/chat/completions", headers={"Content-Type": "application/json", **headers}, **kw
    )
    assert r.status_code == status, (what, r.text)
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"].strip(), err
    assert KEY not in r.text


def test_completions_malformed_and_server_still_serves(small_server):
    url, app = small_server
    bad = [5, [[-1]], [[10**9]], "", [[]], [""], None]
    for body in [{"model": "tiny", "prompt": p} for p in bad] + [{"model": "tiny"}]:
        r = httpx.post(url + "/v1/completions", json=body, headers=AUTH)
        assert 400 <= r.status_code < 500 and "error" in r.json(), (body, r.text)
    h = httpx.get(url + "/health").json()
    assert h["errors"] == 0 and h["in_flight"] == 0
    r = httpx.post(url + "/v1/chat/completions", json=CHAT, headers=AUTH)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


# ---- slow: the embedded default under load, and schemathesis ----


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """``zhtune serve`` on the embedded default in its own process, so its memory can be read alone."""
    from zhtune.errors import MissingDependency
    from zhtune.model.default import default_model_dir

    try:
        default_model_dir()
    except MissingDependency as e:
        pytest.skip(str(e))
    port = free_port()
    log = tmp_path_factory.mktemp("load") / "serve.log"
    cmd = [sys.executable, "-m", "zhtune", "serve", "--model_name_or_path", "default", "--port", str(port),
           "--max_batch_size", "16", "--max_queue", "64"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log, timeout=180, poll=0.3)
        yield url, proc, log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def client_loop(url: str, i: int, until: float, rng: random.Random, tally: dict) -> None:
    body = {"model": "default", "stream": True, "max_tokens": 12, "temperature": 0.7}
    async with httpx.AsyncClient(timeout=httpx.Timeout(120)) as c:
        while time.monotonic() < until:
            msgs = [{"role": "user", "content": f"用一句话介绍数字 {rng.randrange(1000)}。"}]
            hang_up = i % 8 == 0 and rng.random() < 0.5  # one client in eight hangs up half of the time
            try:
                async with c.stream(
                    "POST", url + "/v1/chat/completions", json={**body, "messages": msgs}
                ) as r:
                    if r.status_code != 200:
                        tally["errors"].append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                        continue
                    events = 0
                    async for line in r.aiter_lines():
                        if not line:
                            continue
                        if line == "data: [DONE]":
                            tally["complete"] += 1
                            break
                        json.loads(line[6:])
                        events += 1
                        if hang_up and events == 2:
                            tally["hung_up"] += 1
                            break
                    else:
                        tally["errors"].append("stream ended without [DONE]")
            except (httpx.HTTPError, ValueError) as e:
                tally["errors"].append(f"{type(e).__name__}: {e}")


async def load(url: str, clients: int, seconds: float, pid: int) -> dict:
    tally = {"complete": 0, "hung_up": 0, "errors": [], "rss": []}
    until = time.monotonic() + seconds

    async def sample() -> None:
        while time.monotonic() < until:
            tally["rss"].append(rss_mib(pid))
            await asyncio.sleep(1)

    rngs = [random.Random(i) for i in range(clients)]
    await asyncio.gather(sample(), *(client_loop(url, i, until, rngs[i], tally) for i in range(clients)))
    return tally


@pytest.mark.slow
def test_64_streaming_clients_for_60_seconds(default_server):
    url, proc, log = default_server
    warm = httpx.post(url + "/v1/chat/completions", json={"model": "default", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4}, timeout=120)  # fmt: skip
    assert warm.status_code == 200
    # a first 30 s under the same load fills the allocator's pools and the generation caches; the 60 s after
    # it are the measured run, in which memory must stay flat
    warmup = asyncio.run(load(url, 64, 30, proc.pid))
    assert not warmup["errors"], warmup["errors"][:5]
    before = httpx.get(url + "/health").json()
    t = asyncio.run(load(url, 64, 60, proc.pid))
    after = httpx.get(url + "/health").json()
    deadline = time.time() + 30
    while after["in_flight"] and time.time() < deadline:
        time.sleep(0.2)
        after = httpx.get(url + "/health").json()
    rss = t["rss"]
    third = max(1, len(rss) // 3)
    growth = sum(rss[-third:]) / third - sum(rss[third : 2 * third]) / third  # reported
    figures = {
        "clients": 64,
        "seconds": 60,
        "streams_completed": t["complete"],
        "streams_hung_up": t["hung_up"],
        "errors": len(t["errors"]),
        "server_cancelled": after["cancelled"] - before["cancelled"],
        "server_completed": after["completed"] - before["completed"],
        "server_errors": after["errors"] - before["errors"],
        "rss_mib_warmup": [round(x) for x in warmup["rss"]],
        "rss_mib": [round(x) for x in rss],
        "rss_growth_mib_middle_to_last_third": round(growth, 1),
    }
    print("load figures:", json.dumps(figures))
    assert not t["errors"], t["errors"][:5]
    assert t["complete"] >= 64 and t["hung_up"] > 0
    assert after["in_flight"] == 0 and after["errors"] == before["errors"]
    # every hang-up cancelled its job (a job that had just finished when the client left counts as completed)
    assert (
        after["cancelled"] - before["cancelled"] + after["completed"] - before["completed"]
        == t["complete"] + t["hung_up"]
    )
    assert after["cancelled"] - before["cancelled"] >= t["hung_up"] // 2
    # memory rises with the work done (allocator pools, caches) and then levels off: on an idle 2-core CPU it
    # climbed from 1.08 to 1.77 GiB over the first ~70 s and stayed within 18 MiB for the last 20 s. The test
    # checks that the last 15 s are flat (within 3%) and the peak stays under twice the starting RSS.
    tail = rss[-15:]
    assert max(tail) - min(tail) < 0.03 * (sum(tail) / len(tail)), rss
    assert max(rss) < 2.0 * warmup["rss"][0], (warmup["rss"], rss)
    text = log.read_text()
    assert "数字" not in text and "Traceback" not in text


@pytest.mark.slow
def test_schemathesis_on_the_openapi_schema(small_server):
    """Every route and every documented field, fuzzed from /openapi.json: no 5xx, responses match the
    schema, and errors are OpenAI-shaped."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    url, app = small_server
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    failures, seen = [], {"cases": 0, "statuses": {}}

    from schemathesis.generation import GenerationMode

    for op in schema.get_all_operations():
        operation = op.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=50,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
                derandomize=True,
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case):  # noqa: ANN001
                mode = case.meta.generation.mode if case.meta else GenerationMode.POSITIVE
                seen["cases"] += 1
                if isinstance(case.body, dict) and seen["cases"] % 4:
                    case.body["model"] = "tiny"  # else nearly every generated request is for an unknown model
                if case.path_parameters and "name" in case.path_parameters and seen["cases"] % 2:
                    case.path_parameters["name"] = "tiny"
                headers = AUTH if seen["cases"] % 7 else {"Authorization": "Bearer nope"}
                r = case.call(headers=headers, timeout=60)
                key = f"{mode.value} {r.status_code}"
                seen["statuses"][key] = seen["statuses"].get(key, 0) + 1
                if r.status_code >= 500:
                    failures.append((case.path, case.body, r.status_code, r.text[:300]))
                elif r.status_code >= 400 and "json" in r.headers.get("content-type", ""):
                    assert set(r.json()["error"]) >= {"message", "type", "param", "code"}, r.text
                if mode == GenerationMode.POSITIVE:
                    case.validate_response(r, checks=[schemathesis.checks.not_a_server_error])

            try:
                fuzz()
            except Unsatisfiable:  # nothing to make invalid (a route without parameters or body)
                assert mode == GenerationMode.NEGATIVE
    print("schemathesis:", seen)
    assert not failures, failures[:3]
    assert seen["cases"] >= 100
    assert httpx.get(url + "/health").json()["errors"] == 0
