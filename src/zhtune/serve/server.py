"""``zhtune serve``: an OpenAI-compatible API and a web chat page for a model (plus adapters), one process.

    zhtune serve --model_name_or_path default                  # http://127.0.0.1:8000/ for the chat page
    zhtune serve --base_model llama-7b --lora_model my-lora --api_key_file key.txt --host 0.0.0.0

Requests run through continuous batching (transformers) unless ``--backend generate`` is given.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.config.args import ModelArgs
from zhtune.config.parse import Config, build, field, parse_cli
from zhtune.errors import ConfigError
from zhtune.infer.engine import EngineArgs

log = logging.getLogger("zhtune.serve")


@dataclass
class ServeArgs:
    """where and how to serve"""

    host: str = field("127.0.0.1", "Address to listen on (0.0.0.0 for every interface: set an API key then).")
    port: int = field(8000, "Port to listen on.")
    api_key: str | None = field(
        None, "Require 'Authorization: Bearer <key>' on /v1 routes (prefer --api_key_file: argv is visible)."
    )
    api_key_file: str | None = field(None, "Read the API key from this file.")
    served_model_name: str | None = field(
        None, "Model id clients send (default: the model directory's name, or the last adapter's)."
    )
    max_queue: int = field(64, "Requests that may wait beyond the running batch; more get 429.")
    max_request_bytes: int = field(1 << 20, "Largest request body accepted (413 beyond).")
    log_level: str = field("info", "Server log level: debug, info, warning, error.")

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535, got {self.port}")
        if self.max_queue < 0:
            raise ConfigError(f"--max_queue must be >= 0, got {self.max_queue}")
        if self.api_key is not None and self.api_key_file:
            raise ConfigError("give --api_key or --api_key_file, not both")

    def key(self) -> str | None:
        if self.api_key_file:
            p = Path(self.api_key_file)
            if not p.is_file():
                raise ConfigError(f"--api_key_file {p} does not exist")
            key = p.read_text(encoding="utf-8").strip()
            if not key:
                raise ConfigError(f"--api_key_file {p} is empty")
            return key
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api_key is empty")
        return self.api_key


SECTIONS = {"model": ModelArgs, "engine": EngineArgs, "serve": ServeArgs}


def model_name(m: ModelArgs, e: EngineArgs, s: ServeArgs) -> str:
    if s.served_model_name:
        return s.served_model_name
    if e.lora_models:
        return Path(e.lora_models[-1]).name
    p = Path(m.model_name_or_path)
    return p.stem if p.suffix == ".gguf" else (p.name or m.model_name_or_path)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_app(cfg: Config | dict[str, Any]) -> tuple[Any, Any]:
    """Load the engine and make the app (without running it). Returns (app, engine)."""
    from zhtune.infer.engine import Engine
    from zhtune.serve.app import create_app
    from zhtune.serve.asgi import BodyLimit
    from zhtune.serve.state import Server

    if not isinstance(cfg, Config):
        cfg = build(SECTIONS, cfg)
    m, e, s = cfg.model, cfg.engine, cfg.serve
    key = s.key()
    engine = Engine.load(m, e)
    engine.start("continuous" if e.backend == "auto" else e.backend)
    server = Server(engine, model_name=model_name(m, e, s), api_key=key, max_queue=s.max_queue)
    app = create_app(server)
    app.add_middleware(BodyLimit, limit=s.max_request_bytes)
    return app, engine


def main(cfg: Config | dict[str, Any]) -> int:
    from zhtune.deps import require

    require("fastapi", "zhtune serve")
    uvicorn = require("uvicorn", "zhtune serve")
    if not isinstance(cfg, Config):
        cfg = build(SECTIONS, cfg)
    s = cfg.serve
    if not is_loopback(s.host) and s.key() is None:
        log.warning("listening on %s without an API key: anyone who can reach it can use the model", s.host)
    app, engine = build_app(cfg)
    log.info(
        "serving %s on http://%s:%d/ (chat page at /, API at /v1, schema at /openapi.json)",
        app.state.server.model_name,
        s.host,
        s.port,
    )
    try:
        uvicorn.run(
            app,
            host=s.host,
            port=s.port,
            log_level=s.log_level,
            timeout_graceful_shutdown=5,
            server_header=False,
        )
    finally:
        engine.close()
    return 0


def cli(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = parse_cli(
        argv,
        SECTIONS,
        prog="zhtune serve",
        description="Serve a model with an OpenAI-compatible API and a web chat page.",
    )
    return main(cfg)
