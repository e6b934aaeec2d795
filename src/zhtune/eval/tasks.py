"""Task accuracy on an instruction set with reference outputs (Alpaca, ShareGPT or messages records).

The conversation up to the last assistant turn is the prompt; that turn is the reference. Metrics:

* ``labels``: classification (sentiment, topic ...) by label likelihood (:mod:`zhtune.score.labels`): each
  of a fixed set of answers is scored as the reply and the likeliest one is the prediction. The label set
  is ``labels`` or every distinct reference. Fair to a base model that does not follow an output format.
* ``exact``: the greedy reply equals the reference (whitespace and final punctuation aside).
* ``contains``: the greedy reply contains the reference.
* ``f1``: items of structured answers (``人名：甲、乙；地名：无``: fields split at ；/; or new lines, items at
  、/，/, and keyed by the text before ：) compared as sets; micro precision, recall and F1 over the whole set,
  plus the share of replies that are exactly right. For extraction tasks such as NER.
* ``cloze``: the file holds cloze items instead (:mod:`zhtune.eval.cloze`): the option whose filled
  sentence is likeliest is the prediction.
* ``preference``: the file holds preference pairs instead (:mod:`zhtune.eval.preference`): the share of pairs
  whose chosen reply the model finds likelier than the rejected one, and the mean margin.
* ``response``: what a person sees of the assistant (:mod:`zhtune.eval.quality`): bits per character of the
  reference replies, and the share of greedy replies with a broken character or a repetition loop. Records
  may be prompts without a reply, and ``builtin:zh_prompts`` names a fixed set of everyday Chinese prompts.

Tasks scored on greedy replies also report how fast they were written (:mod:`zhtune.eval.greedy`): Chinese
(Han) characters of the replies per second of generation (``chars_per_s``) and tokens generated per character
of reply (``tokens_per_char``, the end-of-turn token included).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zhtune.errors import DataError
from zhtune.eval.greedy import Replies, generation_speed, greedy_replies, with_system
from zhtune.score.replies import item_counts, items, match, normalize  # noqa: F401 - names of this module
from zhtune.text.records import iter_json_records, to_messages
from zhtune.text.templates import Message

METRICS = ("labels", "exact", "contains", "f1", "cloze", "preference", "response")
MAX_LABELS = 50


@dataclass
class TaskOptions:
    file: str
    metric: Literal["labels", "exact", "contains", "f1", "cloze"] = "labels"
    labels: list[str] | None = None
    max_samples: int | None = None
    max_new_tokens: int = 64
    batch_size: int = 8
    system_prompt: str | None = None
    sample_replies: int = 0  # keep the greedy replies to the first N records (any metric)


def read_items(path: str | Path, max_samples: int | None = None) -> list[tuple[int, list[Message], str]]:
    """(line, prompt messages, reference) of each record."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "task file does not exist")
    out = []
    for line, rec in iter_json_records(path):
        try:
            _, msgs = to_messages(rec)
        except ValueError as e:
            raise DataError(path, line, str(e)) from None
        out.append((line, msgs[:-1], msgs[-1]["content"]))
        if max_samples and len(out) >= max_samples:
            break
    if not out:
        raise DataError(path, None, "no records")
    return out


def evaluate(model: Any, tok: Any, fmt: Any, opts: TaskOptions, engine: Any = None) -> dict[str, Any]:
    """Score one task file. ``engine``: a started engine for the greedy replies (default: transformers
    generate on ``model``)."""
    if opts.metric == "cloze":
        from zhtune.eval import cloze

        return cloze.evaluate(model, tok, opts)
    if opts.metric == "preference":
        from zhtune.eval import preference

        return preference.evaluate(model, tok, fmt, opts)
    if opts.metric == "response":
        from zhtune.eval import quality

        return quality.evaluate(model, tok, fmt, opts, engine)
    recs = read_items(opts.file, opts.max_samples)
    prompts = [with_system(m, opts.system_prompt) for _, m, _ in recs]
    refs = [r for _, _, r in recs]
    if opts.metric == "labels":
        out = _labels(model, tok, fmt, opts, recs, prompts, refs)
        replies = greedy_replies(model, tok, fmt, prompts[: opts.sample_replies], opts, engine)
    else:
        replies = greedy_replies(model, tok, fmt, prompts, opts, engine)
        out = _generated(opts, prompts, refs, replies)
    if opts.sample_replies:
        out["samples"] = [
            {"prompt": p[-1]["content"], "reference": ref, "reply": r}
            for p, ref, r in zip(prompts, refs, replies.texts[: opts.sample_replies])
        ]
    return out


def _labels(model, tok, fmt, opts, recs, prompts, refs) -> dict[str, Any]:  # noqa: ANN001
    from zhtune.score.labels import label_scores

    labels = list(opts.labels or sorted(set(refs)))
    if len(labels) > MAX_LABELS:
        raise DataError(
            opts.file,
            None,
            f"{len(labels)} distinct reference outputs: too many for a label set; use --task_metric exact or "
            "contains, or give --labels",
        )
    for (line, _, _), ref in zip(recs, refs):
        if ref not in labels:
            raise DataError(opts.file, line, f"reference {ref!r} is not one of the labels {labels}")
    scores = label_scores(model, tok, fmt, prompts, labels, batch_size=opts.batch_size)
    pred = [labels[i] for i in scores.argmax(-1).tolist()]
    correct = [p == r for p, r in zip(pred, refs)]
    per_label = {}
    for lab in labels:
        idx = [i for i, r in enumerate(refs) if r == lab]
        per_label[lab] = sum(correct[i] for i in idx) / len(idx) if idx else None
    return {
        "metric": "labels",
        "accuracy": sum(correct) / len(correct),
        "n": len(correct),
        "per_label": per_label,
        "predicted": {lab: pred.count(lab) for lab in labels},
    }


def _generated(
    opts: TaskOptions, prompts: list[list[Message]], refs: list[str], gen: Replies
) -> dict[str, Any]:
    replies = gen.texts
    correct = [
        match("exact" if opts.metric == "f1" else opts.metric, r, ref) for r, ref in zip(replies, refs)
    ]
    wrong = [
        {"prompt": p[-1]["content"], "reference": ref, "reply": r}
        for p, ref, r, ok in zip(prompts, refs, replies, correct)
        if not ok
    ]
    out: dict[str, Any] = {"metric": opts.metric, "accuracy": sum(correct) / len(correct), "n": len(correct)}
    if opts.metric == "f1":
        tp = fp = fn = 0
        for r, ref in zip(replies, refs):
            t, f, n = item_counts(r, ref)
            tp, fp, fn = tp + t, fp + f, fn + n
        p = tp / (tp + fp) if tp + fp else 0.0
        rc = tp / (tp + fn) if tp + fn else 0.0
        out.update(f1=2 * p * rc / (p + rc) if p + rc else 0.0, precision=p, recall=rc)
    out.update(generation_speed(replies, gen.tokens, gen.seconds))
    out["examples_wrong"] = wrong[:5]
    return out
