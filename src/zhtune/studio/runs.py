"""Runs: each one a real ``zhtune`` command in its own process group, in ``<workspace>/runs/<name>/``.

A run folder holds ``recipe.yaml`` (the options given on the page), ``studio_run.json`` (the command, its
argument list and the attempts), ``run.log`` (the command's stdout and stderr), ``exit-N.json`` per finished
attempt and ``out/``, the command's own output. The command runs under :mod:`zhtune.studio.supervise` in a
new session, so it goes on when the page or the studio closes; its state is read back from those files, so a
restarted studio sees the same runs. Stop sends SIGTERM to the process group; resume starts the same command
again (training commands with ``--resume_from_checkpoint auto``, a pipeline resumes by itself).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from zhtune.atomic import atomic_write_text, write_json
from zhtune.errors import ConfigError
from zhtune.studio.supervise import LOG, exit_file
from zhtune.studio.workspace import Workspace

RECORD = "studio_run.json"
RECIPE = "recipe.yaml"
OUT = "out"
TRAINING = ("sft", "pt")


class RunManager:
    def __init__(self, ws: Workspace, python: str = sys.executable):
        self.ws = ws
        self.python = python
        self.children: dict[str, subprocess.Popen] = {}  # supervisors started here, reaped on status

    # ---- starting ----

    def create(self, name: str, command: str, recipe_yaml: str, extra: dict[str, Any] | None = None) -> dict:
        """Write the run folder and start ``zhtune <command> runs/<name>/recipe.yaml``."""
        run = self.ws.run_dir(name)
        if run.exists():
            raise ConfigError(f"a run named {name!r} already exists; choose another name")
        run.mkdir(parents=True)
        atomic_write_text(run / RECIPE, recipe_yaml)
        recipe = self.ws.rel(run / RECIPE)
        record = {
            "name": name,
            "command": command,
            "args": [*command.split(), recipe],
            "output": self.ws.rel(run / OUT),
            "created": time.time(),
            "attempts": [],
            **(extra or {}),
        }
        self._spawn(run, record, record["args"])
        return self.status(name)

    def _spawn(self, run: Path, record: dict, args: list[str]) -> None:
        attempt = len(record["attempts"]) + 1
        argv = [self.python, "-u", "-m", "zhtune", *args]
        sup = [self.python, "-m", "zhtune.studio.supervise", str(run), str(attempt), "--", *argv]
        with open(run / LOG, "ab") as log:  # the supervisor's own complaints, if any, land in the log too
            proc = subprocess.Popen(
                sup,
                cwd=self.ws.root,
                env=child_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # its own process group: Stop signals the group, the page can close
                close_fds=True,
            )
        self.children[record["name"]] = proc
        record["attempts"].append({"n": attempt, "args": args, "pid": proc.pid, "started": time.time()})
        write_json(run / RECORD, record)

    # ---- reading ----

    def record(self, name: str) -> dict:
        path = self.ws.run_dir(name) / RECORD
        if not path.is_file():
            raise ConfigError(f"no run named {name!r}")
        return json.loads(path.read_text(encoding="utf-8"))

    def names(self) -> list[str]:
        runs = [p for p in self.ws.runs.iterdir() if (p / RECORD).is_file() and not p.is_symlink()]
        return [p.name for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]

    def status(self, name: str) -> dict[str, Any]:
        """``state``: running, finished, failed, stopped or lost (no exit recorded, no process left)."""
        rec = self.record(name)
        run = self.ws.run_dir(name)
        self.reap()
        last = rec["attempts"][-1] if rec["attempts"] else None
        out = {k: rec[k] for k in ("name", "command", "args", "output", "created")}
        out["attempts"] = len(rec["attempts"])
        out["parent"] = rec.get("parent")
        out["display"] = "zhtune " + " ".join(rec["args"])
        state, rc, ended = "lost", None, None
        if last is not None:
            done = exit_file(run, last["n"])
            if done.is_file():
                ex = json.loads(done.read_text(encoding="utf-8"))
                rc, ended = ex["rc"], ex.get("ended")
                state = "finished" if rc == 0 else "stopped" if ex.get("stopped") else "failed"
            elif alive(last["pid"], run):
                state = "running"
        out.update(state=state, rc=rc, ended=ended, started=last["started"] if last else None)
        return out

    def log_path(self, name: str) -> Path:
        return self.ws.run_dir(name) / LOG

    # ---- stop and resume ----

    def stop(self, name: str) -> dict[str, Any]:
        st = self.status(name)
        if st["state"] != "running":
            raise ConfigError(f"run {name} is not running ({st['state']})")
        pid = self.record(name)["attempts"][-1]["pid"]
        try:
            os.killpg(pid, signal.SIGTERM)  # the supervisor leads its group; the command is in it
        except ProcessLookupError:
            pass
        return self.status(name)

    def resume(self, name: str) -> dict[str, Any]:
        st = self.status(name)
        if st["state"] == "running":
            raise ConfigError(f"run {name} is still running")
        if st["state"] == "finished":
            raise ConfigError(f"run {name} finished; there is nothing to resume")
        rec = self.record(name)
        args = list(rec["args"])
        if rec["command"] in TRAINING:  # the newest complete checkpoint, or the start when there is none
            args += ["--resume_from_checkpoint", "auto"]
        self._spawn(self.ws.run_dir(name), rec, args)
        return self.status(name)

    def reap(self) -> None:
        """Collect the exit of supervisors started here that ended (no zombies while the studio runs)."""
        for name, proc in list(self.children.items()):
            if proc.poll() is not None:
                del self.children[name]


def child_env() -> dict[str, str]:
    """The environment for commands the studio starts: its own, with this zhtune first on the import path
    (the command runs in the workspace, where a relative PYTHONPATH would no longer point here)."""
    import zhtune

    env = dict(os.environ)
    src = str(Path(zhtune.__file__).resolve().parent.parent)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([src, *[p for p in parts if p != src]])
    return env


def alive(pid: int, run: Path) -> bool:
    """Whether ``pid`` is still this run's supervisor (and not a later process that reuses the number)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.is_file():
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            return False
        if b"zhtune.studio.supervise" not in args or str(run).encode() not in args:
            return False
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[-1].split()[0] != "Z"  # a zombie has ended
    return True
