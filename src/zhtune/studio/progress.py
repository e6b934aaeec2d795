"""Progress, ETA, losses and the error of a run, read from its own log as the command writes it.

The training commands print Hugging Face's progress bar (``12/30 [00:41<01:30, 5.03s/it]``, redrawn with
carriage returns) and one ``{'loss': ..., 'learning_rate': ...}`` line per logging step; the bar is redrawn
right after each such line, so a loss belongs to the step the next bar shows. A pipeline prints
``== stage (command): running`` before each stage. The supervisor's ``[studio] attempt N`` lines separate
attempts: a resumed attempt's losses replace those of the same steps.
"""

from __future__ import annotations

import ast
import re
from collections import deque
from typing import Any

BAR = re.compile(r"^\s*(\d+)%\|[^|]*\|\s*(\d+)/(\d+) \[([\d:]+)<([\d:?]+)(?:,\s*([^\]]*))?\]")
STAGE = re.compile(r"^== ([\w.-]+) \((\w+)\): (running|resuming.*)$")
ATTEMPT = re.compile(r"^\[studio\] attempt (\d+) started")
ERROR = re.compile(r"^zhtune [\w -]+: \S")
MAX_LINES = 400


def seconds(clock: str) -> float | None:
    if "?" in clock:
        return None
    total = 0.0
    for part in clock.split(":"):
        total = total * 60 + float(part)
    return total


class LogReader:
    """Feed it the log's bytes as they arrive; it keeps the state the page shows."""

    def __init__(self) -> None:
        self.buffer = ""
        self.line_tail = ""
        self.lines: deque[str] = deque(maxlen=MAX_LINES)
        self.new_lines: list[str] = []
        self.losses: dict[tuple[str, str, int], float] = {}
        self.pending: list[dict[str, Any]] = []
        self.progress: dict[str, Any] = {}
        self.stage = ""
        self.attempt = 0
        self.first_step: dict[
            int, int
        ] = {}  # attempt -> the first step it completed (resumed: checkpoint + 1)
        self.summary: dict[str, Any] = {}
        self.traceback_tail = ""
        self.error_line = ""
        self.changed_losses = False

    def feed(self, data: str) -> None:
        self.buffer += data
        pieces = re.split(r"(\r|\n)", self.buffer)
        self.buffer = pieces[-1]  # an unfinished piece waits for its end
        for i in range(0, len(pieces) - 1, 2):
            text, end = pieces[i], pieces[i + 1]
            self._piece(text)
            if text.strip():
                self.line_tail = text  # what a terminal would show after the carriage returns
            if end == "\n":
                if self.line_tail.strip():
                    self._line(self.line_tail.rstrip())
                self.line_tail = ""

    def _piece(self, text: str) -> None:
        m = BAR.match(text)
        if m:
            n, total = int(m.group(2)), int(m.group(3))
            if n > 0:
                self.first_step.setdefault(self.attempt, n)
            self.progress = {
                "step": n,
                "total": total,
                "elapsed": seconds(m.group(4)),
                "eta": seconds(m.group(5)),
                "rate": (m.group(6) or "").strip(),
                "stage": self.stage,
            }
            for logs in self.pending:
                self._record(logs, n)
            self.pending = []
            return
        s = text.strip()
        if s.startswith("{") and s.endswith("}") and "'" in s:
            try:
                logs = ast.literal_eval(s)
            except (ValueError, SyntaxError):
                return
            if isinstance(logs, dict):
                if "loss" in logs or "eval_loss" in logs:
                    self.pending.append(logs)
                elif "train_runtime" in logs:
                    self.summary = logs

    def _record(self, logs: dict[str, Any], step: int) -> None:
        for key in ("loss", "eval_loss"):
            if key in logs:
                try:
                    self.losses[(self.stage, key, step)] = float(logs[key])
                except (TypeError, ValueError):
                    continue
                self.changed_losses = True

    def _line(self, line: str) -> None:
        if BAR.match(line):
            return  # the bar's last state is in progress; the log keeps the text lines
        self.lines.append(line)
        self.new_lines.append(line)
        m = ATTEMPT.match(line)
        if m:
            self.attempt = int(m.group(1))
            self.progress, self.pending, self.stage = {}, [], ""
            self.error_line, self.traceback_tail = "", ""
        m = STAGE.match(line)
        if m:
            self.stage = m.group(1)
            self.progress = {}
        if ERROR.match(line):
            self.error_line = line
        if line.startswith("Traceback (most recent call last)"):
            self.traceback_tail = "traceback"
        elif self.traceback_tail and not line.startswith((" ", "\t")) and not line.startswith("[studio]"):
            self.traceback_tail = line

    def error(self) -> str:
        """The command's one-line error (``zhtune sft: ...``), else the last line of its traceback."""
        if self.error_line:
            return self.error_line
        if self.traceback_tail and self.traceback_tail != "traceback":
            return self.traceback_tail
        real = [x for x in self.lines if not x.startswith("[studio]")]
        return real[-1] if real else ""

    def loss_points(self) -> list[dict[str, Any]]:
        return [
            {"stage": stage, "kind": kind, "step": step, "value": value}
            for (stage, kind, step), value in sorted(self.losses.items(), key=lambda kv: (kv[0][0], kv[0][2]))
        ]

    def take(self) -> dict[str, Any]:
        """What changed since the last call: new log lines, and the losses if any changed."""
        out: dict[str, Any] = {"lines": self.new_lines, "progress": self.progress, "attempt": self.attempt}
        if self.changed_losses:
            out["losses"] = self.loss_points()
        self.new_lines, self.changed_losses = [], False
        return out
