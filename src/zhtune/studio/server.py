"""``zhtune studio``: the web page that prepares data, starts and watches runs, compares results and chats.

    zhtune studio --workspace work/          # http://127.0.0.1:7860/
    zhtune studio --workspace work/ --host 0.0.0.0 --token_file token.txt

It binds 127.0.0.1 unless told otherwise; on any other address it requires an access token (from
--token_file, or generated and printed once as part of the address to open). Nothing outside the
workspace is read or written on the page's behalf.
"""

from __future__ import annotations

import logging
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.config.parse import Config, build, field, parse_cli
from zhtune.errors import ConfigError

log = logging.getLogger("zhtune.studio")
DESCRIPTION = "A web page to prepare data, start and watch runs, compare results and chat."


@dataclass
class StudioArgs:
    """where the studio works and listens"""

    workspace: str = field(
        ".", "Folder the studio works in: data, models, recipes and runs/; nothing outside it is used."
    )
    host: str = field("127.0.0.1", "Address to listen on; any address but loopback needs an access token.")
    port: int = field(7860, "Port to listen on.")
    token_file: str | None = field(
        None,
        "Read the access token from this file (default on a non-loopback --host: a new token, printed once).",
    )
    max_upload_mb: int = field(512, "Largest file the page may upload, in MiB.")
    log_level: str = field("warning", "Server log level: debug, info, warning, error.")

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535, got {self.port}")
        if self.max_upload_mb <= 0:
            raise ConfigError(f"--max_upload_mb must be positive, got {self.max_upload_mb}")

    def token(self) -> str | None:
        if self.token_file:
            p = Path(self.token_file)
            if not p.is_file():
                raise ConfigError(f"--token_file {p} does not exist")
            token = p.read_text(encoding="utf-8").strip()
            if len(token) < 16:
                raise ConfigError(f"--token_file {p}: the token must have at least 16 characters")
            return token
        return None


SECTIONS = {"studio": StudioArgs}


def make_studio(a: StudioArgs, token: str | None) -> Any:
    from zhtune.studio.chat import ChatServers
    from zhtune.studio.context import Studio
    from zhtune.studio.runs import RunManager
    from zhtune.studio.workspace import Workspace

    ws = Workspace(a.workspace)
    return Studio(
        ws=ws,
        runs=RunManager(ws),
        chats=ChatServers(ws),
        token=token,
        port=a.port,
        max_upload=a.max_upload_mb << 20,
    )


def access_token(a: StudioArgs) -> tuple[str | None, bool]:
    """(token, generated): from --token_file; else a new one on a non-loopback address; else none."""
    from zhtune.serve.server import is_loopback

    token = a.token()
    if token is None and not is_loopback(a.host):
        return secrets.token_urlsafe(24), True
    return token, False


def main(cfg: Config | dict[str, Any]) -> int:
    from zhtune.deps import require

    require("fastapi", "zhtune studio")
    uvicorn = require("uvicorn", "zhtune studio")
    from zhtune.studio.app import create_app

    if not isinstance(cfg, Config):
        cfg = build(SECTIONS, cfg)
    a: StudioArgs = cfg.studio
    token, generated = access_token(a)
    studio = make_studio(a, token)
    app = create_app(studio)
    shown = "127.0.0.1" if a.host in ("0.0.0.0", "::") else a.host
    url = f"http://{shown}:{a.port}/"
    if generated:  # printed once, in the address's fragment (which browsers never send to a server)
        print(f"zhtune studio: open {url}#token={token}", flush=True)
    else:
        print(f"zhtune studio: open {url} (workspace {studio.ws.root})", flush=True)
    try:
        uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, server_header=False)
    finally:
        studio.chats.close()
    return 0


def cli(argv: list[str] | None = None) -> int:
    cfg = parse_cli(argv, SECTIONS, prog="zhtune studio", description=DESCRIPTION)
    return main(cfg)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(cli(sys.argv[1:]))
