"""The FastAPI application: the OpenAI-compatible API under /v1, the web chat page at /, and /health.

Every request runs as a job of the shared engine (continuous batching by default). Each route checks the key
and the model, turns the body into jobs (:mod:`zhtune.serve.validate`) and hands them to the one runner
(:mod:`zhtune.serve.runner`) with the shape of its endpoint's replies. The number of jobs running or waiting is
bounded: beyond it a request gets 429 at once. A streaming client that disconnects cancels its job, so its slot
in the batch is freed for others. Errors are raised here, never formatted: :mod:`zhtune.serve.validate` gives
every one OpenAI's shape. Request bodies over the size limit get 413 (:mod:`zhtune.serve.asgi`). Nothing here
logs prompts, replies or keys.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from zhtune.deps import require

require("fastapi", "zhtune serve")  # the serve extra; a clear message instead of a bare ImportError

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse

from zhtune.serve.protocol import ChatCompletionRequest, ChatShape, CompletionRequest, CompletionShape
from zhtune.serve.runner import run
from zhtune.serve.state import Server
from zhtune.serve.validate import chat_prompt, completion_prompts, install, new_job

PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
router = APIRouter()


def authorized(request: Request, model: str | None = None) -> Server:
    """The server, once the request's API key (and the model it names, if any) are checked."""
    server: Server = request.app.state.server
    server.check_key(request.headers.get("authorization", ""))
    if model is not None:
        server.check_model(model)
    return server


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    html = resources.files("zhtune.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    return HTMLResponse(
        html, headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff"}
    )


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    return request.app.state.server.health()


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [authorized(request).model_card()]}


@router.get("/v1/models/{name:path}")
async def model(name: str, request: Request) -> dict[str, Any]:
    return authorized(request, name).model_card()


@router.post("/v1/chat/completions")
async def chat(req: ChatCompletionRequest, request: Request) -> Any:
    server = authorized(request, req.model)
    ids = chat_prompt(server.engine, req)
    job = new_job(server.engine, ids, req, req.max_completion_tokens or req.max_tokens, chat=True)
    return await run(server, request, [job], ChatShape(req.model), req.stream, wants_usage(req))


@router.post("/v1/completions")
async def complete(req: CompletionRequest, request: Request) -> Any:
    server = authorized(request, req.model)
    ids, texts = completion_prompts(server.engine, req)
    jobs = [new_job(server.engine, x, req, req.max_tokens, chat=False) for x in ids]
    shape = CompletionShape(req.model, echo=texts if req.echo else None)
    return await run(server, request, jobs, shape, req.stream, wants_usage(req))


def wants_usage(req: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def create_app(server: Server) -> FastAPI:
    app = FastAPI(
        title="zhtune OpenAI-compatible API",
        version="1",
        docs_url=None,  # the interactive docs load assets from a CDN; the schema is at /openapi.json
        redoc_url=None,
    )
    app.state.server = server
    install(app)  # every error in OpenAI's shape
    app.include_router(router)
    return app
