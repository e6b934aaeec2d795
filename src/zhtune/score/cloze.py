"""Cloze scoring: which word fills a sentence's blank, by the likelihood of the whole filled sentence.

An item is a sentence with one blank (``BLANK``) and a few options. Each option is put in the blank and
the filled sentence is scored as a document (:mod:`zhtune.score.nll`): the summed log-probability of all
its tokens after one start token. Summing over the whole sentence, not only the option's tokens, makes the
score the probability of the same text however a tokenizer cuts it, so models with different vocabularies
are compared fairly (as bits per character are); the option with the highest score is the prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

BLANK = "____"


def fill(text: str, option: str) -> str:
    """``text`` with its blank replaced by ``option``."""
    if text.count(BLANK) != 1:
        raise ValueError(f"a cloze sentence has exactly one blank {BLANK!r}: {text!r}")
    return text.replace(BLANK, option)


def encode(tokenizer: Any, items: Sequence[tuple[str, Sequence[str]]]) -> list[list[list[int]]]:
    """Token ids of each (sentence, options) item's filled sentences, each after a start token."""
    from zhtune.score.nll import document_ids

    ids = document_ids(tokenizer, [fill(text, o) for text, options in items for o in options])
    out, k = [], 0
    for _, options in items:
        out.append(ids[k : k + len(options)])
        k += len(options)
    return out


def option_logprobs(
    model: Any, encoded: Sequence[Sequence[list[int]]], batch_size: int = 8
) -> list[list[float]]:
    """Log-likelihood (nats) of each item's filled sentences (from :func:`encode`): one list per item.

    The filled sentences of all items go into one pool scored in right-padded batches of ``batch_size``
    sequences, longest first, so the options of several items share each forward pass.
    """
    from zhtune.score.nll import sequence_nll

    flat = [(list(x), 1) for options in encoded for x in options]
    nll = sequence_nll(model, flat, batch_size, desc="scoring cloze").tolist()
    out, k = [], 0
    for options in encoded:
        out.append([-v for v in nll[k : k + len(options)]])
        k += len(options)
    return out


def predict(scores: Sequence[Sequence[float]]) -> list[int]:
    """The index of each item's best option (the first one on a tie)."""
    return [max(range(len(s)), key=lambda j: (s[j], -j)) for s in scores]
