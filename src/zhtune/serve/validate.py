"""What is wrong with a request, found once and told once: the checks that need the model, the jobs a valid
request becomes, and the one place where errors turn into OpenAI-shaped ``{"error": {...}}`` bodies.

Pydantic has checked the body's types and ranges (:mod:`zhtune.serve.protocol`). What is checked here needs the
model: the conversation's roles and order, token ids against the vocabulary, the prompt and ``max_tokens``
against the context, settings the running backend cannot honour. Jobs are made but not submitted
(:mod:`zhtune.serve.runner` does that).

Routes raise :class:`APIError` for what they check themselves. A :class:`ConfigError` or ``ValueError`` from
zhtune's own checks is translated by :func:`api_error`: inside :func:`about` it names the request field it
concerns, anywhere else it is a plain 400. Validation errors of the request body become 400s naming the field,
unknown routes 404s, and anything else a 500 that names only the exception type (never a prompt or a key).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from zhtune.deps import require

require("fastapi", "zhtune serve")  # the serve extra; a clear message instead of a bare ImportError

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from zhtune.config.args import GenerationArgs
from zhtune.errors import ConfigError
from zhtune.infer.engine import Engine
from zhtune.infer.stream import Job
from zhtune.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, SamplingFields
from zhtune.text import records

log = logging.getLogger("zhtune.serve")


def api_error(
    e: ValueError, param: str | None = None, code: str | None = None, prefix: bool = True
) -> APIError:
    """A 400 for a bad request found by zhtune's own checks; ``prefix`` starts the message with the field."""
    message = f"{param}: {e}" if param and prefix else str(e)
    return APIError(400, message, param=param, code=code)


@contextlib.contextmanager
def about(param: str, code: str | None = None, prefix: bool = True) -> Iterator[None]:
    """Errors raised inside concern the request field ``param``: a ConfigError or ValueError becomes its 400."""
    try:
        yield
    except ValueError as e:  # ConfigError is a ValueError, as are the record checks of text.records
        raise api_error(e, param, code, prefix) from None


def failed(error: str | None) -> APIError:
    """A generation that failed in the backend."""
    return APIError(500, f"generation failed: {error}", type="server_error")


# ---- checks that need the model, and the jobs they make ----


def chat_prompt(engine: Engine, req: ChatCompletionRequest) -> list[int]:
    """The conversation as the model's chat template lays it out; it must end with a user message."""
    msgs = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages
    ]
    with about("messages"):
        records.validate(msgs, for_training=False)
    if msgs[-1]["role"] != "user":
        raise APIError(400, "messages: the last message must be from the user", param="messages")
    with about("messages"):
        return engine.prompt_ids(msgs)


def completion_prompts(engine: Engine, req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt (a string, token ids, or a list of either)."""
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    prompts = req.prompts()
    vocab = engine.vocab_size
    for p in prompts:
        if isinstance(p, list) and not all(0 <= t < vocab for t in p):
            raise APIError(400, f"prompt: token ids must lie in [0, {vocab})", param="prompt")
    ids = [p if isinstance(p, list) else engine.text_ids(p) for p in prompts]
    if not all(ids):
        raise APIError(400, "prompt: an empty prompt (no tokens) has nothing to continue", param="prompt")
    texts = [p if isinstance(p, str) else engine.decode(p) for p in prompts]
    return ids, texts


def sampling(engine: Engine, req: SamplingFields, max_new_tokens: int) -> GenerationArgs:
    """The request's sampling settings; refused (400) where zhtune or the running backend cannot honour them."""
    req.refuse_unsupported()
    temperature = 1.0 if req.temperature is None else req.temperature
    g = GenerationArgs(  # a ConfigError here is a plain 400 (on_config_error)
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
    why = engine.unsupported(g)
    if why:
        raise APIError(400, why)
    return g


def new_job(engine: Engine, ids: list[int], req: SamplingFields, asked: int | None, chat: bool) -> Job:
    """A job for ``ids`` that fits the context; ``asked``: the request's max_tokens (None: what fits)."""
    with about("max_tokens", code="context_length_exceeded", prefix=False):
        n = engine.max_new_tokens(len(ids), asked)
    g = sampling(engine, req, n)
    return engine.job(ids, g, max_new_tokens=n, chat=chat, loop=asyncio.get_running_loop())


# ---- every error, as the client sees it ----


def reply(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def on_api_error(request: Request, e: APIError) -> JSONResponse:
    return reply(e)


async def on_config_error(request: Request, e: ConfigError) -> JSONResponse:
    return reply(api_error(e))


async def on_invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {}
    loc = [str(x) for x in first.get("loc", []) if x != "body"]
    msg = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
    return reply(APIError(400, msg, param=".".join(loc) or None))


async def on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    code = "not_found" if e.status_code == 404 else None
    return reply(APIError(e.status_code, str(e.detail), code=code))


async def on_crash(request: Request, e: Exception) -> JSONResponse:
    log.error("internal error on %s: %s", request.url.path, type(e).__name__)
    return reply(APIError(500, f"internal error ({type(e).__name__})", type="server_error"))


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into an OpenAI-shaped response."""
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(ConfigError, on_config_error)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_crash)
