"""Recipes for the New run form: the shipped ones (through ``zhtune recipes list|copy``) and those saved here.

The shipped list comes from the ``zhtune recipes`` command itself, run as a subprocess (the studio sits on
the same layer as ``zhtune.recipes`` and does not import it), so the page lists what the command lists.
Recipes saved from the page go to ``<workspace>/recipes/NAME.yaml``, their first line naming the command.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from zhtune.atomic import atomic_write_text
from zhtune.errors import ConfigError
from zhtune.studio.runs import child_env
from zhtune.studio.workspace import Workspace, check_run_name

HEADER = re.compile(r"^# zhtune ([a-z]+(?: [a-z-]+)?)[:,]")  # "# zhtune sft: ..." names the command


def zhtune(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "zhtune", *args],
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        raise ConfigError((proc.stderr or proc.stdout).strip().splitlines()[-1])
    return proc.stdout


def shipped(cwd: Path) -> list[dict[str, str]]:
    """``zhtune recipes list`` as rows of {name, command, description}."""
    rows, table = [], False
    for line in zhtune(["recipes", "list"], cwd).splitlines():
        if line.startswith("---"):
            table = True
            continue
        if table and not line.strip():
            break
        if table:
            parts = re.split(r"\s{2,}", line.strip(), maxsplit=2)
            rows.append(
                {"name": parts[0], "command": parts[1], "description": parts[2] if len(parts) > 2 else ""}
            )
    return rows


def load_shipped(name: str, cwd: Path) -> tuple[str, dict[str, Any]]:
    """(command, the recipe's mapping) of a shipped recipe, copied out with ``zhtune recipes copy``."""
    known = {r["name"]: r for r in shipped(cwd)}
    if name not in known:
        raise ConfigError(f"no shipped recipe {name!r}; see zhtune recipes list")
    with tempfile.TemporaryDirectory() as tmp:
        zhtune(["recipes", "copy", name, tmp], cwd)
        path = next(Path(tmp).rglob("*.yaml"))
        return known[name]["command"], yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def saved(ws: Workspace) -> list[dict[str, str]]:
    folder = ws.root / "recipes"
    rows = []
    for p in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        m = HEADER.match(p.read_text(encoding="utf-8").split("\n", 1)[0])
        if m and not p.is_symlink():
            rows.append({"name": p.stem, "command": m.group(1), "description": ws.rel(p)})
    return rows


def load_saved(ws: Workspace, name: str) -> tuple[str, dict[str, Any]]:
    path = ws.existing(f"recipes/{check_run_name(name)}.yaml", "recipe", kind="file")
    text = path.read_text(encoding="utf-8")
    m = HEADER.match(text.split("\n", 1)[0])
    if not m:
        raise ConfigError(f"{ws.rel(path)}: the first line must name the command (# zhtune sft: ...)")
    return m.group(1), yaml.safe_load(text) or {}


def save(ws: Workspace, name: str, command: str, body: str) -> str:
    path = ws.path(f"recipes/{check_run_name(name)}.yaml", "recipe")
    atomic_write_text(path, f"# zhtune {command}: recipe saved from zhtune studio\n{body}")
    return ws.rel(path)
