"""Verifiable rewards for ``zhtune grpo``: scored from the reply's text and the record's reference, no reward model.

Kinds (each a number in [0, 1] per reply, from :mod:`zhtune.score.replies`, the code ``zhtune eval`` scores with):

* ``label``: classification. 1 when the reply is the reference label, or names it and no other label of the
  task (the labels are every distinct reference of the records scored by ``label``);
* ``exact`` / ``contains``: the reply equals / contains the reference (whitespace and final punctuation aside);
* ``f1``: F1 of the items of a structured answer (``人名：甲、乙；地名：无``, the NER demo's format);
* ``regex``: 1 when the reply matches the record's ``pattern`` (or ``--reward_pattern``), searched;
* ``length``: 1 at the target length in characters (``--reward_target_length``, default the reference's),
  falling linearly to 0 at twice or zero that length;
* ``format``: the reply is laid out like the reference: the share of fields (the text before ：) the two have
  in common (Jaccard); a reference without fields asks for one line;
* ``python``: your own function, ``--reward_fn path/to/file.py:function``. The file is run with importlib as
  ordinary Python code (it is your code, with your permissions). It is called once per batch as
  ``function(completions, references, **columns)`` with the replies' texts, the references and the record
  columns (``reward``, ``task``, ``pattern``, ``messages``: the prompt as JSON), and returns one float per
  completion (None: no reward for that one).

:class:`TaskReward` is the reward TRL calls: each record's kind is its ``reward`` field, else its ``task``
field looked up in ``--task_rewards``, else ``--reward``.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from zhtune.errors import ConfigError
from zhtune.score.replies import f1, item_counts, match, normalize

KINDS = ("label", "exact", "contains", "f1", "regex", "length", "format", "python")
FIELD = re.compile(r"([^；;\n：:]+)[：:]")


def label_reward(reply: str, reference: str, labels: Sequence[str]) -> float:
    r = normalize(reply)
    if r == normalize(reference):
        return 1.0
    named = {lab for lab in labels if lab and lab in r}
    return 1.0 if named == {reference} else 0.0


def length_reward(reply: str, target: int) -> float:
    if target <= 0:
        return 1.0 if not reply.strip() else 0.0
    return max(0.0, 1.0 - abs(len(reply.strip()) - target) / target)


def fields(text: str) -> list[str]:
    """The field names of a structured answer, in order: ``人名：甲；地名：无`` -> [人名, 地名]."""
    return [m.group(1).strip() for m in FIELD.finditer(text)]


def format_reward(reply: str, reference: str) -> float:
    want, got = set(fields(reference)), set(fields(reply))
    if not want:
        return 1.0 if reply.strip() and "\n" not in reply.strip() else 0.0
    return len(want & got) / len(want | got)


def score(
    kind: str,
    reply: str,
    reference: str,
    *,
    labels: Sequence[str] = (),
    pattern: str | None = None,
    target_length: int | None = None,
) -> float:
    """One reply's reward of ``kind`` (any kind but ``python``)."""
    if kind == "label":
        return label_reward(reply, reference, labels)
    if kind in ("exact", "contains"):
        return float(match(kind, reply, reference))
    if kind == "f1":
        return f1(*item_counts(reply, reference))[2]
    if kind == "regex":
        if not pattern:
            raise ConfigError(
                "reward regex needs a pattern: a 'pattern' field in the record or --reward_pattern"
            )
        return 1.0 if re.search(pattern, reply) else 0.0
    if kind == "length":
        return length_reward(reply, target_length if target_length is not None else len(reference.strip()))
    if kind == "format":
        return format_reward(reply, reference)
    raise ConfigError(f"unknown reward {kind!r}; one of {', '.join(KINDS)}")


def load_function(spec: str) -> Callable[..., Sequence[float | None]]:
    """``path/to/file.py:function``: the file is imported as a module (its top level runs) and the function
    returned. Your own code: it runs with your permissions, like any script you start."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise ConfigError(f"--reward_fn {spec!r}: write it as path/to/file.py:function")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--reward_fn: {p} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"zhtune_reward_{p.stem}", p)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"--reward_fn: {p} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"--reward_fn: {p} has no function {name!r}")
    return fn


def check_rewards(out: Sequence[Any], n: int, where: str) -> list[float | None]:
    if len(out) != n:
        raise ConfigError(f"{where} returned {len(out)} rewards for {n} completions")
    bad = [x for x in out if x is not None and not isinstance(x, (int, float))]
    if bad:
        raise ConfigError(f"{where} returned {type(bad[0]).__name__} {bad[0]!r}; rewards are numbers or None")
    return [None if x is None else float(x) for x in out]


class TaskReward:
    """The per-record reward: each record's kind from its ``reward`` column (filled in by zhtune grpo)."""

    def __init__(
        self,
        name: str = "task",
        *,
        labels: Sequence[str] = (),
        pattern: str | None = None,
        target_length: int | None = None,
        function: Callable[..., Sequence[float | None]] | None = None,
        kind: str | None = None,
    ):
        self.__name__ = name  # TRL logs rewards/<name>/mean
        self.labels, self.pattern, self.target_length = list(labels), pattern, target_length
        self.function, self.kind = function, kind  # kind: the same kind for every record (an extra reward)

    def __call__(
        self, prompts: Any, completions: Sequence[str], reference: Sequence[str], **cols: Any
    ) -> list:
        kinds = [self.kind] * len(completions) if self.kind else list(cols["reward"])
        patterns = cols.get("pattern") or [None] * len(completions)
        out: list[float | None] = [None] * len(completions)
        user = [i for i, k in enumerate(kinds) if k == "python"]
        if user:
            if self.function is None:
                raise ConfigError("reward python needs --reward_fn path/to/file.py:function")
            picked = {k: [v[i] for i in user] for k, v in cols.items() if isinstance(v, list)}
            got = self.function([completions[i] for i in user], [reference[i] for i in user], **picked)
            for i, r in zip(user, check_rewards(got, len(user), "--reward_fn")):
                out[i] = r
        for i, k in enumerate(kinds):
            if k != "python":
                out[i] = score(
                    k, completions[i], reference[i], labels=self.labels,
                    pattern=patterns[i] or self.pattern, target_length=self.target_length,
                )  # fmt: skip
        return out
