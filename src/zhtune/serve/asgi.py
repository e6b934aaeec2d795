"""Two small ASGI pieces: an SSE response that notices a client leaving, and a request-body size limit."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio

from zhtune.deps import require

require("fastapi", "zhtune serve")  # the serve extra; a clear message instead of a bare ImportError

from fastapi.responses import JSONResponse
from starlette.responses import StreamingResponse

from zhtune.serve.protocol import APIError


class JobStream(StreamingResponse):
    """An SSE response that stops when the client goes away and always runs ``on_close`` afterwards."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away while we wrote
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self.on_close()


class BodyLimit:
    """ASGI middleware: request bodies larger than ``limit`` bytes get 413 before anything parses them."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = APIError(413, f"request body is larger than {self.limit} bytes", code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await JSONResponse(too_big.body(), status_code=413)(scope, receive, send)
        seen = 0
        started = False

        async def limited_receive() -> Any:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return msg

        async def tracking_send(msg: Any) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await JSONResponse(too_big.body(), status_code=413)(scope, receive, send)


class _TooLarge(Exception):
    pass
