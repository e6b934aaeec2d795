"""``zhtune serve`` under abuse, on loopback: malformed requests get OpenAI-shaped 4xx errors; 64 streaming
clients (some hanging up mid-stream) send 1,500 requests that complete with zero errors, leak no work and,
once memory is at its level, add under 8 KiB per request, a bound that a leaking engine fails (slow);
schemathesis fuzzes every route of the OpenAPI schema (slow)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
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


# ---- slow: 64 streaming clients, memory per request, and schemathesis ----
#
# Memory is judged per request, not per second: a loaded machine serves fewer requests a second, and what
# a leak leaves behind grows with the requests served. The server's memory first rises to a level (the KV
# cache is allocated empty and each block is touched on first use; blocks go round first-in first-out) and
# then stays there. So the load runs WARMUP_REQUESTS to reach the level, then MEASURED_REQUESTS more, and
# the RSS growth between the two (each end averaged over WINDOW requests) divided by MEASURED_REQUESTS must
# stay under MAX_GROWTH_KIB_PER_REQUEST. Measured on 2 CPU cores shared with other jobs (load average 6-12),
# two runs: 442.3 -> 443.1 and 440.3 -> 441.2 MiB, 0.67 and 0.77 KiB per request, 1,500 requests in 541 and
# 297 s (tracemalloc finds no Python objects left behind: the drift is below Python, in the allocator). With a
# deliberate 64 KiB leak the same check measured 58.3 and 64.3 KiB per request (the last test).

CLIENTS = 64
KV_CACHE_TOKENS = 4096  # 64 blocks of 64 tokens; a request (prompt and 12 new tokens) takes one
WARMUP_REQUESTS = 300  # every KV block used several times over
MEASURED_REQUESTS = 1200
WINDOW = 200  # requests whose RSS samples are averaged at each end
SAMPLE_EVERY = 20  # ended requests between RSS samples
MAX_GROWTH_KIB_PER_REQUEST = 8
LEAK_KIB_PER_REQUEST = 64  # what a forgotten float32 tensor of 16,384 values per request would keep


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


# zhtune serve with the engine wrapped so that every submitted request leaks ``sys.argv[1]`` KiB of touched memory
LEAKY_SERVE = """
import sys
from zhtune.cli import main
from zhtune.infer.engine import Engine

kept, size, submit = [], int(sys.argv[1]) * 1024, Engine.submit

def leaky_submit(self, job):
    kept.append(b"\\x01" * size)
    return submit(self, job)

Engine.submit = leaky_submit
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def load_model(tmp_path_factory, bpe_tokenizer_dir) -> Path:
    """Tiny and never stopping: each request costs little beyond the serving itself, so thousands of them run
    in minutes even on a busy machine, and every reply runs to max_tokens."""
    return never_stopping_model(bpe_tokenizer_dir, tmp_path_factory.mktemp("load_model"), context=4096)


@contextlib.contextmanager
def serve_process(
    model: Path, folder: Path, leak_kib: int = 0
) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """``zhtune serve`` in its own process, so that its memory can be read alone; ``leak_kib``: through an
    engine that leaks that much per request."""
    port = free_port()
    log = folder / "serve.log"
    args = ["serve", "--model_name_or_path", str(model), "--served_model_name", "tiny", "--port", str(port),
            "--max_batch_size", "16", "--max_queue", "64", "--kv_cache_tokens", str(KV_CACHE_TOKENS)]  # fmt: skip
    run = ["-c", LEAKY_SERVE, str(leak_kib)] if leak_kib else ["-m", "zhtune"]
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, *run, *args], env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, log, timeout=180, poll=0.3)
        yield url, proc, log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def client_loop(url: str, i: int, rng: random.Random, tally: dict, pid: int, total: int) -> None:
    """Streaming requests back to back until ``total`` have been sent by all clients together."""
    body = {"model": "tiny", "stream": True, "max_tokens": 12, "temperature": 0.7}
    async with httpx.AsyncClient(timeout=httpx.Timeout(600)) as c:  # a busy machine is slow, not wrong
        while tally["sent"] < total:
            tally["sent"] += 1
            msgs = [{"role": "user", "content": f"用一句话介绍数字 {rng.randrange(1000)}。"}]
            hang_up = i % 8 == 0 and rng.random() < 0.5  # one client in eight hangs up half of the time
            try:
                await one_stream(c, url, {**body, "messages": msgs}, hang_up, tally)
            except (httpx.HTTPError, ValueError) as e:
                tally["errors"].append(f"{type(e).__name__}: {e}")
            tally["ended"] += 1
            if tally["ended"] % SAMPLE_EVERY == 0:
                tally["rss"].append((tally["ended"], rss_mib(pid)))


async def one_stream(c: httpx.AsyncClient, url: str, body: dict, hang_up: bool, tally: dict) -> None:
    async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            tally["errors"].append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            return
        events = 0
        async for line in r.aiter_lines():
            if not line:
                continue
            if line == "data: [DONE]":
                tally["complete"] += 1
                return
            json.loads(line[6:])
            events += 1
            if hang_up and events == 2:
                tally["hung_up"] += 1
                return
        tally["errors"].append("stream ended without [DONE]")


def load(url: str, pid: int) -> dict:
    """WARMUP_REQUESTS + MEASURED_REQUESTS requests from CLIENTS streaming clients; RSS sampled every
    SAMPLE_EVERY ended requests."""
    tally = {"sent": 0, "ended": 0, "complete": 0, "hung_up": 0, "errors": [], "rss": []}
    total = WARMUP_REQUESTS + MEASURED_REQUESTS
    rngs = [random.Random(i) for i in range(CLIENTS)]

    async def clients() -> None:
        await asyncio.gather(*(client_loop(url, i, rngs[i], tally, pid, total) for i in range(CLIENTS)))

    t0 = time.monotonic()
    asyncio.run(clients())
    tally["seconds"] = round(time.monotonic() - t0, 1)
    return tally


def growth_per_request(rss: list[tuple[int, float]]) -> tuple[float, float, float]:
    """RSS at the level (MiB, the WINDOW requests up to WARMUP_REQUESTS), RSS at the end (the last WINDOW
    requests) and the growth between them in KiB per request."""

    def mean(hi: int) -> float:
        xs = [m for n, m in rss if hi - WINDOW < n <= hi]
        return sum(xs) / len(xs)

    level, end = mean(WARMUP_REQUESTS), mean(WARMUP_REQUESTS + MEASURED_REQUESTS)
    return level, end, (end - level) * 1024 / MEASURED_REQUESTS


def finished_health(url: str) -> dict:
    """/health once the requests in flight have ended (a hung-up stream's job ends a moment later)."""
    deadline = time.time() + 30
    while True:
        h = httpx.get(url + "/health").json()
        if not h["in_flight"] or time.time() > deadline:
            return h
        time.sleep(0.2)


def figures(t: dict, level: float, end: float, growth: float) -> dict:
    return {
        "clients": CLIENTS,
        "requests": t["ended"],
        "seconds": t["seconds"],
        "streams_completed": t["complete"],
        "streams_hung_up": t["hung_up"],
        "errors": len(t["errors"]),
        "rss_mib_by_requests": [(n, round(m, 1)) for n, m in t["rss"][:: max(1, len(t["rss"]) // 30)]],
        "rss_mib_level": round(level, 1),
        "rss_mib_end": round(end, 1),
        "growth_kib_per_request": round(growth, 2),
    }


@pytest.mark.slow
def test_64_streaming_clients_memory_per_request(load_model, tmp_path):
    """64 streaming clients (some hanging up mid-stream) complete with zero errors and leak no work; once at
    its level, memory grows by less than MAX_GROWTH_KIB_PER_REQUEST per request."""
    with serve_process(load_model, tmp_path) as (url, proc, log):
        before = httpx.get(url + "/health").json()
        t = load(url, proc.pid)
        after = finished_health(url)
    level, end, growth = growth_per_request(t["rss"])
    f = figures(t, level, end, growth)
    f.update({k: after[k] - before[k] for k in ("completed", "cancelled", "errors")})
    print("load figures:", json.dumps(f))
    assert not t["errors"], t["errors"][:5]
    assert t["complete"] >= CLIENTS and t["hung_up"] > 0
    assert after["in_flight"] == 0 and after["errors"] == before["errors"]
    # every hang-up cancelled its job (a job that had just finished when the client left counts as completed)
    assert f["completed"] + f["cancelled"] == t["complete"] + t["hung_up"] == t["ended"]
    assert f["cancelled"] >= t["hung_up"] // 2
    assert growth < MAX_GROWTH_KIB_PER_REQUEST, f
    text = log.read_text()
    assert "数字" not in text and "Traceback" not in text


@pytest.mark.slow
def test_the_memory_check_catches_a_per_request_leak(load_model, tmp_path):
    """The same load and check on a server whose engine keeps LEAK_KIB_PER_REQUEST per request: the growth
    it measures is that leak, far over the bound."""
    with serve_process(load_model, tmp_path, leak_kib=LEAK_KIB_PER_REQUEST) as (url, proc, log):
        t = load(url, proc.pid)
    level, end, growth = growth_per_request(t["rss"])
    print("leaking server:", json.dumps(figures(t, level, end, growth)))
    assert not t["errors"], t["errors"][:5]
    assert growth > MAX_GROWTH_KIB_PER_REQUEST
    # RSS shows most of it (freed holes in the heap take some of the leaked bytes): 58 of 64 KiB when measured
    assert 0.75 * LEAK_KIB_PER_REQUEST < growth < 1.1 * LEAK_KIB_PER_REQUEST + MAX_GROWTH_KIB_PER_REQUEST


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
