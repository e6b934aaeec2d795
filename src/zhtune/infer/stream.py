"""A generation job as its consumer sees it: token ids in from a backend thread, text pieces out.

A backend (transformers ``generate``, continuous batching, vLLM) reports the tokens a request has produced;
the consumer (chat, ``zhtune generate``, the server) iterates text pieces, synchronously or with ``async for``.
In between, this module decodes incrementally without splitting multi-byte characters, ends the reply at
the first end-of-turn token or stop string (holding back text that could be the start of one), and records
why it ended: ``stop``, ``length``, ``cancelled`` or ``error``.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

PROMPT_CONTEXT = 4  # prompt tokens decoded with the reply, so the first reply token keeps its leading space


class Detokenizer:
    """Incremental decoding: a piece is released once it no longer ends in a partial UTF-8 character.

    A reply that ends inside a character (a stop or the length limit after its first bytes) ends before it:
    the unfinished bytes are held back, never shown as U+FFFD.
    """

    def __init__(self, tokenizer: Any, context: Sequence[int] = ()):
        self.tok = tokenizer
        self.ids: list[int] = list(context)
        self.prefix = 0  # ids[prefix:read] were decoded already, as context for what follows
        self.read = len(self.ids)
        self.text = ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def push(self, ids: Sequence[int], final: bool = False) -> str:
        self.ids.extend(ids)
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            piece = after[len(before) :]
            if final:  # what is still held is an unfinished character: it never will be
                piece = piece.rstrip("\ufffd")
            self.prefix, self.read = self.read, len(self.ids)
            self.text += piece
            return piece
        return ""


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


@dataclass
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length | cancelled | error
    error: str | None = None


class Job:
    """One request: filled by a backend thread through :meth:`set_tokens`/:meth:`add_tokens`/:meth:`close`."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        params: Any,
        *,
        max_new_tokens: int,
        tokenizer: Any,
        stop_ids: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
        strip_leading: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
    ):
        self.id = uuid.uuid4().hex
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.stop_ids = set(stop_ids)
        self.stop_strings = [s for s in stop_strings if s]
        self.strip_leading = strip_leading
        self.detok = Detokenizer(tokenizer, self.prompt_ids[-PROMPT_CONTEXT:])
        self.created = time.perf_counter()
        self.first_token_at: float | None = None
        self.on_cancel: Callable[[Job], None] | None = None  # set by the backend that runs the job
        self.listener: Callable[[], None] | None = None  # called (from the backend thread) on every update

        self._cond = threading.Condition()
        self._tokens: list[int] = []
        self._closed = False
        self._error: str | None = None
        self._loop = loop
        self._event = asyncio.Event() if loop is not None else None

        self._cancel_requested = False  # set from a signal handler; acted on by the consumer
        self._seen = 0  # tokens consumed
        self._emitted = 0  # characters of detok.text handed out
        self._text_end: int | None = None  # where a stop string cut the text
        self.finish_reason: str | None = None
        self.error: str | None = None

    # ---- backend side (any thread) ----
    def set_tokens(self, tokens: Sequence[int], finished: bool = False, error: str | None = None) -> None:
        """Report all tokens generated so far."""
        with self._cond:
            if tokens and self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self._tokens = list(tokens)
            self._closed = self._closed or finished or error is not None
            self._error = self._error or error
            self._cond.notify_all()
        self._wake()

    def add_tokens(self, tokens: Sequence[int]) -> None:
        with self._cond:
            if tokens and self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self._tokens.extend(tokens)
            self._cond.notify_all()
        self._wake()

    def close(self, error: str | None = None) -> None:
        """The backend will produce nothing more for this job."""
        with self._cond:
            self._closed = True
            self._error = self._error or error
            self._cond.notify_all()
        self._wake()

    def wants_more(self) -> bool:
        """False once the consumer has what it needs (a stop, the length limit, a cancel)."""
        return self.finish_reason is None and not self._closed and not self._cancel_requested

    def _wake(self) -> None:
        if self.listener is not None:
            self.listener()
        if self._loop is not None and self._event is not None:
            try:
                self._loop.call_soon_threadsafe(self._event.set)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    # ---- consumer side ----
    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop generating (Ctrl-C, a client that went away). The reply ends with finish_reason 'cancelled'."""
        if self.finish_reason is None:
            self._finish("cancelled")

    def request_cancel(self) -> None:
        """Ask for a cancel from anywhere, a signal handler included (it only sets a flag)."""
        self._cancel_requested = True

    def _finish(self, reason: str, error: str | None = None) -> None:
        self.finish_reason = reason
        self.error = error
        with self._cond:
            self._cond.notify_all()
        if self.on_cancel is not None and not self._closed:
            self.on_cancel(self)

    def _step(self) -> str:
        """Consume what the backend produced since the last step; return the text that can be shown."""
        if self.finish_reason is not None:
            return ""
        if self._cancel_requested:
            self.cancel()
            return ""
        with self._cond:
            tokens, closed, error = self._tokens[self._seen :], self._closed, self._error
        take: list[int] = []
        hit_stop_token = False
        for t in tokens:
            if self._seen >= self.max_new_tokens:
                break
            self._seen += 1
            if t in self.stop_ids:
                hit_stop_token = True
                break
            take.append(t)
        length_reached = self._seen >= self.max_new_tokens
        ending = hit_stop_token or length_reached or closed
        self.detok.push(take, final=ending)
        text = self.detok.text
        cut = min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            self._text_end = cut
            self._finish("stop")
        elif hit_stop_token:
            self._finish("stop")
        elif length_reached:
            self._finish("length")
        elif closed:
            self._finish("error" if error else "stop", error)
        end = self._text_end if self._text_end is not None else len(text)
        if not self.done:
            end -= _held_back(text, self.stop_strings)
        if self.strip_leading and self._emitted == 0:
            while self._emitted < end and text[self._emitted].isspace():
                self._emitted += 1
        piece = text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return piece

    def poll(self) -> str:
        """Non-blocking: the text that arrived since the last call (check :attr:`done` after it)."""
        return self._step()

    def __iter__(self) -> Iterator[str]:
        """Text pieces as they are generated (blocking)."""
        while True:
            piece = self._step()
            if piece:
                yield piece
            if self.done:
                return
            with self._cond:
                if len(self._tokens) == self._seen and not self._closed and self.finish_reason is None:
                    self._cond.wait(timeout=0.1)

    async def __aiter__(self) -> AsyncIterator[str]:
        if self._event is None:
            raise RuntimeError("this job was submitted without an event loop; iterate it synchronously")
        while True:
            self._event.clear()
            piece = self._step()
            if piece:
                yield piece
            if self.done:
                return
            with self._cond:
                idle = len(self._tokens) == self._seen and not self._closed
            if idle:
                try:
                    await asyncio.wait_for(self._event.wait(), timeout=0.5)
                except asyncio.TimeoutError:
                    pass

    def text(self) -> str:
        end = self._text_end if self._text_end is not None else len(self.detok.text)
        text = self.detok.text[:end]
        return text.lstrip() if self.strip_leading else text

    def reply(self) -> Reply:
        return Reply(self.text(), len(self.prompt_ids), self._seen, self.finish_reason or "stop", self.error)

    def run(self) -> Reply:
        """Wait for the whole reply."""
        for _ in self:
            pass
        return self.reply()
