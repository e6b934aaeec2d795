"""Chat on a run's output: ``zhtune serve`` started for it on a free localhost port, reached through the studio.

Each chat server is the real ``zhtune serve`` command (an argument list, no shell) bound to 127.0.0.1 with a
generated API key passed as a file under the workspace's private ``.studio/`` folder (mode 600); the key
never reaches the page, the command line or a log. The page sends its chat requests to the studio, which
forwards them with the key and streams the reply back, so the chat works wherever the studio page does.
Chat servers end with the studio.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from zhtune.errors import ConfigError
from zhtune.studio.runs import child_env
from zhtune.studio.workspace import Workspace

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Upstream:
    """A chat server's reply, read piece by piece; closing it (the page went away) hangs up on the server,
    which then cancels the generation."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse):
        self.conn, self.resp = conn, resp
        self.status = resp.status
        self.content_type = resp.getheader("content-type", "application/json")

    def read(self) -> bytes:
        try:
            return self.resp.read1(65536)
        except (OSError, ValueError, AttributeError):  # closed from the other side of the relay
            return b""

    def close(self) -> None:
        self.conn.close()


class ChatServer:
    def __init__(self, name: str, proc: subprocess.Popen, port: int, key: str, log: Path):
        self.name, self.proc, self.port, self.key, self.log = name, proc, port, key, log
        self.started = time.time()
        self.ready = False

    def state(self) -> dict[str, Any]:
        if self.proc.poll() is not None:
            tail = self.log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
            return {"state": "failed", "error": " / ".join(tail) or f"exit status {self.proc.returncode}"}
        if not self.ready:
            self.ready = self.health()
        return {"state": "ready" if self.ready else "loading", "seconds": round(time.time() - self.started)}

    def health(self) -> bool:
        try:
            conn = http.client.HTTPConnection(HOST, self.port, timeout=2)
            conn.request("GET", "/health")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def open(self, body: dict[str, Any]) -> Upstream:
        """POST /v1/chat/completions with the key; the reply is read from the returned :class:`Upstream`."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=600)
        try:
            payload = json.dumps(body).encode("utf-8")
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"}
            conn.request("POST", "/v1/chat/completions", body=payload, headers=headers)
            return Upstream(conn, conn.getresponse())
        except OSError as e:
            conn.close()
            raise ConfigError(f"the chat server of run {self.name} did not answer ({e})") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class ChatServers:
    def __init__(self, ws: Workspace, python: str = sys.executable):
        self.ws, self.python = ws, python
        self.servers: dict[str, ChatServer] = {}

    def start(self, name: str, model: str, adapters: list[str]) -> dict[str, Any]:
        """Start (or keep) the chat server of run ``name``; ``model``/``adapters`` are checked paths."""
        old = self.servers.get(name)
        if old is not None and old.proc.poll() is None:
            return old.state()
        key = secrets.token_urlsafe(24)
        key_file = self.ws.private / f"chat-{name}.key"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key)
        port = free_port()
        argv = [self.python, "-m", "zhtune", "serve", "--model_name_or_path", model]
        if adapters:
            argv += ["--lora_models", ",".join(adapters)]
        argv += ["--host", HOST, "--port", str(port), "--api_key_file", str(key_file)]
        argv += ["--served_model_name", name]
        log = self.ws.run_dir(name) / "chat.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv,
                cwd=self.ws.root,
                env=child_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        self.servers[name] = ChatServer(name, proc, port, key, log)
        return self.servers[name].state()

    def get(self, name: str) -> ChatServer:
        server = self.servers.get(name)
        if server is None:
            raise ConfigError(f"no chat is open on run {name!r}; open one first")
        return server

    def stop(self, name: str) -> None:
        server = self.servers.pop(name, None)
        if server is not None:
            server.close()
        (self.ws.private / f"chat-{name}.key").unlink(missing_ok=True)

    def close(self) -> None:
        for name in list(self.servers):
            self.stop(name)
