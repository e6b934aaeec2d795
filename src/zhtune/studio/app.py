"""The studio's FastAPI application: the page, forms, recipes, workspace files, uploads and the data preview.

Run routes (start, stop, resume, live events, chat, compare) are in :mod:`zhtune.studio.routes`. Every
value the page sends is checked here: paths through :class:`~zhtune.studio.workspace.Workspace`, options
through the command's own config sections; problems come back as ``{"error": "..."}`` with status 400.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from zhtune.deps import require

require("fastapi", "zhtune studio")

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from zhtune.atomic import tmp_sibling
from zhtune.errors import ConfigError, DataError
from zhtune.studio import forms, library
from zhtune.studio.context import Studio, body_of, checked_options, error_response, model_path
from zhtune.studio.guard import Guard, cookie_name, same
from zhtune.studio.routes import add_run_routes
from zhtune.studio.workspace import check_file_name

STATIC = {"studio.js": "text/javascript", "runs.js": "text/javascript", "studio.css": "text/css"}


def static_text(name: str) -> str:
    return resources.files("zhtune.studio").joinpath("static", name).read_text(encoding="utf-8")


def create_app(studio: Studio, *, check_host: bool = True) -> Any:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        studio.chats.close()  # here, not after uvicorn.run: uvicorn re-raises SIGTERM once it has shut down

    app = FastAPI(title="zhtune studio", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.studio = studio

    @app.exception_handler(ConfigError)
    async def config_error(request: Request, e: ConfigError) -> JSONResponse:
        return error_response(400, str(e))

    @app.exception_handler(DataError)
    async def data_error(request: Request, e: DataError) -> JSONResponse:
        return error_response(400, str(e))

    add_page_routes(app, studio)
    add_form_routes(app, studio)
    add_file_routes(app, studio)
    add_run_routes(app, studio)
    return Guard(app, token=studio.token, port=studio.port, check_host=check_host and studio.token is None)


def add_page_routes(app: FastAPI, studio: Studio) -> None:
    @app.get("/")
    def page() -> HTMLResponse:
        return HTMLResponse(static_text("index.html"))

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC:
            return error_response(404, "no such file")
        return Response(static_text(name), media_type=STATIC[name])

    @app.post("/api/login")
    async def login(request: Request) -> JSONResponse:
        token = str((await body_of(request)).get("token") or "")
        if studio.token is None:
            return JSONResponse({"ok": True, "token_required": False})
        if not same(token, studio.token):
            return error_response(401, "wrong access token")
        resp = JSONResponse({"ok": True, "token_required": True})
        resp.set_cookie(cookie_name(studio.port), token, httponly=True, samesite="strict", path="/")
        return resp

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {
            "workspace": str(studio.ws.root),
            "commands": [{"name": c, "runnable": forms.runnable(c)} for c in forms.form_commands()],
            "max_upload": studio.max_upload,
            "token_required": studio.token is not None,
        }


def add_form_routes(app: FastAPI, studio: Studio) -> None:
    @app.get("/api/form")
    def form(command: str) -> dict[str, Any]:
        if command not in forms.form_commands():
            raise ConfigError(f"no form for {command!r}")
        return forms.schema(command)

    @app.get("/api/recipes")
    def recipes() -> dict[str, Any]:
        if "shipped" not in studio.cache:
            try:
                studio.cache["shipped"] = library.shipped(studio.ws.root)
            except (ConfigError, OSError) as e:
                studio.cache["shipped"] = [{"name": "", "command": "", "description": f"unavailable: {e}"}]
        return {"shipped": studio.cache["shipped"], "saved": library.saved(studio.ws)}

    @app.post("/api/recipes/load")
    async def load(request: Request) -> dict[str, Any]:
        body = await body_of(request)
        name = str(body.get("name") or "")
        if body.get("source") == "saved":
            command, raw = library.load_saved(studio.ws, name)
        else:
            command, raw = library.load_shipped(name, studio.ws.root)
        if not isinstance(raw, dict):
            raise ConfigError(f"recipe {name}: a recipe is a mapping of option: value")
        return {"command": command, "values": forms.recipe_values(command, raw)}

    @app.post("/api/recipes/save")
    async def save(request: Request) -> dict[str, Any]:
        body = await body_of(request)
        command, given = checked_options(studio, body, name=None)
        return {"saved": library.save(studio.ws, str(body.get("name") or ""), command, forms.to_yaml(given))}

    @app.post("/api/command")
    async def command_line(request: Request) -> dict[str, Any]:
        body = await body_of(request)
        command, given = checked_options(studio, body, name=body.get("name") or None)
        return {"command_line": forms.command_line(command, given), "yaml": forms.to_yaml(given)}


def add_file_routes(app: FastAPI, studio: Studio) -> None:
    @app.get("/api/files")
    def files() -> dict[str, Any]:
        return {"data": studio.ws.data_files(), **studio.ws.models()}

    @app.put("/api/upload")
    async def upload(request: Request, name: str, folder: str = "data") -> JSONResponse:
        check_file_name(name)
        where = studio.ws.path(folder, "folder")
        if where.exists() and not where.is_dir():
            raise ConfigError(f"folder {folder!r} is a file")
        dest = studio.ws.path(f"{studio.ws.rel(where)}/{name}", "file")
        if dest.exists():
            return error_response(409, f"{studio.ws.rel(dest)} already exists; rename the file first")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > studio.max_upload:
            return error_response(413, too_big(studio.max_upload))
        where.mkdir(parents=True, exist_ok=True)
        tmp, total = tmp_sibling(dest), 0
        try:
            with open(tmp, "wb") as f:
                async for chunk in request.stream():
                    total += len(chunk)
                    if total > studio.max_upload:
                        raise OverflowError
                    f.write(chunk)
            os.replace(tmp, dest)
        except OverflowError:
            return error_response(413, too_big(studio.max_upload))
        finally:
            tmp.unlink(missing_ok=True)
        return JSONResponse({"path": studio.ws.rel(dest), "bytes": total})

    @app.post("/api/preview")
    async def preview(request: Request) -> dict[str, Any]:
        from starlette.concurrency import run_in_threadpool

        from zhtune.studio.preview import preview as make_preview

        body = await body_of(request)
        files = body.get("files") or []
        if not isinstance(files, list) or len(files) > 50:
            raise ConfigError("files: a list of at most 50 data files")
        paths = [studio.ws.existing(str(f), "files", kind="file") for f in files]
        model = model_path(studio, str(body.get("model") or "default"), "model")
        tok = body.get("tokenizer") or None
        tok = model_path(studio, str(tok), "tokenizer") if tok else None
        try:
            max_len = int(body.get("max_seq_length") or 512)
        except ValueError:
            raise ConfigError("max_seq_length: an integer") from None
        return await run_in_threadpool(
            make_preview,
            paths,
            model,
            tokenizer=tok,
            template=body.get("template") or None,
            max_seq_length=max_len,
        )


def too_big(limit: int) -> str:
    return (
        f"the file is larger than the upload limit of {limit / 2**20:.0f} MiB (zhtune studio --max_upload_mb)"
    )
