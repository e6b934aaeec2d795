"""Who may use the studio: the access token, the page-only header, the Host check and security headers.

* With a token (required for any address but loopback), every ``/api/`` request must carry it, in the
  HttpOnly SameSite=Strict cookie the page gets from ``POST /api/login`` or as ``Authorization: Bearer``.
  The token is compared in constant time and never logged.
* Every request that changes something must carry ``X-Zhtune-Studio: 1``, which another site's page cannot
  send without a CORS preflight the studio never answers: no cross-site request starts a run.
* Without a token (loopback), the Host header must name the loopback address, so a DNS-rebinding page gets
  nothing either.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SAFE_METHODS = (b"GET", b"HEAD")
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
PUBLIC = ("/", "/static/", "/api/login", "/favicon.ico")

Send = Callable[[dict[str, Any]], Awaitable[None]]


def cookie_name(port: int) -> str:
    return f"zhtune_studio_{port}"


def host_of(value: str) -> str:
    if value.startswith("["):
        return value.split("]", 1)[0] + "]"
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def token_from(headers: dict[bytes, bytes], cookie: str) -> str:
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    for part in headers.get(b"cookie", b"").decode("latin-1").split(";"):
        k, _, v = part.strip().partition("=")
        if k == cookie:
            return v
    return ""


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class Guard:
    """Pure ASGI middleware (streams pass through untouched)."""

    def __init__(self, app: Any, *, token: str | None, port: int, check_host: bool):
        self.app, self.token, self.cookie, self.check_host = app, token, cookie_name(port), check_host

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        refusal = self.refuse(scope, headers)
        if refusal is not None:
            return await reply(send, *refusal)

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                extra = [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                    (b"content-security-policy", PAGE_CSP.encode()),
                ]
                if scope["path"].startswith("/api/"):
                    extra.append((b"cache-control", b"no-store"))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def refuse(self, scope: dict[str, Any], headers: dict[bytes, bytes]) -> tuple[int, str] | None:
        path, method = scope["path"], scope["method"].encode()
        if self.check_host:
            host = host_of(headers.get(b"host", b"").decode("latin-1"))
            if host not in LOOPBACK_HOSTS:
                return 403, f"unexpected Host {host!r}: open the studio at http://127.0.0.1"
        if method not in SAFE_METHODS and headers.get(b"x-zhtune-studio") != b"1":
            return (
                403,
                "requests that change something must come from the studio page (X-Zhtune-Studio header)",
            )
        public = path == "/" or any(path.startswith(p) for p in PUBLIC[1:])
        if self.token and not public and not same(token_from(headers, self.cookie), self.token):
            return 401, "this studio needs its access token: open the address it printed (…/#token=...)"
        return None


async def reply(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}, ensure_ascii=False).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
