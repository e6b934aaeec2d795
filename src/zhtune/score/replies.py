"""Score a reply's text against a reference: exact or contained match, and items of structured answers.

Pure text functions, shared by evaluation (``zhtune eval --task_metric exact|contains|f1``) and by the
verifiable rewards of ``zhtune grpo``, so a reward and the metric it is meant to raise are the same code.

* :func:`normalize`: whitespace collapsed, final punctuation dropped (。．.!！?？;；,，、 and spaces);
* :func:`match`: ``exact`` (equal once normalized) or ``contains`` (the reference inside the reply);
* :func:`items`: the ``(field, item)`` pairs of a structured answer such as ``人名：甲、乙；地名：无`` (fields split at
  ；/; or new lines, items at 、/，/, and keyed by the text before ：/:; 无 and none are not items);
* :func:`item_counts` and :func:`f1`: true positives, false positives and false negatives of one reply's
  items, and the F1 they give.
"""

from __future__ import annotations

import re

TRAILING = "。．.!！?？;；,，、 "
PLACEHOLDERS = ("无", "none", "None", "-")


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().rstrip(TRAILING).strip()


def match(metric: str, reply: str, reference: str) -> bool:
    r, ref = normalize(reply), normalize(reference)
    if metric == "exact":
        return r == ref
    if metric == "contains":
        return ref in r
    raise ValueError(f"unknown metric {metric!r}")


def items(text: str) -> set[tuple[str, str]]:
    """(field, item) pairs of a structured answer; placeholder items (无, none) are not items."""
    out = set()
    for part in re.split(r"[；;\n]", text):
        key, sep, rest = (
            re.split(r"([：:])", part, maxsplit=1) if re.search(r"[：:]", part) else ("", "", part)
        )
        for item in re.split(r"[、，,]", rest):
            item = normalize(item)
            if item and item not in PLACEHOLDERS:
                out.add((key.strip(), item))
    return out


def item_counts(reply: str, reference: str) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of the reply's items against the reference's."""
    got, want = items(reply), items(reference)
    return len(got & want), len(got - want), len(want - got)


def f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """(precision, recall, F1) from counts; a reply and reference with no items at all score 1.0."""
    if tp + fp + fn == 0:
        return 1.0, 1.0, 1.0
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)
