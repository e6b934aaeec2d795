"""The cloze task of ``zhtune eval --task_file items.jsonl --task_metric cloze``.

Each line of the item file is one question (written by ``python -m zhtune.demo.cloze`` from held-out
People's Daily, or by hand)::

    {"text": "国家主席江泽民发表____讲话。", "options": ["新年", "国庆", "重要", "电视"], "answer": 0, "pos": "t"}

``text`` holds the blank ``____`` once; ``answer`` is the index of the right option; ``pos`` (optional)
groups the accuracy by part of speech. Each option is scored by the log-likelihood of the whole filled
sentence as plain text (:mod:`zhtune.score.cloze`); the likeliest is the prediction. Reported: accuracy,
the chance level (the mean of 1 / options), accuracy per part of speech and a few wrong answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.errors import DataError
from zhtune.score.cloze import BLANK


@dataclass
class ClozeItem:
    line: int
    text: str
    options: list[str]
    answer: int
    pos: str | None = None


def parse_item(path: Path, line: int, rec: Any) -> ClozeItem:
    """One checked item; anything malformed is a DataError naming the file, line and field."""
    if not isinstance(rec, dict):
        raise DataError(path, line, "a cloze item is an object with text, options and answer")
    for key in ("text", "options", "answer"):
        if key not in rec:
            raise DataError(path, line, f"missing field {key!r} (a cloze item has text, options, answer)")
    text, options, answer = rec["text"], rec["options"], rec["answer"]
    if not isinstance(text, str) or text.count(BLANK) != 1:
        raise DataError(path, line, f"field 'text' must be a string with exactly one blank {BLANK!r}")
    if (
        not isinstance(options, list)
        or len(options) < 2
        or not all(isinstance(o, str) and o for o in options)
    ):
        raise DataError(path, line, "field 'options' must be a list of at least 2 non-empty strings")
    if len(set(options)) != len(options):
        raise DataError(path, line, f"field 'options' repeats an option: {options}")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(options):
        raise DataError(
            path, line, f"field 'answer' must be an option index 0-{len(options) - 1}, got {answer!r}"
        )
    pos = rec.get("pos")
    return ClozeItem(line, text, list(options), answer, str(pos) if pos is not None else None)


def read_items(path: str | Path, max_samples: int | None = None) -> list[ClozeItem]:
    from zhtune.text.records import iter_json_records

    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "task file does not exist")
    out = []
    for line, rec in iter_json_records(path):
        out.append(parse_item(path, line, rec))
        if max_samples and len(out) >= max_samples:
            break
    if not out:
        raise DataError(path, None, "no cloze items")
    return out


def context_tokens(model: Any) -> int | None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(cfg, "max_position_embeddings", None)


def evaluate(model: Any, tok: Any, opts: Any) -> dict[str, Any]:
    """Accuracy on the items of ``opts.file`` (a :class:`zhtune.eval.tasks.TaskOptions`)."""
    from zhtune.score.cloze import encode, option_logprobs, predict

    items = read_items(opts.file, opts.max_samples)
    encoded = encode(tok, [(it.text, it.options) for it in items])
    limit = context_tokens(model)
    for it, ids in zip(items, encoded):
        longest = max(len(x) for x in ids)
        if limit and longest > limit:
            raise DataError(
                opts.file, it.line, f"a filled sentence has {longest} tokens; the model takes at most {limit}"
            )
    scores = option_logprobs(model, encoded, batch_size=opts.batch_size)
    pred = predict(scores)
    correct = [p == it.answer for p, it in zip(pred, items)]
    per_pos: dict[str, list[bool]] = {}
    for it, ok in zip(items, correct):
        if it.pos is not None:
            per_pos.setdefault(it.pos, []).append(ok)
    wrong = [
        {"text": it.text, "options": it.options, "answer": it.options[it.answer], "predicted": it.options[p]}
        for it, p, ok in zip(items, pred, correct)
        if not ok
    ]
    return {
        "metric": "cloze",
        "accuracy": sum(correct) / len(correct),
        "n": len(correct),
        "chance": sum(1 / len(it.options) for it in items) / len(items),
        "per_pos": {
            k: {"accuracy": sum(v) / len(v), "n": len(v)}
            for k, v in sorted(per_pos.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        },
        "examples_wrong": wrong[:5],
    }
