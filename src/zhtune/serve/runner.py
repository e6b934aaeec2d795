"""Running a request's jobs, for chat and text completions alike.

:func:`run` admits the jobs (429 when the server is full), submits them to the engine and answers either with
the whole reply or with server-sent events in OpenAI's chunk format (the endpoint's :data:`Shape` writes the
bodies): opening events, one event per text piece, each choice's finish_reason (or the error that ended it),
the usage when asked for, then ``[DONE]``. A client that goes away cancels its jobs, which frees their slots
in the batch; every admitted request is counted once, when it ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from zhtune.deps import require

require("fastapi", "zhtune serve")  # the serve extra; a clear message instead of a bare ImportError

from fastapi import Request
from fastapi.responses import JSONResponse

from zhtune.infer.stream import Job
from zhtune.serve.asgi import JobStream
from zhtune.serve.protocol import Shape
from zhtune.serve.state import Server
from zhtune.serve.validate import failed
from zhtune.text.records import json_line

DISCONNECT_POLL_S = 0.5  # how often a request without streaming checks that its client is still there


def sse(obj: Any) -> str:
    return f"data: {json_line(obj)}\n\n"  # SSE ends lines at CR and LF only, which JSON escapes


def finish_of(job: Job) -> str:
    return "length" if job.finish_reason == "length" else "stop"


def token_counts(jobs: Sequence[Job]) -> tuple[int, int]:
    """(prompt tokens, completion tokens) of all the jobs together."""
    return sum(len(j.prompt_ids) for j in jobs), sum(j.reply().completion_tokens for j in jobs)


def submit(server: Server, jobs: list[Job]) -> Callable[[], None]:
    """Admit and submit the jobs; returns the cleanup that cancels unfinished ones, counts them and frees
    their slots. If a submit fails, the jobs are cancelled and the slots freed before the error propagates."""
    release = server.admit(len(jobs))
    try:
        for job in jobs:
            server.engine.submit(job)
    except BaseException:
        for job in jobs:
            job.cancel()
        release()
        raise

    def close() -> None:
        server.settle(jobs)
        release()

    return close


async def run(
    server: Server, request: Request, jobs: list[Job], shape: Shape, stream: bool, usage: bool
) -> Any:
    """Run the jobs of one request; the reply as one JSON body, or (``stream``) as server-sent events.
    ``usage``: end the stream with a usage event."""
    close = submit(server, jobs)
    if stream:
        return JobStream(events(jobs, shape, usage), close)
    try:
        if not await wait_all(jobs, request):
            return JSONResponse({}, status_code=499)
    finally:
        close()
    for job in jobs:
        if job.finish_reason == "error":
            raise failed(job.error)
    return shape.body([j.text() for j in jobs], [finish_of(j) for j in jobs], *token_counts(jobs))


async def events(jobs: list[Job], shape: Shape, usage: bool) -> AsyncIterator[str]:
    for chunk in shape.opening():
        yield sse(chunk)
    async for i, piece in merged(jobs):
        yield sse(shape.delta(i, piece))
    for i, job in enumerate(jobs):
        yield sse(
            failed(job.error).body() if job.finish_reason == "error" else shape.finish(i, finish_of(job))
        )
    if usage:
        yield sse(shape.usage(*token_counts(jobs)))
    yield "data: [DONE]\n\n"


async def wait_all(jobs: list[Job], request: Request) -> bool:
    """Run jobs to the end; False if the client disconnected first (the jobs are then cancelled)."""

    async def drain(job: Job) -> None:
        async for _ in job:
            pass

    task = asyncio.gather(*(drain(j) for j in jobs))
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            task.result()
            return True
        if await request.is_disconnected():
            for j in jobs:
                j.cancel()
            await task
            return False


async def merged(jobs: list[Job]) -> AsyncIterator[tuple[int, str]]:
    """Pieces of several jobs as they come, tagged with the job's index."""
    if len(jobs) == 1:
        async for piece in jobs[0]:
            yield 0, piece
        return
    q: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()

    async def pump(i: int, job: Job) -> None:
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
