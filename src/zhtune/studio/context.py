"""What the studio's routes share: the :class:`Studio` state, request parsing and the checks every form goes
through before anything runs (options built by the command's own sections, every path inside the workspace,
the command's output folder set to the run's own ``out/``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zhtune.deps import require

require("fastapi", "zhtune studio")  # the serve extra; a clear message instead of a bare ImportError

from fastapi import Request
from fastapi.responses import JSONResponse

from zhtune.errors import ConfigError
from zhtune.studio import forms
from zhtune.studio.chat import ChatServers
from zhtune.studio.compare import trained_model
from zhtune.studio.paths import check_options
from zhtune.studio.runs import OUT, RunManager
from zhtune.studio.workspace import Workspace, check_run_name


@dataclass
class Studio:
    """What the routes share."""

    ws: Workspace
    runs: RunManager
    chats: ChatServers
    token: str | None = None
    port: int = 7860
    max_upload: int = 512 << 20
    cache: dict[str, Any] = field(default_factory=dict)


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def body_of(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise ConfigError("the request body must be JSON") from None
    if not isinstance(body, dict):
        raise ConfigError("the request body must be a JSON object")
    return body


def checked_options(studio: Studio, body: dict[str, Any], name: str | None) -> tuple[str, dict[str, Any]]:
    """The given options of a form, built and checked like the CLI would, every path inside the workspace;
    with a run ``name``, the command's output folder is the run's ``out/``."""
    command = str(body.get("command") or "")
    if command not in forms.form_commands():
        raise ConfigError(f"unknown command {command!r}")
    values = body.get("values") or {}
    if not isinstance(values, dict):
        raise ConfigError("values must be a mapping of section: {option: value}")
    run_root = None
    if name is not None:
        values, run_root = force_output(studio, command, values, name)
    given = forms.given_values(command, values)
    check_options(studio.ws, given, run_root=run_root)  # before building: a check may look at the files
    forms.build_given(command, given)
    return command, given


def force_output(studio: Studio, command: str, values: dict, name: str) -> tuple[dict, Path]:
    """The form's values with every output folder (``output_dir``, a pipeline's ``run_dir``, those of its
    variants) set to ``runs/<name>/out``, so a run writes into its own folder."""
    out = f"runs/{check_run_name(name)}/{OUT}"
    secs, _ = forms.sections(command)
    values = {s: dict(v) for s, v in values.items() if isinstance(v, dict)}
    for sname, cls in secs.items():
        names = {f.name for f in dataclasses.fields(cls)}
        for key in ("output_dir", "run_dir"):
            if key in names:
                values.setdefault(sname, {})[key] = out
        variants = values.get(sname, {}).get("variants")
        if "variants" in names and variants:
            parsed = yaml.safe_load(variants) if isinstance(variants, str) else variants
            if isinstance(parsed, dict):
                for v in parsed.values():
                    if isinstance(v, dict) and "run_dir" in v:
                        v["run_dir"] = out
                values[sname]["variants"] = parsed
    return values, studio.ws.path(out)


def start(studio: Studio, name: str, command: str, values: dict, parent: str | None = None) -> dict:
    check_run_name(name)
    if not forms.runnable(command):
        raise ConfigError(f"zhtune {command} does not run from the studio")
    command, given = checked_options(studio, {"command": command, "values": values}, name)
    body = f"# zhtune {command}, started from zhtune studio as run {name}\n" + forms.to_yaml(given)
    status = studio.runs.create(name, command, body, extra={"parent": parent})
    return {**status, "command_line": forms.command_line(command, given)}


def run_output(studio: Studio, name: str) -> Path:
    return studio.ws.run_dir(name) / OUT


def produced(studio: Studio, name: str) -> dict[str, Any]:
    """The run's model (and adapters) as workspace paths, each checked to be inside the workspace."""
    found = trained_model(run_output(studio, name))
    if found is None:
        raise ConfigError(f"run {name} has no model or adapter in its output yet")
    model = found["model"]
    model = model if model == "default" else studio.ws.rel(studio.ws.path(model, "model"))
    adapters = [studio.ws.rel(studio.ws.path(a, "adapter")) for a in found["adapters"]]
    return {"model": model, "adapters": adapters}


def model_path(studio: Studio, value: str, field: str) -> str:
    """'default', or a model folder / GGUF file inside the workspace (as an absolute path)."""
    if value == "default":
        return value
    return str(studio.ws.existing(value, field))
