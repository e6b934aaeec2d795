"""Run routes: start, list, stop, resume, live events (Server-Sent Events), files, merge/export, chat, compare.

A run is started from a form exactly as :func:`zhtune.studio.app.checked_options` checks it, with the
command's output folder set to the run's ``out/``. Live events are read from the run's log by
:class:`~zhtune.studio.progress.LogReader` every half second; the stream ends when the run does.
"""

from __future__ import annotations

import asyncio
import codecs
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from zhtune.deps import require

require("fastapi", "zhtune studio")  # the serve extra; a clear message instead of a bare ImportError

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from zhtune.errors import ConfigError
from zhtune.studio.compare import plots, table
from zhtune.studio.context import Studio, body_of, error_response, produced, run_output, start
from zhtune.studio.progress import LogReader
from zhtune.studio.workspace import check_run_name

FILE_TYPES = {".png": "image/png", ".md": "text/plain", ".json": "application/json", ".yaml": "text/plain"}
FILE_TYPES |= {".log": "text/plain", ".txt": "text/plain"}
CHAT_KEYS = ("messages", "temperature", "top_p", "max_tokens", "stream", "seed", "stop")
TAIL_BYTES = 256 << 10
TICK_S = 0.5


def details(studio: Studio, name: str) -> dict[str, Any]:
    st = studio.runs.status(name)
    out = run_output(studio, name)
    if st["state"] in ("failed", "lost", "stopped"):
        reader = LogReader()
        reader.feed(tail(studio.runs.log_path(name), TAIL_BYTES))
        st["error"] = (
            reader.error() if st["state"] != "lost" else "the run's process is gone without an exit record"
        )
    try:
        st["model"] = produced(studio, name) if st["state"] == "finished" else None
    except ConfigError as e:
        st["model"], st["model_error"] = None, str(e)
    st["plots"] = [studio.ws.rel(p) for p in plots(out)]
    report = out / "report" / "report.md"
    st["report"] = report.read_text(encoding="utf-8") if report.is_file() else None
    recipe = studio.ws.run_dir(name) / "recipe.yaml"
    st["recipe"] = recipe.read_text(encoding="utf-8") if recipe.is_file() else ""
    return st


def tail(path: Path, size: int) -> str:
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode("utf-8", errors="replace")


async def events(studio: Studio, name: str, request: Request) -> AsyncIterator[str]:
    """Snapshot first (the whole log so far), then what changes, every half second, until the run ends."""
    path = studio.runs.log_path(name)
    reader, decoder, pos, last, first, idle = (
        LogReader(),
        codecs.getincrementaldecoder("utf-8")("replace"),
        0,
        None,
        True,
        0,
    )
    while True:
        data = b""
        if path.is_file():
            with open(path, "rb") as f:
                f.seek(pos)
                data = f.read(4 << 20)
                pos += len(data)
        reader.feed(decoder.decode(data))
        status = studio.runs.status(name)
        delta = reader.take()
        if first:
            delta["lines"], delta["losses"] = list(reader.lines), reader.loss_points()
        ended = status["state"] != "running"
        if ended:
            delta["error"] = reader.error() if status["state"] in ("failed", "stopped") else ""
            delta["summary"] = reader.summary
        if first or data or status != last or idle >= 30:
            yield f"data: {json.dumps({**delta, 'status': status}, ensure_ascii=False)}\n\n"
            idle = 0
        first, last, idle = False, status, idle + 1
        if ended and len(data) < (4 << 20):
            yield "event: end\ndata: {}\n\n"
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(TICK_S)


def add_run_routes(app: FastAPI, studio: Studio) -> None:
    add_lifecycle_routes(app, studio)
    add_output_routes(app, studio)
    add_chat_routes(app, studio)


def add_lifecycle_routes(app: FastAPI, studio: Studio) -> None:
    @app.get("/api/runs")
    def runs() -> dict[str, Any]:
        return {"runs": [studio.runs.status(n) for n in studio.runs.names()]}

    @app.post("/api/runs")
    async def new_run(request: Request) -> dict[str, Any]:
        body = await body_of(request)
        values = body.get("values") or {}
        if not isinstance(values, dict):
            raise ConfigError("values must be a mapping of section: {option: value}")
        name, command = str(body.get("name") or ""), str(body.get("command") or "")
        return await run_in_threadpool(start, studio, name, command, values)

    @app.get("/api/runs/{name}")
    def run(name: str) -> dict[str, Any]:
        return details(studio, check_run_name(name))

    @app.post("/api/runs/{name}/stop")
    def stop(name: str) -> dict[str, Any]:
        return studio.runs.stop(check_run_name(name))

    @app.post("/api/runs/{name}/resume")
    def resume(name: str) -> dict[str, Any]:
        return studio.runs.resume(check_run_name(name))

    @app.get("/api/runs/{name}/events")
    def run_events(name: str, request: Request) -> StreamingResponse:
        studio.runs.record(check_run_name(name))
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(
            events(studio, name, request), media_type="text/event-stream", headers=headers
        )


def add_output_routes(app: FastAPI, studio: Studio) -> None:
    @app.get("/api/file")
    def file(path: str) -> Response:
        p = studio.ws.existing(path, "path", kind="file")
        if p.suffix not in FILE_TYPES or studio.ws.private in p.parents:
            return error_response(403, f"{path}: only {', '.join(FILE_TYPES)} files are shown")
        return FileResponse(p, media_type=FILE_TYPES[p.suffix])

    @app.post("/api/runs/{name}/merge")
    async def merge(name: str, request: Request) -> dict[str, Any]:
        body = await body_of(request)
        got = produced(studio, check_run_name(name))
        if not got["adapters"]:
            raise ConfigError(f"run {name} produced a full model; there are no adapters to merge")
        values = {"model": {"model_name_or_path": got["model"]}, "merge": {"lora_models": got["adapters"]}}
        target = str(body.get("name") or f"{name}-merged")
        return await run_in_threadpool(start, studio, target, "merge", values, name)

    @app.post("/api/runs/{name}/export")
    async def export(name: str, request: Request) -> dict[str, Any]:
        body = await body_of(request)
        quant = str(body.get("quant") or "q8_0")
        got = produced(studio, check_run_name(name))
        values = {
            "model": {"model_name_or_path": got["model"]},
            "export": {"lora_models": got["adapters"] or None},
            "gguf": {"quant": quant},
        }
        target = str(body.get("name") or f"{name}-gguf-{quant}")
        return await run_in_threadpool(start, studio, target, "export", values, name)

    @app.get("/api/compare")
    def compare(runs: str) -> dict[str, Any]:
        names = [check_run_name(n) for n in runs.split(",") if n]
        outs = {n: run_output(studio, n) for n in names}
        result = table(outs)
        result["plots"] = {n: [studio.ws.rel(p) for p in plots(o)] for n, o in outs.items()}
        return result


def add_chat_routes(app: FastAPI, studio: Studio) -> None:
    @app.post("/api/runs/{name}/chat")
    def open_chat(name: str) -> dict[str, Any]:
        got = produced(studio, check_run_name(name))
        return studio.chats.start(name, got["model"], got["adapters"])

    @app.get("/api/runs/{name}/chat")
    def chat_state(name: str) -> dict[str, Any]:
        return studio.chats.get(check_run_name(name)).state()

    @app.delete("/api/runs/{name}/chat")
    def close_chat(name: str) -> dict[str, Any]:
        studio.chats.stop(check_run_name(name))
        return {"state": "closed"}

    @app.post("/api/runs/{name}/chat/completions")
    async def completions(name: str, request: Request) -> Response:
        body = await body_of(request)
        server = studio.chats.get(check_run_name(name))
        unknown = set(body) - set(CHAT_KEYS)
        if unknown or not isinstance(body.get("messages"), list):
            raise ConfigError(f"a chat request has messages and {', '.join(CHAT_KEYS[1:])} only")
        upstream = await run_in_threadpool(server.open, {**body, "model": name})
        if upstream.status != 200:
            text = (await run_in_threadpool(upstream.resp.read)).decode("utf-8", errors="replace")
            upstream.close()
            try:
                message = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = text[:500]
            return JSONResponse({"error": message}, status_code=upstream.status)
        return StreamingResponse(relay(upstream), media_type=upstream.content_type)


async def relay(upstream: Any) -> AsyncIterator[bytes]:
    """The chat server's reply as it comes; when the page leaves, the connection to the server is closed."""
    try:
        while chunk := await run_in_threadpool(upstream.read):
            yield chunk
    finally:
        upstream.close()
