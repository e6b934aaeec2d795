"""The FastAPI application: OpenAI-compatible routes, the web chat page, /health.

Every request runs as a job of the shared engine (continuous batching by default). The number of jobs
running or waiting is bounded: beyond it a request gets 429 at once. A streaming client that disconnects
cancels its job, so its slot in the batch is freed for others. Request bodies over the size limit get 413.
Nothing here logs prompts, replies or keys.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

from zhtune.deps import require

require("fastapi", "zhtune serve")  # the serve extra; a clear message instead of a bare ImportError

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from zhtune.config.args import GenerationArgs
from zhtune.errors import ConfigError
from zhtune.serve.asgi import JobStream
from zhtune.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    chat_chunk,
    chat_response,
    completion_body,
    completion_choice,
    new_id,
    usage,
)
from zhtune.text.records import validate

log = logging.getLogger("zhtune.serve")
PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Server:
    """State shared by the routes: the engine, the admission counter, counters for /health."""

    def __init__(self, engine: Any, *, model_name: str, api_key: str | None, max_queue: int):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.limit = engine.args.max_batch_size + max_queue
        self.in_flight = 0
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "rejected": 0, "errors": 0}
        self.started = time.time()

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(
                401,
                "missing or incorrect API key: send it as 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def admit(self, n: int = 1) -> Callable[[], None]:
        if self.in_flight + n > self.limit:
            self.stats["rejected"] += 1
            raise APIError(
                429,
                f"the server is busy ({self.in_flight} requests running or waiting, limit {self.limit}); retry later",
                type="requests",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        self.in_flight += n
        self.stats["requests"] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= n

        return release

    def params(self, req: SamplingFields, max_new_tokens: int) -> GenerationArgs:
        req.refuse_unsupported()
        temperature = 1.0 if req.temperature is None else req.temperature
        try:
            g = GenerationArgs(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=req.top_k or 0,
                repetition_penalty=req.repetition_penalty or 1.0,
                num_beams=req.num_beams or 1,
                do_sample=temperature > 0,
                stop=req.stops() or None,
                seed=req.seed,
            )
        except ConfigError as e:
            raise APIError(400, str(e)) from None
        why = self.engine.backend.unsupported(g)
        if why:
            raise APIError(400, why)
        return g

    def new_job(self, ids: list[int], req: SamplingFields, asked: int | None, chat: bool) -> Any:
        try:
            n = self.engine.max_new_tokens(len(ids), asked)
        except ConfigError as e:
            raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
        g = self.params(req, n)
        return self.engine.job(ids, g, max_new_tokens=n, chat=chat, loop=asyncio.get_running_loop())

    def submit(self, jobs: list[Any], release: Callable[[], None]) -> Callable[[], None]:
        """Submit jobs; returns the cleanup that cancels unfinished ones and frees their slots."""
        try:
            for job in jobs:
                self.engine.submit(job)
        except Exception as e:
            for job in jobs:
                job.cancel()
            release()
            if isinstance(e, ConfigError):
                raise APIError(400, str(e)) from None
            raise

        def close() -> None:
            for job in jobs:
                if not job.done:
                    job.cancel()
                    self.stats["cancelled"] += 1
                elif job.finish_reason == "error":
                    self.stats["errors"] += 1
                else:
                    self.stats["completed"] += 1
            release()

        return close


async def wait_all(jobs: list[Any], request: Request) -> bool:
    """Run jobs to the end; False if the client disconnected first (the jobs are then cancelled)."""

    async def drain(job: Any) -> None:
        async for _ in job:
            pass

    task = asyncio.gather(*(drain(j) for j in jobs))
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            task.result()
            return True
        if await request.is_disconnected():
            for j in jobs:
                j.cancel()
            await task
            return False


async def merged(jobs: list[Any]) -> AsyncIterator[tuple[int, str]]:
    """Pieces of several jobs as they come, tagged with the job's index."""
    if len(jobs) == 1:
        async for piece in jobs[0]:
            yield 0, piece
        return
    q: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()

    async def pump(i: int, job: Any) -> None:
        try:
            async for piece in job:
                await q.put((i, piece))
        finally:
            await q.put((i, None))

    tasks = [asyncio.create_task(pump(i, j)) for i, j in enumerate(jobs)]
    try:
        left = len(jobs)
        while left:
            i, piece = await q.get()
            if piece is None:
                left -= 1
            else:
                yield i, piece
    finally:
        for t in tasks:
            t.cancel()


def finish_of(job: Any) -> str:
    return "length" if job.finish_reason == "length" else "stop"


def create_app(server: Server, *, max_request_bytes: int = 1 << 20) -> FastAPI:
    app = FastAPI(
        title="zhtune OpenAI-compatible API",
        version="1",
        docs_url=None,  # the interactive docs load assets from a CDN; the schema is at /openapi.json
        redoc_url=None,
    )
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        msg = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        return JSONResponse(APIError(400, msg, param=".".join(loc) or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        err = APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> JSONResponse:
        log.error("internal error on %s: %s", request.url.path, type(e).__name__)
        err = APIError(500, f"internal error ({type(e).__name__})", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("zhtune.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(
            html, headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff"}
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        s = server
        return {
            "status": "ok",
            "model": s.model_name,
            "backend": s.engine.backend.name,
            "in_flight": s.in_flight,
            "max_in_flight": s.limit,
            "context_length": s.engine.context_length,
            "uptime_s": round(time.time() - s.started, 1),
            **s.stats,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        server.check_key(request)
        return {"object": "list", "data": [model_card(server)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict[str, Any]:
        server.check_key(request)
        server.check_model(name)
        return model_card(server)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Any:
        server.check_key(request)
        server.check_model(req.model)
        msgs = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages
        ]
        try:
            validate(msgs, for_training=False)
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        if msgs[-1]["role"] != "user":
            raise APIError(400, "messages: the last message must be from the user", param="messages")
        try:
            ids = server.engine.prompt_ids(msgs)
        except ConfigError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        job = server.new_job(ids, req, req.max_completion_tokens or req.max_tokens, chat=True)
        close = server.submit([job], server.admit())
        rid, created = new_id("chatcmpl"), int(time.time())
        if not req.stream:
            try:
                if not await wait_all([job], request):
                    return JSONResponse({}, status_code=499)
            finally:
                close()
            if job.finish_reason == "error":
                raise APIError(500, f"generation failed: {job.error}", type="server_error")
            r = job.reply()
            return chat_response(rid, req.model, r.text, finish_of(job), r.prompt_tokens, r.completion_tokens)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            yield sse(chat_chunk(rid, req.model, created, {"role": "assistant", "content": ""}))
            async for piece in job:
                yield sse(chat_chunk(rid, req.model, created, {"content": piece}))
            if job.finish_reason == "error":
                yield sse(APIError(500, f"generation failed: {job.error}", type="server_error").body())
            else:
                yield sse(chat_chunk(rid, req.model, created, {}, finish_of(job)))
            if include_usage:
                r = job.reply()
                end = chat_chunk(rid, req.model, created, {})
                end["choices"], end["usage"] = [], usage(r.prompt_tokens, r.completion_tokens)
                yield sse(end)
            yield "data: [DONE]\n\n"

        return JobStream(events(), close)

    @app.post("/v1/completions")
    async def complete(req: CompletionRequest, request: Request) -> Any:
        server.check_key(request)
        server.check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        prompts = req.prompts()
        vocab = server.engine.model.get_input_embeddings().num_embeddings
        for p in prompts:
            if isinstance(p, list) and not all(0 <= t < vocab for t in p):
                raise APIError(400, f"prompt: token ids must lie in [0, {vocab})", param="prompt")
        ids_list = [p if isinstance(p, list) else server.engine.text_ids(p) for p in prompts]
        if not all(ids_list):
            raise APIError(400, "prompt: an empty prompt (no tokens) has nothing to continue", param="prompt")
        texts = [p if isinstance(p, str) else server.engine.tok.decode(p) for p in prompts]
        jobs = [server.new_job(ids, req, req.max_tokens, chat=False) for ids in ids_list]
        close = server.submit(jobs, server.admit(len(jobs)))
        rid, created = new_id("cmpl"), int(time.time())
        if not req.stream:
            try:
                if not await wait_all(jobs, request):
                    return JSONResponse({}, status_code=499)
            finally:
                close()
            failed = [j for j in jobs if j.finish_reason == "error"]
            if failed:
                raise APIError(500, f"generation failed: {failed[0].error}", type="server_error")
            choices = [
                completion_choice(i, (texts[i] if req.echo else "") + j.text(), finish_of(j))
                for i, j in enumerate(jobs)
            ]
            body = completion_body(rid, req.model, created, choices)
            body["usage"] = usage(
                sum(len(x) for x in ids_list), sum(j.reply().completion_tokens for j in jobs)
            )
            return body
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            if req.echo:
                for i, t in enumerate(texts):
                    yield sse(completion_body(rid, req.model, created, [completion_choice(i, t, None)]))
            async for i, piece in merged(jobs):
                yield sse(completion_body(rid, req.model, created, [completion_choice(i, piece, None)]))
            for i, j in enumerate(jobs):
                if j.finish_reason == "error":
                    yield sse(APIError(500, f"generation failed: {j.error}", type="server_error").body())
                else:
                    yield sse(
                        completion_body(rid, req.model, created, [completion_choice(i, "", finish_of(j))])
                    )
            if include_usage:
                end = completion_body(rid, req.model, created, [])
                end["usage"] = usage(
                    sum(len(x) for x in ids_list), sum(j.reply().completion_tokens for j in jobs)
                )
                yield sse(end)
            yield "data: [DONE]\n\n"

        return JobStream(events(), close)

    return app


def model_card(server: Server) -> dict[str, Any]:
    return {
        "id": server.model_name,
        "object": "model",
        "created": int(server.started),
        "owned_by": "zhtune",
        "max_model_len": server.engine.context_length,
    }
