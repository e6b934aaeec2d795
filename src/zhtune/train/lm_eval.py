"""Perplexity and bits per character of a causal LM on pre-training blocks.

Perplexity is exp(mean loss per predicted token): it depends on the tokenizer, so it cannot compare a model
with its vocabulary-extended self. Bits per character divides the same total loss, in bits, by the
characters those tokens spell (each block's ``n_chars``, see :mod:`zhtune.train.pt_data`): the cost of the text
itself, whichever way it was cut into tokens.
"""

from __future__ import annotations

from typing import Any


def evaluate_lm(
    model: Any, dataset: Any, *, batch_size: int = 8, desc: str = "evaluating"
) -> dict[str, float]:
    """Total loss over every predicted token of every block; returns loss, perplexity and bits per character.

    The scoring is :func:`zhtune.score.nll.window_nll`, as ``zhtune eval`` does on text files: each
    block is one window whose first token is context.
    """
    from zhtune.score.nll import metrics, window_nll

    rows = dataset[0 : len(dataset)]
    nll, tokens = window_nll(model, [(list(ids), 1) for ids in rows["input_ids"]], batch_size, desc=desc)
    m = metrics(nll, tokens, int(sum(rows["n_chars"])), len(rows["input_ids"]))
    return {k: m[k] for k in ("loss", "perplexity", "bpc", "tokens", "chars")}
