"""``zhtune data filter``: drop records that fail quality heuristics, each one counted.

Checks, in the order a record is judged (its drop reason is the first that fails; the report also counts
every check that failed, so thresholds can be tuned from one run):

* empty answer: an assistant turn with no text;
* length: total characters outside ``[--min_chars, --max_chars]``, an answer under ``--min_response_chars``;
* Chinese ratio: CJK characters over CJK plus Latin letters, below ``--min_chinese_ratio``;
* repeats: in an answer, the share of character ``--repeat_ngram``-grams that occurred before in it, above
  ``--max_repeat_ratio`` (a model stuck in a loop);
* refusals and boilerplate: answers containing a phrase of ``refusal_phrases.yaml`` ("作为一个AI语言模型",
  "As an AI language model", ...), or of ``--phrases_file``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.config.parse import field
from zhtune.data.jsonl import BadRecord
from zhtune.data.tool import (
    InputArgs,
    Item,
    OutputArgs,
    Result,
    Summary,
    Tool,
    ToolCommand,
    messages,
)
from zhtune.errors import ConfigError
from zhtune.text.formats import conversation_text
from zhtune.text.records import validate

DESCRIPTION = "Drop low-quality records: empty answers, length, Chinese ratio, repeated n-grams, refusals."
PHRASES = Path(__file__).with_name("refusal_phrases.yaml")
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
LATIN = re.compile(r"[A-Za-z]")


@dataclass
class QualityArgs:
    """thresholds (0 turns a length check off)"""

    min_chars: int = field(0, "Drop conversations shorter than this many characters in all.")
    max_chars: int = field(0, "Drop conversations longer than this many characters (0: no limit).")
    min_response_chars: int = field(1, "Drop conversations with an answer shorter than this.")
    min_chinese_ratio: float = field(0.0, "Drop when CJK / (CJK + Latin letters) is below this (0: off).")
    max_repeat_ratio: float = field(0.5, "Drop answers whose repeated n-gram share is above this (1: off).")
    repeat_ngram: int = field(10, "n of the character n-grams the repeat check counts.")
    refusals: bool = field(True, "Drop answers with refusal or boilerplate phrases.")
    phrases_file: str | None = field(None, "Phrases to use instead of the built-in list, one per line.")

    def __post_init__(self) -> None:
        if not 0 <= self.min_chinese_ratio <= 1:
            raise ConfigError(f"--min_chinese_ratio is in [0, 1], got {self.min_chinese_ratio}")
        if not 0 < self.max_repeat_ratio <= 1:
            raise ConfigError(f"--max_repeat_ratio is in (0, 1], got {self.max_repeat_ratio}")
        if self.repeat_ngram < 2:
            raise ConfigError(f"--repeat_ngram must be at least 2, got {self.repeat_ngram}")
        if self.max_chars and self.max_chars < self.min_chars:
            raise ConfigError("--max_chars is below --min_chars")
        if self.phrases_file and not Path(self.phrases_file).is_file():
            raise ConfigError(f"--phrases_file {self.phrases_file} does not exist")


SECTIONS = {"input": InputArgs, "output": OutputArgs, "quality": QualityArgs}


def load_phrases(path: str | None) -> list[str]:
    if path:
        return [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    import yaml

    return list(yaml.safe_load(PHRASES.read_text(encoding="utf-8"))["phrases"])


def chinese_ratio(text: str) -> float:
    cjk = len(CJK.findall(text))
    total = cjk + len(LATIN.findall(text))
    return cjk / total if total else 0.0


def repeat_ratio(text: str, n: int) -> float:
    """Share of the character n-grams of ``text`` that already occurred earlier in it."""
    count = len(text) - n + 1
    if count < n:
        return 0.0
    return 1.0 - len({text[i : i + n] for i in range(count)}) / count  # every repeat is one fewer distinct


class Quality(Tool):
    name = "filter"

    def __init__(self, args: QualityArgs):
        self.args = args
        self.phrase_re: re.Pattern | None = None
        self.failed: Counter = Counter()

    def setup(self) -> None:
        if self.args.refusals:
            phrases = load_phrases(self.args.phrases_file)
            self.phrase_re = re.compile("|".join(re.escape(p) for p in phrases), re.IGNORECASE)

    def checks(self, msgs: list[dict]) -> list[str]:
        a = self.args
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        failed = []
        if not answers or any(not t.strip() for t in answers):
            failed.append("empty answer")
        text = conversation_text(msgs)
        if len(text) < a.min_chars:
            failed.append("too short")
        if a.max_chars and len(text) > a.max_chars:
            failed.append("too long")
        if (
            answers
            and min(len(t.strip()) for t in answers) < a.min_response_chars
            and "empty answer" not in failed
        ):
            failed.append("answer too short")
        if a.min_chinese_ratio and chinese_ratio(text) < a.min_chinese_ratio:
            failed.append("too little Chinese")
        if a.max_repeat_ratio < 1 and any(
            repeat_ratio(t, a.repeat_ngram) > a.max_repeat_ratio for t in answers
        ):
            failed.append("repeated n-grams")
        if self.phrase_re is not None and any(self.phrase_re.search(t) for t in answers):
            failed.append("refusal or boilerplate")
        return failed

    def apply(self, rec: Any) -> Result:
        fmt, msgs = messages(rec, check=False)
        failed = self.checks(msgs)
        if "empty answer" not in failed:
            try:
                validate(msgs)  # turn order problems make a bad record, not a quality drop
            except ValueError as e:
                raise BadRecord(str(e)) from None
        if failed:
            return Result([], failed[0], fmt=fmt, key=failed)
        return Result([rec], fmt=fmt)

    def reduce(self, item: Item, path: Path, summary: Summary) -> None:
        for check in item.key or ():
            self.failed[check] += 1

    def finish(self, summary: Summary) -> None:
        summary.extra["checks_failed"] = dict(self.failed.most_common())

    def notes(self, summary: Summary) -> list[str]:
        failed = summary.extra["checks_failed"]
        return [
            "checks failed (a record may fail several): "
            + (", ".join(f"{k} {v}" for k, v in failed.items()) or "none")
        ]


COMMAND = ToolCommand(Quality, SECTIONS, DESCRIPTION)
main, cli = COMMAND.main, COMMAND.cli
