"""Write chat messages back in each record format, and edit the texts of a record in its own format.

Reading a record into messages is :func:`zhtune.text.records.to_messages`; this is the other direction,
plus :func:`map_texts`, which rewrites every text of a record (keeping its format, ids and other fields),
so a cleaning tool hands back the same kind of record it was given.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from zhtune.text.records import ROLE_ALIASES
from zhtune.text.templates import Message

FORMATS = ("alpaca", "sharegpt", "messages", "vicuna_chat")
# the fields each format owns; everything else (id, source, ...) is carried over by convert
FORMAT_FIELDS = {
    "alpaca": {"instruction", "input", "output", "system", "history"},
    "sharegpt": {"conversations", "system"},
    "messages": {"messages"},
    "vicuna_chat": {"input", "output"},
}
SHAREGPT_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}


def split_system(msgs: list[Message]) -> tuple[str, list[Message]]:
    if msgs and msgs[0]["role"] == "system":
        return msgs[0]["content"], msgs[1:]
    return "", msgs


def extras_of(rec: dict, fmt: str) -> dict:
    return {k: v for k, v in rec.items() if k not in FORMAT_FIELDS[fmt]}


def from_messages(msgs: list[Message], fmt: str, extras: dict | None = None) -> dict:
    """A record of format ``fmt`` holding ``msgs`` (checked: system first, user/assistant pairs).

    Raises ValueError when the format cannot hold the conversation (Chinese-Vicuna chat has no system).
    """
    system, body = split_system(msgs)
    rec: dict[str, Any] = dict(extras or {})
    if fmt == "alpaca":
        history = [[body[i]["content"], body[i + 1]["content"]] for i in range(0, len(body) - 2, 2)]
        if system:
            rec["system"] = system
        rec["instruction"] = body[-2]["content"]
        rec["input"] = ""
        rec["output"] = body[-1]["content"]
        if history:
            rec["history"] = history
    elif fmt == "sharegpt":
        if system:
            rec["system"] = system
        rec["conversations"] = [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in body]
    elif fmt == "messages":
        rec["messages"] = [{"role": m["role"], "content": m["content"]} for m in msgs]
    elif fmt == "vicuna_chat":
        if system:
            raise ValueError("has a system prompt, and Chinese-Vicuna chat records have no place for one")
        rec["input"] = [m["content"] for m in body[0::2]]
        rec["output"] = [m["content"] for m in body[1::2]]
    else:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return rec


TextFn = Callable[[str, str], str]  # (text, role) -> new text


def map_texts(rec: dict, fmt: str, fn: TextFn) -> tuple[dict, bool]:
    """Apply ``fn(text, role)`` to every text of a record in its own format; returns (record, changed).

    The input record is not modified. Non-string values are left alone (the reader reports them).
    """
    out = copy.copy(rec)
    changed = False

    def f(text: Any, role: str) -> Any:
        nonlocal changed
        if not isinstance(text, str):
            return text
        new = fn(text, role)
        changed |= new != text
        return new

    if fmt == "alpaca":
        for key, role in (
            ("system", "system"),
            ("instruction", "user"),
            ("input", "user"),
            ("output", "assistant"),
        ):
            if key in out:
                out[key] = f(out[key], role)
        if isinstance(out.get("history"), list):
            out["history"] = [
                [f(p[0], "user"), f(p[1], "assistant")] if isinstance(p, list) and len(p) == 2 else p
                for p in out["history"]
            ]
    elif fmt == "sharegpt":
        if "system" in out:
            out["system"] = f(out["system"], "system")
        turns = []
        for t in out["conversations"]:
            if isinstance(t, dict):
                role = ROLE_ALIASES.get(str(t.get("from", "")).lower(), "assistant")
                t = {**t, "value": f(t.get("value"), role)}
            turns.append(t)
        out["conversations"] = turns
    elif fmt == "messages":
        out["messages"] = [
            {**m, "content": f(m.get("content"), ROLE_ALIASES.get(str(m.get("role", "")).lower(), "user"))}
            if isinstance(m, dict)
            else m
            for m in out["messages"]
        ]
    elif fmt == "vicuna_chat":
        out["input"] = [f(t, "user") for t in out["input"]]
        out["output"] = [f(t, "assistant") for t in out["output"]]
    return out, changed


def conversation_text(msgs: list[Message], roles: tuple[str, ...] = ("system", "user", "assistant")) -> str:
    """The texts of the given roles joined by blank lines (for hashing, language id, lengths)."""
    return "\n\n".join(m["content"] for m in msgs if m["role"] in roles)
