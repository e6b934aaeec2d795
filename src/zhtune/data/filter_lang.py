"""``zhtune data filter-lang``: keep or skip conversations by language (FastChat's ``optional_clean.py``).

The language is identified by langid.py, whose model ships inside the PyPI package: nothing is downloaded.
It looks at the first ``--max_chars`` characters of the conversation (all turns). Codes are ISO 639-1
(zh, en, ja, ...); below ``--min_confidence`` a conversation counts as ``und`` (undetermined).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.config.parse import Config, ConfigError, field
from zhtune.data.formats import conversation_text
from zhtune.data.pipeline import (
    InputArgs,
    Item,
    OutputArgs,
    Result,
    Summary,
    Tool,
    as_config,
    messages,
    run,
    tool_cli,
)

DESCRIPTION = "Keep or skip conversations by language (langid.py; its model ships in the package)."


@dataclass
class LangArgs:
    """languages"""

    keep_lang: list[str] | None = field(None, "Keep only these languages, comma separated (e.g. zh,en).")
    skip_lang: list[str] | None = field(None, "Drop these languages, comma separated.")
    min_confidence: float = field(0.0, "Below this probability the language is 'und' (undetermined).")
    max_chars: int = field(2000, "Identify from the first this many characters of the conversation.")

    def __post_init__(self) -> None:
        if not self.keep_lang and not self.skip_lang:
            raise ConfigError("give --keep_lang (e.g. zh,en) or --skip_lang")
        if self.keep_lang and self.skip_lang:
            raise ConfigError("give either --keep_lang or --skip_lang, not both")
        if not 0 <= self.min_confidence < 1:
            raise ConfigError(f"--min_confidence is a probability in [0, 1), got {self.min_confidence}")
        if self.max_chars < 16:
            raise ConfigError(f"--max_chars {self.max_chars} is too few to tell a language; use at least 16")


SECTIONS = {"input": InputArgs, "output": OutputArgs, "lang": LangArgs}


class LangId:
    """langid.py with normalised probabilities, loaded once per process."""

    def __init__(self, max_chars: int = 2000, min_confidence: float = 0.0):
        from zhtune.deps import require

        require("langid", "language identification")
        from langid.langid import LanguageIdentifier, model

        self.ident = LanguageIdentifier.from_modelstring(model, norm_probs=True)
        self.max_chars, self.min_confidence = max_chars, min_confidence

    def __call__(self, text: str) -> str:
        text = text[: self.max_chars]
        if not text.strip():
            return "und"
        lang, prob = self.ident.classify(text)
        return lang if prob >= self.min_confidence else "und"


class FilterLang(Tool):
    name = "filter-lang"

    def __init__(self, args: LangArgs):
        self.args = args
        self.keep = set(args.keep_lang or [])
        self.skip = set(args.skip_lang or [])
        self.langs: Counter = Counter()
        self.ident: LangId | None = None

    def setup(self) -> None:
        self.ident = LangId(self.args.max_chars, self.args.min_confidence)

    def apply(self, rec: Any) -> Result:
        assert self.ident is not None
        fmt, msgs = messages(rec)
        lang = self.ident(conversation_text(msgs)[: self.args.max_chars])
        if (self.keep and lang not in self.keep) or lang in self.skip:
            return Result([], f"language {lang}", fmt=fmt, key=lang)
        return Result([rec], fmt=fmt, key=lang)

    def reduce(self, item: Item, path: Path, summary: Summary) -> None:
        self.langs[item.key] += 1

    def finish(self, summary: Summary) -> None:
        summary.extra["languages"] = dict(self.langs.most_common())


def main(cfg: Config | dict[str, Any]) -> Summary:
    cfg = as_config(cfg, SECTIONS)
    return run(FilterLang(cfg.lang), cfg.input, cfg.output)


def cli(argv: list[str] | None = None) -> int:
    def show(cfg: Config) -> Summary:
        s = main(cfg)
        print("languages seen: " + ", ".join(f"{k} {v}" for k, v in s.extra["languages"].items()))
        return s

    return tool_cli(argv, SECTIONS, "zhtune data filter-lang", DESCRIPTION, show)
