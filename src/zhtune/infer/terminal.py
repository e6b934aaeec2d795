"""The terminal side of ``zhtune chat``: reading a line, and Ctrl-C, without races.

Ctrl-C means two things in a chat: while a reply is under way it stops the reply (the turn is kept), anywhere
else it raises KeyboardInterrupt, which at the prompt clears the line. :class:`CtrlC` is the one SIGINT
handler of a session and knows which applies: a reply counts as under way from before its request is
submitted until its turn is recorded, so no Ctrl-C falls between the two meanings.

:class:`Terminal` reads lines so that a Ctrl-C always ends the wait. ``input()`` notices a signal only when
it interrupts the read itself: one that lands after the prompt is written but before the read begins is held
until the next Enter (CPython issue 112585), which is what a person does when they see the prompt and press
Ctrl-C at once. Here the wait is a ``select`` on the terminal and on the signal wakeup fd, which the signal
writes at once, whenever it comes.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import select
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from zhtune.infer.stream import Job


class CtrlC:
    """The SIGINT handler of a chat session (install it with :meth:`installed`)."""

    def __init__(self) -> None:
        self.replying = False
        self.asked = False  # Ctrl-C came during this reply, before its job existed
        self.job: Job | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        if not self.replying:
            raise KeyboardInterrupt
        self.asked = True
        if self.job is not None:
            self.job.request_cancel()  # only sets a flag: the consumer stops at its next step

    @contextlib.contextmanager
    def installed(self) -> Iterator[CtrlC]:
        previous = signal.signal(signal.SIGINT, self)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    @contextlib.contextmanager
    def reply(self) -> Iterator[CtrlC]:
        """While inside, Ctrl-C stops the reply's job (see :meth:`watch`) instead of raising."""
        self.replying, self.asked, self.job = True, False, None
        try:
            yield self
        finally:
            self.replying, self.job = False, None

    def watch(self, job: Job) -> Job:
        """The reply's job, once submitted; a Ctrl-C that came before it cancels it now."""
        self.job = job
        if self.asked:
            job.request_cancel()
        return job


class Terminal:
    """Lines typed at a terminal, read like ``input()`` but so that Ctrl-C at any moment raises
    KeyboardInterrupt (through the installed SIGINT handler) instead of waiting for Enter."""

    def __init__(self, fd: int, encoding: str):
        self.fd = fd
        self.decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
        self.pending = ""
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.previous = signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)

    @classmethod
    def open(cls) -> Terminal | None:
        """A reader of stdin where it is a terminal (POSIX, main thread); None elsewhere (use ``input``)."""
        if os.name != "posix" or threading.current_thread() is not threading.main_thread():
            return None
        try:
            if not sys.stdin.isatty():
                return None
            return cls(sys.stdin.fileno(), sys.stdin.encoding or "utf-8")
        except (AttributeError, ValueError, OSError):  # a replaced stdin without a file descriptor
            return None

    def close(self) -> None:
        signal.set_wakeup_fd(self.previous)
        os.close(self.wake_r)
        os.close(self.wake_w)

    def __call__(self, prompt: str = "") -> str:
        """One line without its newline: EOFError at the end of input, KeyboardInterrupt on Ctrl-C."""
        sys.stdout.write(prompt)
        sys.stdout.flush()
        while "\n" not in self.pending:
            ready, _, _ = select.select([self.fd, self.wake_r], [], [])
            if self.wake_r in ready:
                self._drain()  # a signal came: its handler runs before the next wait (Ctrl-C raises there)
                continue
            data = os.read(self.fd, 4096)
            if not data:
                line, self.pending = self.pending + self.decoder.decode(b"", final=True), ""
                if line:
                    return line
                raise EOFError
            self.pending += self.decoder.decode(data)
        line, _, self.pending = self.pending.partition("\n")
        return line

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 512):
                pass
