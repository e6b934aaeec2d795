"""What the routes share: the engine, the API key, the admission bound and the counters /health reports.

At most ``max_batch_size + max_queue`` requests run or wait at once; beyond that a request gets 429 at once
(:meth:`Server.admit`). Each admitted request is counted once, when it ends, as completed, cancelled or an
error (:meth:`Server.settle`).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Sequence
from typing import Any

from zhtune.infer.engine import Engine
from zhtune.infer.stream import Job
from zhtune.serve.protocol import APIError


class Server:
    """State shared by the routes: the engine, the admission counter, counters for /health."""

    def __init__(self, engine: Engine, *, model_name: str, api_key: str | None, max_queue: int):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.limit = engine.max_batch_size + max_queue
        self.in_flight = 0
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "rejected": 0, "errors": 0}
        self.started = time.time()

    def check_key(self, authorization: str) -> None:
        """``authorization``: the request's Authorization header ('' when absent)."""
        if self.api_key is None:
            return
        given = authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
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
        """Take ``n`` slots or refuse with 429; returns the release (safe to call twice)."""
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

    def settle(self, jobs: Sequence[Job]) -> None:
        """Cancel the jobs still running (their client is gone) and count how each ended."""
        for job in jobs:
            if not job.done:
                job.cancel()
                self.stats["cancelled"] += 1
            elif job.finish_reason == "error":
                self.stats["errors"] += 1
            else:
                self.stats["completed"] += 1

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.model_name,
            "backend": self.engine.backend_name,
            "in_flight": self.in_flight,
            "max_in_flight": self.limit,
            "context_length": self.engine.context_length,
            "uptime_s": round(time.time() - self.started, 1),
            **self.stats,
        }

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": int(self.started),
            "owned_by": "zhtune",
            "max_model_len": self.engine.context_length,
        }
