"""Read instruction data and normalise every record to a list of chat messages.

Formats, detected per record so one file may mix them:
* Alpaca: ``instruction``, optional ``input``, ``output``, optional ``system`` and ``history`` ([[q, a], ...]);
* ShareGPT: ``conversations`` of ``{"from": human|gpt|system, "value": ...}``;
* OpenAI: ``messages`` of ``{"role": system|user|assistant, "content": ...}``;
* Chinese-Vicuna chat: ``input`` and ``output`` lists of equal length.
Files are JSON arrays or JSON Lines. Every problem is reported as ``file:line: what is wrong``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zhtune.errors import DataError
from zhtune.text.templates import Message

# characters str.splitlines() (and JavaScript before ES2019) end a line at but JSON leaves raw
LINE_BREAKS = {ord("\x85"): "\\u0085", ord("\u2028"): "\\u2028", ord("\u2029"): "\\u2029"}


def json_line(obj: Any) -> str:
    """``obj`` as JSON on one line for every reader: Chinese kept readable, U+0085/U+2028/U+2029 (a model's
    stray output) escaped, so a JSONL record or an SSE event is never split by a splitlines-style reader."""
    return json.dumps(obj, ensure_ascii=False).translate(LINE_BREAKS)


DATA_SUFFIXES = (".json", ".jsonl")
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}


def dataset_from_generator(gen: Any, gen_kwargs: dict[str, Any], cache_dir: str) -> Any:
    """``datasets.Dataset.from_generator``, with a :class:`DataError` raised by the generator surfacing as
    itself: datasets wraps it in a DatasetGenerationError, which would hide its file:line."""
    import datasets

    try:
        return datasets.Dataset.from_generator(gen, gen_kwargs=gen_kwargs, cache_dir=cache_dir)
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__
        if isinstance(cause, DataError):
            raise cause from None
        raise


@dataclass
class ReadStats:
    records: int = 0
    bad: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    problems: dict[str, int] = field(default_factory=dict)

    def add_bad(self, problem: str) -> None:
        self.bad += 1
        key = problem.split(":")[0][:80]
        self.problems[key] = self.problems.get(key, 0) + 1


def iter_json_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, record)`` from a JSON array or JSON Lines file.

    Lines that fail to parse raise DataError at once (a JSON array cannot be read past a syntax error);
    in JSONL, use :func:`iter_jsonl_lines` to skip them instead.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(path, None, f"cannot read: {e.strerror}") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(path, line, "not valid UTF-8 (convert the file to UTF-8)") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _iter_array(path, text)
    else:
        for line, rec, err in iter_jsonl_lines(path, text):
            if err:
                raise DataError(path, line, err)
            yield line, rec


def iter_jsonl_lines(path: str | Path, text: str) -> Iterator[tuple[int, Any, str | None]]:
    # lines end at "\n" only (CRLF leaves "\r", which JSON reads as whitespace): str.splitlines would also
    # split inside strings at U+2028, U+0085 and other characters JSON allows unescaped
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line), None
        except json.JSONDecodeError as e:
            yield i, None, f"malformed JSON ({e.msg} at column {e.colno})"


def _iter_array(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    line = text.count("\n", 0, pos) + 1
    n = len(text)

    def skip_ws(p: int) -> int:
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    first = True
    while True:
        p = skip_ws(pos)
        line += text.count("\n", pos, p)
        pos = p
        if pos >= n:
            raise DataError(path, line, "malformed JSON (the array is not closed with ']')")
        if text[pos] == "]":
            rest = text[pos + 1 :].strip()
            if rest:
                raise DataError(path, line, "malformed JSON (extra data after the closing ']')")
            return
        if not first:
            if text[pos] != ",":
                raise DataError(path, line, "malformed JSON (expected ',' between records)")
            pos = skip_ws(pos + 1)
            line += text.count("\n", p, pos)
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(path, e.lineno, f"malformed JSON ({e.msg} at column {e.colno})") from None
        yield line, obj
        line += text.count("\n", pos, end)
        pos = end
        first = False


def _text(rec: dict, key: str, required: bool = True) -> str:
    val = rec.get(key)
    if val is None:
        if required:
            raise ValueError(f"missing field '{key}'")
        return ""
    if not isinstance(val, str):
        raise ValueError(f"field '{key}' must be a string, got {type(val).__name__}")
    return val


def detect_format(rec: Any) -> str:
    if not isinstance(rec, dict):
        raise ValueError(f"a record must be a JSON object, got {type(rec).__name__}")
    if "conversations" in rec:
        return "sharegpt"
    if "messages" in rec:
        return "messages"
    if "instruction" in rec:
        return "alpaca"
    if isinstance(rec.get("input"), list) and isinstance(rec.get("output"), list):
        return "vicuna_chat"
    if "output" in rec or "input" in rec:
        return "alpaca"
    keys = ", ".join(sorted(rec)) or "none"
    raise ValueError(
        f"unknown record format (fields: {keys}); expected instruction/input/output (Alpaca), "
        "conversations (ShareGPT), messages (OpenAI) or input/output lists (Chinese-Vicuna)"
    )


def to_messages(rec: Any, *, check: bool = True, reply: bool = True) -> tuple[str, list[Message]]:
    """Normalise one record. Raises ValueError describing the problem.

    ``check=False`` skips the turn-order and empty-turn checks (data tools count those themselves).
    ``reply=False`` accepts a prompt without its answer (evaluation prompts): an Alpaca record without an
    output (or with an empty one), a ShareGPT or messages record ending with a user turn.
    """
    fmt = detect_format(rec)
    msgs: list[Message] = []
    if fmt == "alpaca":
        instruction = _text(rec, "instruction")
        inp = _text(rec, "input", required=False)
        output = _text(rec, "output", required=reply)
        system = _text(rec, "system", required=False)
        if system:
            msgs.append({"role": "system", "content": system})
        history = rec.get("history") or []
        if not isinstance(history, list):
            raise ValueError("field 'history' must be a list of [question, answer] pairs")
        for j, pair in enumerate(history):
            if not (
                isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
            ):
                raise ValueError(f"history[{j}] must be a [question, answer] pair of strings")
            msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        prompt = f"{instruction}\n{inp}" if inp else instruction
        msgs.append({"role": "user", "content": prompt})
        if reply or output:
            msgs.append({"role": "assistant", "content": output})
    elif fmt == "sharegpt":
        conv = rec["conversations"]
        if not isinstance(conv, list):
            raise ValueError("field 'conversations' must be a list")
        sys_field = rec.get("system")
        if isinstance(sys_field, str) and sys_field:
            msgs.append({"role": "system", "content": sys_field})
        for j, turn in enumerate(conv):
            if not isinstance(turn, dict):
                raise ValueError(f"conversations[{j}] must be an object with 'from' and 'value'")
            who = turn.get("from")
            if not isinstance(who, str) or who.lower() not in ROLE_ALIASES:
                raise ValueError(
                    f"conversations[{j}] has unknown role {who!r} (expected human, gpt or system)"
                )
            msgs.append(
                {
                    "role": ROLE_ALIASES[who.lower()],
                    "content": _turn_text(turn, "value", f"conversations[{j}]"),
                }
            )
    elif fmt == "messages":
        conv = rec["messages"]
        if not isinstance(conv, list):
            raise ValueError("field 'messages' must be a list")
        for j, turn in enumerate(conv):
            if not isinstance(turn, dict):
                raise ValueError(f"messages[{j}] must be an object with 'role' and 'content'")
            role = turn.get("role")
            if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
                raise ValueError(
                    f"messages[{j}] has unknown role {role!r} (expected system, user or assistant)"
                )
            msgs.append(
                {"role": ROLE_ALIASES[role.lower()], "content": _turn_text(turn, "content", f"messages[{j}]")}
            )
    else:  # vicuna_chat
        ins, outs = rec["input"], rec["output"]
        if len(ins) != len(outs):
            raise ValueError(f"'input' has {len(ins)} turns but 'output' has {len(outs)}")
        for j, (q, a) in enumerate(zip(ins, outs)):
            if not isinstance(q, str) or not isinstance(a, str):
                raise ValueError(f"turn {j}: input and output entries must be strings")
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if check:
        validate(msgs, for_training=reply)
    return fmt, msgs


def _turn_text(turn: dict, key: str, where: str) -> str:
    val = turn.get(key)
    if not isinstance(val, str):
        raise ValueError(
            f"{where}.{key} must be a string, got {type(val).__name__ if val is not None else 'nothing'}"
        )
    return val


def validate(msgs: list[Message], *, for_training: bool = True) -> None:
    """Check turn order: optional system first, then user/assistant alternating, ending with assistant."""
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    if not body:
        raise ValueError("no user/assistant turns")
    for j, m in enumerate(body):
        want = "user" if j % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(
                f"out-of-order turns: turn {j + 1} is {m['role']} where {want} was expected "
                "(after an optional system message, turns alternate user, assistant, ...)"
            )
        if not m["content"].strip():
            raise ValueError(f"empty {m['role']} turn (turn {j + 1})")
    if for_training and body[-1]["role"] != "assistant":
        raise ValueError("the conversation ends with a user turn that has no answer")


def list_data_files(dataset_dir: str | Path | None, files: list[str] | None) -> list[Path]:
    out: list[Path] = []
    if dataset_dir:
        d = Path(dataset_dir)
        if not d.is_dir():
            raise DataError(d, None, "--dataset_dir is not a directory")
        out += sorted(p for p in d.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file())
        if not out:
            raise DataError(d, None, "--dataset_dir holds no .json or .jsonl files")
    for f in files or []:
        p = Path(f)
        if not p.is_file():
            raise DataError(p, None, "training file does not exist")
        out.append(p)
    return out


def read_conversations(
    paths: list[Path], *, skip_bad_records: bool = False, stats: ReadStats | None = None
) -> Iterator[tuple[str, int, list[Message]]]:
    """Yield ``(file, line, messages)`` for every good record of the given files."""
    stats = stats if stats is not None else ReadStats()
    for path in paths:
        if path.suffix == ".jsonl" and skip_bad_records:
            it = _lenient_jsonl(path, stats)
        else:
            it = iter_json_records(path)
        for line, rec in it:
            stats.records += 1
            try:
                fmt, msgs = to_messages(rec)
            except ValueError as e:
                if not skip_bad_records:
                    raise DataError(
                        path, line, f"{e} (or pass --skip_bad_records to count and skip such records)"
                    ) from None
                stats.add_bad(str(e))
                continue
            stats.formats[fmt] = stats.formats.get(fmt, 0) + 1
            yield str(path), line, msgs


def iter_records(path: Path, *, skip_bad_records: bool, stats: ReadStats) -> Iterator[tuple[int, Any]]:
    """``(line, record)`` of one file, as :func:`read_conversations` reads it: with ``skip_bad_records``,
    JSONL lines that do not parse are counted in ``stats`` and skipped, otherwise they raise DataError."""
    if path.suffix == ".jsonl" and skip_bad_records:
        return _lenient_jsonl(path, stats)
    return iter_json_records(path)


def _lenient_jsonl(path: Path, stats: ReadStats) -> Iterator[tuple[int, Any]]:
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    text = raw.decode("utf-8", errors="replace")
    for line, rec, err in iter_jsonl_lines(path, text):
        if err:
            stats.records += 1
            stats.add_bad(err)
            continue
        if isinstance(rec, str) or "\ufffd" in json.dumps(rec, ensure_ascii=False):
            stats.records += 1
            stats.add_bad("not valid UTF-8")
            continue
        yield line, rec
