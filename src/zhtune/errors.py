"""Every error type zhtune raises on purpose, and the one table of exit codes the CLI maps them to.

A command that fails on bad input, a missing extra or a stopped run prints one line naming what is wrong
and what to do, and exits with the code below; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class ConfigError(ValueError):
    """A configuration problem, with a message that says what to do."""


class DataError(ValueError):
    """A malformed record, located by file and line."""

    def __init__(self, path: str | Path, line: int | None, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {problem}")


class MissingDependency(ImportError):
    """An optional package is not installed; the message says how to install it."""


class TrainingStopped(RuntimeError):
    """The run stopped on purpose, with a message saying why and what to do; its checkpoints are intact."""


# exception type -> exit status of the ``zhtune`` command (the first match wins)
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (MissingDependency, 3),
    (ConfigError, 2),
    (DataError, 2),
    (TrainingStopped, 1),
)


def exit_code(e: BaseException) -> int | None:
    """The exit status for an expected error, or None for a bug (which keeps its traceback)."""
    for kind, code in EXIT_CODES:
        if isinstance(e, kind):
            return code
    return None
