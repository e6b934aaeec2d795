"""The process that watches one attempt of a run: ``python -m zhtune.studio.supervise RUN_DIR N -- ARGV...``.

The studio starts it in a new session (its own process group), so the run survives the page and the studio
closing. It appends a marker line to ``run.log``, runs ARGV (an argument list, never a shell string) with
stdout and stderr going to that log, waits, and writes ``exit-N.json`` with the exit status. A SIGTERM (the
studio's Stop, sent to the whole group) is passed on to the command; if the command has not ended 30 s
later it is killed, so a stop always ends with a recorded exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

LOG = "run.log"
GRACE_S = 30.0


def exit_file(run_dir: Path, attempt: int) -> Path:
    return run_dir / f"exit-{attempt}.json"


def marker(attempt: int, argv: list[str]) -> str:
    return f"[studio] attempt {attempt} started {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(argv)}\n"


def run(run_dir: Path, attempt: int, argv: list[str], cwd: Path) -> int:
    from zhtune.atomic import write_json

    stopping: dict[str, float] = {}
    held: dict[str, subprocess.Popen] = {}

    def on_term(signum: int, frame: object) -> None:
        stopping.setdefault("at", time.time())
        proc = held.get("proc")
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)  # before the command starts: a stop is never lost
    signal.signal(signal.SIGINT, on_term)
    with open(run_dir / LOG, "ab", buffering=0) as log:
        log.write(marker(attempt, argv).encode("utf-8"))
        started = time.time()
        try:
            if stopping:
                raise OSError("stopped before it started")
            proc = held["proc"] = subprocess.Popen(
                argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        except OSError as e:
            log.write(f"[studio] the command did not start: {e}\n".encode())
            record = {"rc": 127, "stopped": bool(stopping), "started": started, "ended": time.time()}
            write_json(exit_file(run_dir, attempt), record)
            return 127
        rc = None
        while rc is None:
            try:
                rc = proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                if "at" in stopping and time.time() - stopping["at"] > GRACE_S:
                    proc.kill()
        ended = time.time()
        note = "stopped" if stopping else ("finished" if rc == 0 else f"failed with exit status {rc}")
        log.write(f"\n[studio] attempt {attempt} {note} after {ended - started:.0f} s\n".encode())
    record = {"rc": rc, "stopped": bool(stopping), "started": started, "ended": ended}
    write_json(exit_file(run_dir, attempt), record)
    return 0


def main(args: list[str]) -> int:
    if len(args) < 4 or args[2] != "--":
        print("usage: python -m zhtune.studio.supervise RUN_DIR ATTEMPT -- ARGV...", file=sys.stderr)
        return 2
    run_dir = Path(args[0]).resolve()
    return run(run_dir, int(args[1]), args[3:], cwd=Path(os.getcwd()))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
