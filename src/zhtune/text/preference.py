"""Read preference data: pairs of a prompt with a chosen and a rejected reply, and KTO's labelled replies.

Layouts, detected per record so one file may mix them:
* LLaMA-Factory / ShareGPT: ``conversations`` (``{"from", "value"}`` or ``{"role", "content"}`` turns),
  optional ``system``, and ``chosen`` and ``rejected`` replies;
* OpenAI: ``messages`` with ``chosen`` and ``rejected``;
* ``prompt`` (a string or a list of messages), optional ``system``, with ``chosen`` and ``rejected``;
* Alpaca (LLaMA-Factory's ranking Alpaca): ``instruction``, optional ``input``, ``system``, ``history``;
* implicit prompt (TRL, Anthropic HH): ``chosen`` and ``rejected`` are whole conversations that share a prompt;
* KTO: a ``label`` (true: desirable) with a ``completion`` after any prompt above, or with ``messages`` /
  ``conversations`` whose last turn is the reply.
A reply is a string, one assistant message, or a list of messages: the prompt again, then one assistant
message (as UltraFeedback writes it). The prompt ends with the user turn the replies answer; earlier turns
make a multi-turn prompt. Files are JSON arrays or JSON Lines; problems are reported as ``file:line: problem``.

:func:`split_held_out` splits such files into train and held-out records by prompt, deterministically.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zhtune.atomic import atomic_write_text
from zhtune.errors import DataError
from zhtune.text.records import ROLE_ALIASES, ReadStats, iter_records, json_line, validate
from zhtune.text.templates import Message

PROMPT_FIELDS = "conversations, messages, prompt or instruction"


@dataclass(frozen=True)
class Pair:
    prompt: list[Message]  # optional system, then user/assistant turns ending with a user turn
    chosen: str
    rejected: str


@dataclass(frozen=True)
class Unpaired:
    prompt: list[Message]
    completion: str
    label: bool  # True: a desirable reply


def _turn(t: Any, where: str) -> Message:
    if not isinstance(t, dict):
        raise ValueError(f"{where} must be an object with 'from' and 'value' (or 'role' and 'content')")
    role_key, text_key = ("role", "content") if "role" in t else ("from", "value")
    who = t.get(role_key)
    if not isinstance(who, str) or who.lower() not in ROLE_ALIASES:
        raise ValueError(f"{where} has unknown role {who!r} (expected system, human/user or gpt/assistant)")
    text = t.get(text_key)
    if not isinstance(text, str):
        got = type(text).__name__ if text is not None else "nothing"
        raise ValueError(f"{where}.{text_key} must be a string, got {got}")
    return {"role": ROLE_ALIASES[who.lower()], "content": text}


def _turns(val: Any, name: str) -> list[Message]:
    if not isinstance(val, list):
        raise ValueError(f"field '{name}' must be a list of messages, got {type(val).__name__}")
    return [_turn(t, f"{name}[{j}]") for j, t in enumerate(val)]


def _opt_str(rec: dict, key: str) -> str:
    val = rec.get(key)
    if val is None:
        return ""
    if not isinstance(val, str):
        raise ValueError(f"field '{key}' must be a string, got {type(val).__name__}")
    return val


def _alpaca_prompt(rec: dict) -> list[Message]:
    instruction = _opt_str(rec, "instruction")
    inp = _opt_str(rec, "input")
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise ValueError("field 'history' must be a list of [question, answer] pairs")
    msgs: list[Message] = []
    for j, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ValueError(f"history[{j}] must be a [question, answer] pair of strings")
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return msgs + [{"role": "user", "content": f"{instruction}\n{inp}" if inp else instruction}]


def _prompt(rec: dict) -> tuple[str, list[Message] | None]:
    """(layout, prompt messages); None when the replies carry the prompt themselves."""
    if "conversations" in rec:
        fmt, msgs = "sharegpt", _turns(rec["conversations"], "conversations")
    elif "messages" in rec:
        fmt, msgs = "messages", _turns(rec["messages"], "messages")
    elif "prompt" in rec:
        p = rec["prompt"]
        if not isinstance(p, (str, list)):
            raise ValueError(f"field 'prompt' must be a string or a list of messages, got {type(p).__name__}")
        fmt, msgs = "prompt", [{"role": "user", "content": p}] if isinstance(p, str) else _turns(p, "prompt")
    elif "instruction" in rec:
        fmt, msgs = "alpaca", _alpaca_prompt(rec)
    else:
        return "implicit", None
    system = _opt_str(rec, "system")
    if system and not (msgs and msgs[0]["role"] == "system"):
        msgs = [{"role": "system", "content": system}] + msgs
    return fmt, msgs


def _reply_turns(val: Any, name: str) -> list[Message]:
    if isinstance(val, str):
        return [{"role": "assistant", "content": val}]
    if isinstance(val, dict):
        return [_turn(val, name)]
    if isinstance(val, list):
        return _turns(val, name)
    if val is None:
        raise ValueError(f"missing field '{name}'")
    raise ValueError(
        f"field '{name}' must be a string, a message or a list of messages, got {type(val).__name__}"
    )


def _one_reply(turns: list[Message], name: str) -> str:
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        last = turns[-1]["role"] if turns else "nothing"
        raise ValueError(
            f"'{name}' must be one assistant reply (or the prompt followed by one); "
            f"it has {len(turns)} turn(s) ending with {last}"
        )
    if not turns[0]["content"].strip():
        raise ValueError(f"the {name} reply is empty")
    return turns[0]["content"]


def _reply(val: Any, prompt: list[Message], name: str) -> str:
    turns = _reply_turns(val, name)
    body = prompt[1:] if prompt and prompt[0]["role"] == "system" else prompt
    for head in (prompt, body):  # the prompt repeated before the reply, with or without its system turn
        if head and len(turns) > len(head) and turns[: len(head)] == head:
            return _one_reply(turns[len(head) :], name)
    return _one_reply(turns, name)


def _implicit(rec: dict) -> tuple[list[Message], str, str]:
    chosen, rejected = (
        _reply_turns(rec.get("chosen"), "chosen"),
        _reply_turns(rec.get("rejected"), "rejected"),
    )
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise ValueError(
            f"no prompt: give {PROMPT_FIELDS}, or make chosen and rejected whole conversations "
            "that share their prompt"
        )
    return chosen[:n], _one_reply(chosen[n:], "chosen"), _one_reply(rejected[n:], "rejected")


def _check(prompt: list[Message], reply: str) -> None:
    if not prompt or prompt[-1]["role"] != "user":
        ends = f"it ends with a {prompt[-1]['role']} turn" if prompt else "it is empty"
        raise ValueError(f"the prompt must end with the user turn the replies answer; {ends}")
    validate(prompt + [{"role": "assistant", "content": reply}])


def _pair(rec: dict) -> tuple[str, Pair]:
    fmt, prompt = _prompt(rec)
    if prompt is None:
        prompt, chosen, rejected = _implicit(rec)
    else:
        chosen = _reply(rec.get("chosen"), prompt, "chosen")
        rejected = _reply(rec.get("rejected"), prompt, "rejected")
    _check(prompt, chosen)
    if chosen == rejected:
        raise ValueError("chosen and rejected are the same reply, which teaches nothing")
    return fmt, Pair(prompt, chosen, rejected)


def _unpaired(rec: dict) -> tuple[str, Unpaired]:
    label = rec["label"]
    if not isinstance(label, bool):
        raise ValueError(f"field 'label' must be true or false, got {label!r}")
    fmt, prompt = _prompt(rec)
    if "completion" in rec:
        if prompt is None:
            raise ValueError(f"a KTO completion needs a prompt: {PROMPT_FIELDS}")
        completion = _reply(rec["completion"], prompt, "completion")
    elif fmt in ("sharegpt", "messages") and prompt:
        prompt, completion = prompt[:-1], _one_reply(prompt[-1:], "last turn")
    else:
        raise ValueError(
            "a KTO record needs a 'completion', or 'messages' / 'conversations' ending with the reply"
        )
    _check(prompt, completion)
    return f"kto_{fmt}", Unpaired(prompt, completion, label)


def to_preference(rec: Any) -> tuple[str, Pair | Unpaired]:
    """Normalise one record to ``(layout, Pair | Unpaired)``. Raises ValueError describing the problem."""
    if not isinstance(rec, dict):
        raise ValueError(f"a record must be a JSON object, got {type(rec).__name__}")
    if "label" in rec:
        return _unpaired(rec)
    if "chosen" in rec or "rejected" in rec:
        return _pair(rec)
    if "completion" in rec:
        raise ValueError("a KTO completion needs a 'label' (true for a desirable reply, false otherwise)")
    keys = ", ".join(sorted(rec)) or "none"
    raise ValueError(
        f"not a preference record (fields: {keys}); expected {PROMPT_FIELDS} with 'chosen' and 'rejected' "
        "replies, or a KTO 'completion' and 'label'"
    )


def _as_kind(item: Pair | Unpaired, kind: str) -> list[Pair | Unpaired]:
    if kind == "pair":
        if isinstance(item, Unpaired):
            raise ValueError("an unpaired KTO record (a 'label', no 'chosen'/'rejected'); only KTO takes it")
        return [item]
    if isinstance(item, Pair):  # a pair is one desirable and one undesirable example, as TRL unpairs them
        return [Unpaired(item.prompt, item.chosen, True), Unpaired(item.prompt, item.rejected, False)]
    return [item]


def _items(
    paths: list[Path], skip_bad_records: bool, stats: ReadStats, kind: str | None
) -> Iterator[tuple[Path, int, Any, list[Pair | Unpaired]]]:
    """``(file, line, record, examples)`` of every good record; bad ones raise DataError or are counted."""
    for path in map(Path, paths):
        for line, rec in iter_records(path, skip_bad_records=skip_bad_records, stats=stats):
            stats.records += 1
            try:
                fmt, item = to_preference(rec)
                items = _as_kind(item, kind) if kind else [item]
            except ValueError as e:
                if not skip_bad_records:
                    raise DataError(
                        path, line, f"{e} (or pass --skip_bad_records to count and skip such records)"
                    ) from None
                stats.add_bad(str(e))
                continue
            stats.formats[fmt] = stats.formats.get(fmt, 0) + 1
            yield path, line, rec, items


def read_preferences(
    paths: list[Path],
    *,
    kind: Literal["pair", "unpaired"] = "pair",
    skip_bad_records: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[tuple[str, int, Pair | Unpaired]]:
    """Yield ``(file, line, example)`` for every good record of the given files.

    ``kind="pair"`` yields :class:`Pair` and treats a KTO record as bad; ``kind="unpaired"`` yields
    :class:`Unpaired`, a pair giving two (chosen: desirable, rejected: undesirable).
    """
    stats = stats if stats is not None else ReadStats()
    for path, line, _rec, items in _items(paths, skip_bad_records, stats, kind):
        for x in items:
            yield str(path), line, x


@dataclass
class HeldOutSplit:
    train: list[Any]  # the records as read, in file order
    held_out: list[Any]
    prompts: int  # distinct prompts among the good records
    stats: ReadStats


def split_held_out(
    paths: list[Path], *, held_out: float, seed: int, skip_bad_records: bool = False
) -> HeldOutSplit:
    """Split preference records into train and held-out, the same way for the same files and seed.

    ``held_out`` is a fraction in (0, 1) or a whole number of records. Records that share a prompt go to
    the same side, so no held-out prompt is trained on; whole prompts are held out, in an order drawn from
    ``seed``, until at least that many records are. Both sides keep the records' file order and layout.
    """
    stats = ReadStats()
    records: list[Any] = []
    groups: dict[str, list[int]] = {}
    for _path, _line, rec, items in _items(paths, skip_bad_records, stats, None):
        key = json.dumps(items[0].prompt, ensure_ascii=False, sort_keys=True)
        groups.setdefault(key, []).append(len(records))
        records.append(rec)
    n = len(records)
    if 0 < held_out < 1:
        want = max(1, round(held_out * n))
    elif held_out >= 1 and float(held_out).is_integer():
        want = int(held_out)
    else:
        raise ValueError(
            f"held_out must be a fraction in (0, 1) or a whole number of records, got {held_out}"
        )
    if want >= n or len(groups) < 2:
        where = paths[0] if paths else "<no files>"
        raise DataError(
            where, None, f"cannot hold out {want} of {n} records ({len(groups)} distinct prompts)"
        )
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    chosen: set[int] = set()
    for g in order:
        if len(chosen) >= want:
            break
        if len(chosen) + len(g) < n:  # never hold out everything: the last group left stays for training
            chosen.update(g)
    train = [r for i, r in enumerate(records) if i not in chosen]
    held = [r for i, r in enumerate(records) if i in chosen]
    return HeldOutSplit(train, held, len(groups), stats)


def write_held_out_split(
    paths: list[Path],
    train_out: str | Path,
    held_out_out: str | Path,
    *,
    held_out: float,
    seed: int,
    skip_bad_records: bool = False,
) -> HeldOutSplit:
    """:func:`split_held_out`, written as two JSON Lines files (atomically), the records unchanged."""
    split = split_held_out(paths, held_out=held_out, seed=seed, skip_bad_records=skip_bad_records)
    for out, recs in ((train_out, split.train), (held_out_out, split.held_out)):
        atomic_write_text(out, "".join(json_line(r) + "\n" for r in recs))
    return split
