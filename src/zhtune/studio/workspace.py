"""The workspace folder: every path the page names is resolved here and refused if it leads outside.

A path is taken relative to the workspace (or absolute), resolved with every symbolic link followed, and
must land inside the workspace's own resolved path; ``..`` and links that point elsewhere are refused with a
message naming the field. Run names and uploaded file names are checked against fixed patterns, so they can
be used as path components and command arguments as they are.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from zhtune.errors import ConfigError

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FILE_NAME = re.compile(r"^[\w\u4e00-\u9fff][\w\u4e00-\u9fff .()-]{0,127}$")
DATA_SUFFIXES = (".json", ".jsonl", ".txt")
UPLOAD_SUFFIXES = (*DATA_SUFFIXES, ".yaml", ".yml", ".csv")
RUNS = "runs"
MODEL_FILES = ("config.json", "tokenizer_config.json", "adapter_config.json")
SKIP_DIRS = {"__pycache__", "node_modules"}
MAX_LISTED = 2000


class Workspace:
    """The folder the studio reads and writes; nothing outside it is touched."""

    def __init__(self, root: str | Path):
        root = Path(root).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self.runs = self.root / RUNS
        self.runs.mkdir(exist_ok=True)
        self.private = self.root / ".studio"  # chat keys, never served
        self.private.mkdir(exist_ok=True)
        os.chmod(self.private, 0o700)

    def path(self, value: str, field: str = "path") -> Path:
        """The resolved path of ``value`` (relative to the workspace, or absolute), if it stays inside."""
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{field}: empty path")
        if "\x00" in value or len(value) > 1024:
            raise ConfigError(f"{field}: not a usable path")
        given = Path(value).expanduser() if value.startswith("~") else Path(value)
        full = given if given.is_absolute() else self.root / given
        resolved = full.resolve()
        if resolved == self.root or self.root in resolved.parents:
            return resolved
        lexical = Path(os.path.normpath(full))
        if lexical == self.root or self.root in lexical.parents:
            raise ConfigError(
                f"{field}: {value!r} leads outside the workspace through a symbolic link; refused"
            )
        raise ConfigError(f"{field}: {value!r} is outside the workspace {self.root}; refused")

    def rel(self, p: Path) -> str:
        """A resolved path inside the workspace as the page shows it (relative, with /)."""
        return p.relative_to(self.root).as_posix() or "."

    def existing(self, value: str, field: str = "path", kind: str = "any") -> Path:
        p = self.path(value, field)
        ok = {"file": p.is_file(), "dir": p.is_dir()}.get(kind, p.exists())
        if not ok:
            what = {"file": "a file", "dir": "a folder"}.get(kind, "there")
            raise ConfigError(f"{field}: {value!r} is not {what} in the workspace")
        return p

    def run_dir(self, name: str) -> Path:
        return self.runs / check_run_name(name)

    def walk(self, top: Path | None = None) -> Iterator[Path]:
        """Files and folders under ``top``, hidden ones, checkpoints and links that leave skipped."""
        top = top or self.root
        count = 0
        for dirpath, dirnames, filenames in os.walk(top):
            here = Path(dirpath)
            keep = []
            for d in sorted(dirnames):
                if (
                    d.startswith(".")
                    or d in SKIP_DIRS
                    or d.startswith("checkpoint-")
                    or d == "runs"
                    and here != top
                ):
                    continue
                if self._inside(here / d):
                    keep.append(d)
            dirnames[:] = keep
            for name in [*keep, *sorted(filenames)]:
                p = here / name
                if name.startswith(".") or not self._inside(p):
                    continue
                count += 1
                if count > MAX_LISTED:
                    return
                yield p

    def _inside(self, p: Path) -> bool:
        try:
            r = p.resolve()
        except OSError:
            return False
        return r == self.root or self.root in r.parents

    def data_files(self) -> list[str]:
        """Instruction or text data outside runs/ (uploads, copies), as relative paths."""
        out = []
        for p in self.walk():
            if p.is_file() and p.suffix in DATA_SUFFIXES and RUNS not in p.relative_to(self.root).parts[:1]:
                if not any((p.parent / m).is_file() for m in MODEL_FILES):  # not a model's or tokenizer's own
                    out.append(self.rel(p))
        return out

    def models(self) -> dict[str, list[str]]:
        """Model folders (config.json), GGUF files and LoRA adapters anywhere in the workspace."""
        found: dict[str, list[str]] = {"models": [], "gguf": [], "adapters": []}
        for p in self.walk():
            if p.is_dir() and (p / "config.json").is_file():
                found["models"].append(self.rel(p))
            elif p.is_dir() and (p / "adapter_config.json").is_file():
                found["adapters"].append(self.rel(p))
            elif p.is_file() and p.suffix == ".gguf":
                found["gguf"].append(self.rel(p))
        return found


def check_run_name(name: str) -> str:
    if not isinstance(name, str) or not RUN_NAME.match(name) or ".." in name:
        raise ConfigError(
            f"run name {name!r}: use 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit"
        )
    return name


def check_file_name(name: str) -> str:
    if not isinstance(name, str) or not FILE_NAME.match(name) or ".." in name or name.strip() != name:
        raise ConfigError(
            f"file name {name!r}: use letters, digits, spaces, '-', '_', '.', '(' or ')' (no folders)"
        )
    if Path(name).suffix.lower() not in UPLOAD_SUFFIXES:
        raise ConfigError(f"file name {name!r}: only {', '.join(UPLOAD_SUFFIXES)} files can be uploaded")
    return name
