"""Preference accuracy on held-out pairs: does the model find the chosen reply likelier than the rejected one?

``zhtune eval --task_file pairs.jsonl --task_metric preference`` reads preference pairs in any layout
``zhtune dpo`` reads (:mod:`zhtune.text.preference`), encodes each prompt and reply exactly as preference
training does (:func:`zhtune.train.pref_data.encode_pair`: the reply's tokens and its end-of-turn token),
and scores the log-likelihood of each reply's tokens given the prompt (:func:`zhtune.score.nll.sequence_nll`).

* ``accuracy``: the share of pairs whose chosen reply has the higher summed log-likelihood (ties count half);
* ``accuracy_normalized``: the same with the log-likelihood per reply token (so a short reply is not favoured
  for being short);
* ``mean_margin``: the mean of chosen minus rejected log-likelihood (nats), ``mean_margin_per_token`` that of
  the per-token values.

Pairs longer than ``--max_seq_length`` are cut by the training rule (:func:`zhtune.train.pref_data.truncate`,
with ``max_prompt_length`` half the window): a prompt keeps at most half of the window (its last tokens), then
the replies lose their ends; a pair whose cut leaves two equal replies is counted in ``dropped``, not scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.errors import DataError


@dataclass
class PreferenceOptions:
    file: str
    metric: str = "preference"
    max_samples: int | None = None
    batch_size: int = 8
    system_prompt: str | None = None
    max_seq_length: int = 1024


def encode_pairs(tok: Any, fmt: Any, opts: PreferenceOptions) -> tuple[list[tuple[list[int], ...]], int]:
    """(prompt, chosen, rejected) ids of each usable pair of the file, and how many were dropped."""
    from zhtune.text.encode import SegmentEncoder
    from zhtune.text.preference import Pair, read_preferences
    from zhtune.train.pref_data import KEPT, encode_pair, truncate

    path = Path(opts.file)
    if not path.is_file():
        raise DataError(path, None, "preference file does not exist")
    enc = SegmentEncoder(tok)
    bos = getattr(tok, "bos_token_id", None)
    out, dropped = [], 0
    for _, _, pair in read_preferences([path], kind="pair"):
        if opts.system_prompt and pair.prompt[0]["role"] != "system":
            pair = Pair(
                [{"role": "system", "content": opts.system_prompt}, *pair.prompt], pair.chosen, pair.rejected
            )
        p, c, r = encode_pair(fmt, enc, pair)
        window = opts.max_seq_length
        p, (c, r), status = truncate(p, [c, r], window, max_prompt_length=window // 2, bos_id=bos)
        if status in KEPT:
            out.append((p, c, r))
        else:
            dropped += 1
        if opts.max_samples and len(out) >= opts.max_samples:
            break
    if not out:
        raise DataError(path, None, f"no pair to score ({dropped} equal once cut to --max_seq_length)")
    return out, dropped


def reply_logprobs(model: Any, pairs: list[tuple[list[int], ...]], batch_size: int) -> tuple[list, list]:
    """Summed log-likelihood of the chosen and of the rejected reply of each pair, given its prompt."""
    from zhtune.score.nll import sequence_nll

    items = [(p + reply, len(p)) for p, c, r in pairs for reply in (c, r)]
    nll = sequence_nll(model, items, batch_size, desc="scoring pairs").tolist()
    return [-x for x in nll[0::2]], [-x for x in nll[1::2]]


def summarize(chosen: list[float], rejected: list[float], n_chosen: list[int], n_rejected: list[int]) -> dict:
    """The metrics of the module docstring from log-likelihoods and reply lengths in tokens."""

    def wins(a: list[float], b: list[float]) -> float:
        return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)

    norm_c = [x / n for x, n in zip(chosen, n_chosen)]
    norm_r = [x / n for x, n in zip(rejected, n_rejected)]
    return {
        "metric": "preference",
        "accuracy": wins(chosen, rejected),
        "accuracy_normalized": wins(norm_c, norm_r),
        "mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / len(chosen),
        "mean_margin_per_token": sum(c - r for c, r in zip(norm_c, norm_r)) / len(chosen),
        "n": len(chosen),
    }


def evaluate(model: Any, tok: Any, fmt: Any, opts: PreferenceOptions) -> dict[str, Any]:
    pairs, dropped = encode_pairs(tok, fmt, opts)
    chosen, rejected = reply_logprobs(model, pairs, opts.batch_size)
    out = summarize(chosen, rejected, [len(c) for _, c, _ in pairs], [len(r) for _, _, r in pairs])
    out["dropped"] = dropped
    return out
