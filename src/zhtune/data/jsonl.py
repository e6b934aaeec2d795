"""Stream records from JSON and JSON Lines files of any size, and write them back atomically.

Reading holds one record plus a read buffer in memory, whatever the file's size: JSON Lines are read line
by line (and parsed where the work is done, possibly in another process); a JSON array is parsed
incrementally from 1 MiB chunks. Every record carries the line it starts on, for ``file:line`` errors.

Writing goes to a hidden temporary sibling of the output, renamed into place only when every record is
written, so a crash or a kill leaves the previous output (or none), never half of one. Records are
written one per line in both layouts (a JSON array then holds one record per line).
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zhtune.atomic import fsync_dir, tmp_sibling
from zhtune.errors import DataError
from zhtune.text.records import json_line

CHUNK = 1 << 20
MAX_RECORD_CHARS = 256 << 20  # a JSON-array record larger than this is taken for a syntax error
WS = " \t\r\n"
LAYOUTS = {"json": "a JSON array", "jsonl": "JSON Lines"}


class BadRecord(ValueError):
    """One record is unusable; the pipeline reports it with its file and line or counts it."""


def detect_layout(path: str | Path) -> str:
    """``json`` (a JSON array) or ``jsonl`` (one JSON value per line), from the first non-blank byte."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
            while head and not head.lstrip(b"\xef\xbb\xbf" + WS.encode()):
                more = f.read(4096)
                if not more:
                    break
                head += more
    except OSError as e:
        raise DataError(path, None, f"cannot read: {e.strerror}") from None
    first = head.removeprefix(b"\xef\xbb\xbf").lstrip(WS.encode())[:1]
    if first == b"[":
        return "json"
    if first in (b"{", b""):
        return "jsonl"
    raise DataError(
        path, 1, f"neither a JSON array nor JSON Lines (it starts with {first.decode('latin-1')!r})"
    )


def output_layout(path: str | Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    return "json" if str(path).endswith(".json") else "jsonl"


def iter_raw(path: str | Path, layout: str) -> Iterator[tuple[int, Any, int]]:
    """Yield ``(line, payload, bytes_read)``: payload is a JSONL line (bytes) or a parsed array element."""
    path = Path(path)
    if layout == "jsonl":
        yield from _iter_lines(path)
    else:
        yield from _iter_array(path)


def _iter_lines(path: Path) -> Iterator[tuple[int, bytes, int]]:
    done = 0
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            done += len(raw)
            if i == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            raw = raw.rstrip(b"\r\n")
            if raw.strip():
                yield i, raw, done


def parse(payload: Any) -> Any:
    """The record of a payload from :func:`iter_raw`; raises BadRecord for malformed JSON."""
    if not isinstance(payload, (bytes, str)):
        return payload
    try:
        return json.loads(payload)
    except json.JSONDecodeError as e:
        raise BadRecord(f"malformed JSON ({e.msg}, column {e.colno})") from None
    except UnicodeDecodeError:
        raise BadRecord("not valid UTF-8 (convert the file to UTF-8)") from None


class _ArrayReader:
    """Incremental parser of a top-level JSON array, one element at a time."""

    def __init__(self, path: Path, f: Any):
        self.path, self.f = path, f
        self.dec = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos, self.line = "", 0, 1
        self.eof, self.nread = False, 0
        self.dec_json = json.JSONDecoder()

    def fill(self) -> bool:
        """Read one more chunk; False at end of file."""
        if self.eof:
            return False
        chunk = self.f.read(CHUNK)
        if self.nread == 0:
            chunk = chunk.removeprefix(b"\xef\xbb\xbf")
        self.nread += len(chunk)
        try:
            text = self.dec.decode(chunk, final=not chunk)
        except UnicodeDecodeError:
            raise DataError(
                self.path, self.line, f"not valid UTF-8 near byte {self.nread}; convert the file to UTF-8"
            ) from None
        if not chunk:
            self.eof = True
        if self.pos > CHUNK:
            self.buf, self.pos = self.buf[self.pos :], 0
        self.buf += text
        return bool(chunk)

    def advance(self, to: int) -> None:
        self.line += self.buf.count("\n", self.pos, to)
        self.pos = to

    def skip_ws(self) -> str:
        """Skip blanks; the next character, or '' at end of file."""
        while True:
            n = len(self.buf)
            p = self.pos
            while p < n and self.buf[p] in WS:
                p += 1
            self.advance(p)
            if p < n:
                return self.buf[p]
            if not self.fill():
                return ""

    def error(self, problem: str, line: int | None = None) -> DataError:
        return DataError(self.path, line or self.line, f"malformed JSON ({problem})")

    def value(self) -> Any:
        while True:
            try:
                obj, end = self.dec_json.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                near_end = e.pos >= len(self.buf) - 16 or e.msg.startswith("Unterminated string")
                if near_end and not self.eof and len(self.buf) - self.pos < MAX_RECORD_CHARS:
                    self.fill()
                    continue
                line = self.line + self.buf.count("\n", self.pos, e.pos)
                raise self.error(f"{e.msg}; a JSON array cannot be read past it", line) from None
            if end == len(self.buf) and not self.eof and self.fill():
                continue  # a number or literal may go on in the next chunk
            self.advance(end)
            return obj

    def __iter__(self) -> Iterator[tuple[int, Any, int]]:
        if self.skip_ws() != "[":
            raise self.error("a JSON array must start with '['")
        self.advance(self.pos + 1)
        first = True
        while True:
            ch = self.skip_ws()
            if ch == "":
                raise self.error("the array is not closed with ']'")
            if ch == "]":
                self.advance(self.pos + 1)
                if self.skip_ws():
                    raise self.error("extra data after the closing ']'")
                return
            if not first:
                if ch != ",":
                    raise self.error("expected ',' between records")
                self.advance(self.pos + 1)
                if self.skip_ws() in ("]", ""):
                    raise self.error("a ',' with no record after it")
            line = self.line
            yield line, self.value(), self.nread
            first = False


def _iter_array(path: Path) -> Iterator[tuple[int, Any, int]]:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(path, None, f"cannot read: {e.strerror}") from None
    with f:
        yield from _ArrayReader(path, f)


def dumps(rec: Any) -> str:
    return json_line(rec)


class RecordWriter:
    """Write serialized records to ``path`` atomically: all of them appear at once, or none.

    Use as a context manager: a clean exit publishes the file, an exception discards it.
    """

    def __init__(self, path: str | Path, layout: str = "jsonl"):
        self.path = Path(path)
        self.layout = layout
        self.count = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp_sibling(self.path)
        self.f = open(self.tmp, "w", encoding="utf-8", newline="\n", buffering=CHUNK)

    def write(self, text: str) -> None:
        if self.layout == "json":
            self.f.write("[\n" if self.count == 0 else ",\n")
            self.f.write(text)
        else:
            self.f.write(text)
            self.f.write("\n")
        self.count += 1

    def commit(self) -> None:
        if self.layout == "json":
            self.f.write("[]\n" if self.count == 0 else "\n]\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def check_output(out_file: str | Path, in_files: list[str | Path], overwrite: bool) -> Path:
    """Refuse to write over an input, or over an existing file unless asked."""
    out = Path(out_file)
    for p in in_files:
        if (
            out.exists()
            and Path(p).exists()
            and os.path.samefile(out, p)
            or out.resolve() == Path(p).resolve()
        ):
            raise DataError(
                out, None, "is also an input; inputs are never modified in place: write to a new file"
            )
    if out.exists() and not overwrite:
        raise DataError(out, None, "already exists; choose another --out_file or pass --overwrite")
    if out.is_dir():
        raise DataError(out, None, "is a directory; --out_file names a .json or .jsonl file")
    return out
