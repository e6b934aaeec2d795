"""Evaluation results as a table (terminal and Markdown) and as files: JSON, Markdown, submission files."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# (metric key, label, format, higher is better)
TEXT_METRICS = (
    ("bpc", "bits/char", "{:.4f}", False),
    ("perplexity", "perplexity", "{:.2f}", False),
    ("tokens_per_char", "tokens/char", "{:.3f}", False),
)


# which way each headline label of metric_rows is better: lower for these, none for these (counts, speeds and
# per-token figures that differ between tokenizers), higher for the rest that are percentages, F1 or accuracy
LOWER_IS_BETTER = frozenset({"bits/char", "response bits/char", "replies with U+FFFD", "repetitive replies"})
NOT_A_SCORE = frozenset({"perplexity", "tokens/char", "Han chars/s"})


def direction(fmt: str, label: str) -> int:
    """+1 when higher is better, -1 when lower is, 0 for figures that are not scores and for sub-rows
    (labels that start with spaces: per label, per category, counts)."""
    if label.startswith(" ") or label in NOT_A_SCORE:
        return 0
    if label in LOWER_IS_BETTER:
        return -1
    return 1 if fmt == "pct" or label in ("F1", "accuracy") else 0


def _pct(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def _num(fmt: str, v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def metric_rows(
    summary: dict[str, Any], show_subjects: bool = False
) -> Iterator[tuple[str, str, str, list[Any]]]:
    """(task, metric, value format, raw value per model) for every headline metric."""
    models = list(summary["results"])
    for task, spec in summary["tasks"].items():
        res = [summary["results"][m].get(task) or {} for m in models]
        kind = spec["kind"]
        if kind == "text":
            for key, label, fmt, _ in TEXT_METRICS:
                yield task, label, fmt, [r.get(key) for r in res]
        elif kind == "task":
            yield from _task_rows(task, spec["metric"], res)
        else:
            yield task, "average", "pct", [r.get("average") for r in res]
            cats = list(dict.fromkeys(c for r in res for c in (r.get("categories") or {})))
            for c in cats:
                yield task, f"  {c}", "pct", [(r.get("categories") or {}).get(c) for r in res]
            if show_subjects:
                subs = list(dict.fromkeys(s for r in res for s in (r.get("subjects") or {})))
                for s in subs:
                    yield (
                        task,
                        f"    {s}",
                        "pct",
                        [((r.get("subjects") or {}).get(s) or {}).get("accuracy") for r in res],
                    )
            unanswered = [r.get("unanswered") or 0 for r in res]
            if any(unanswered):
                yield task, "  predicted for submission", "{:d}", unanswered


def _response_rows(task: str, res: list[dict]) -> Iterator[tuple[str, str, str, list[Any]]]:
    """``--task_metric response``: reply bits per character (where the records have reference replies), broken
    and looping greedy replies and their speed (where replies were written)."""
    rows = [
        ("response_bpc", "response bits/char", "{:.4f}"),
        ("prompts_cut", "  prompts cut to fit", "{:d}"),
        ("too_long", "  replies too long to score", "{:d}"),
        ("fffd_share", "replies with U+FFFD", "pct"),
        ("repetition_share", "repetitive replies", "pct"),
        ("chars_per_s", "Han chars/s", "{:.1f}"),
        ("tokens_per_char", "tokens/char", "{:.3f}"),
    ]
    for key, label, fmt in rows:
        values = [r.get(key) for r in res]
        # counts of cut prompts only when some are not 0; the other figures wherever they were measured
        if any(values) if fmt == "{:d}" else any(v is not None for v in values):
            yield task, label, fmt, values


def _task_rows(task: str, metric: str, res: list[dict]) -> Iterator[tuple[str, str, str, list[Any]]]:
    if metric == "response":
        yield from _response_rows(task, res)
        return
    label = {
        "labels": "accuracy", "cloze": "accuracy", "contains": "reply contains reference",
        "preference": "chosen likelier",
    }.get(metric, "exact match")  # fmt: skip
    yield task, label, "pct", [r.get("accuracy") for r in res]
    if metric == "preference":
        yield task, "  per token", "pct", [r.get("accuracy_normalized") for r in res]
        yield task, "  mean margin (nats)", "{:+.3f}", [r.get("mean_margin") for r in res]
    if metric == "f1":
        yield task, "F1", "pct", [r.get("f1") for r in res]
    labels = list((res[0].get("per_label") or {}).keys()) if res else []
    for lab in labels:
        yield task, f"  {lab}", "pct", [(r.get("per_label") or {}).get(lab) for r in res]
    if metric == "cloze":
        for pos in dict.fromkeys(p for r in res for p in (r.get("per_pos") or {})):
            yield (
                task,
                f"  pos {pos}",
                "pct",
                [((r.get("per_pos") or {}).get(pos) or {}).get("accuracy") for r in res],
            )
    if metric in ("exact", "contains", "f1"):
        yield task, "Han chars/s", "{:.1f}", [r.get("chars_per_s") for r in res]
        yield task, "tokens/char", "{:.3f}", [r.get("tokens_per_char") for r in res]


def cells(fmt: str, values: list[Any]) -> list[str]:
    return [_pct(v) if fmt == "pct" else _num(fmt, v) for v in values]


def results_table(summary: dict[str, Any], show_subjects: bool = False) -> str:
    models = list(summary["results"])
    rows = [["task", "metric", *models]]
    last = None
    for task, metric, fmt, values in metric_rows(summary, show_subjects):
        rows.append([task if task != last else "", metric, *cells(fmt, values)])
        last = task
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(rows[0]), "  ".join("-" * w for w in widths), *[line(r) for r in rows[1:]]])


def samples(summary: dict[str, Any]) -> Iterator[tuple[str, str, str, dict[str, str]]]:
    """(task, prompt, reference or None, {model: reply}) for each sample reply kept (``--sample_replies``)."""
    models = list(summary["results"])
    for task in summary["tasks"]:
        kept = [(m, (summary["results"][m].get(task) or {}).get("samples") or []) for m in models]
        for i, first in enumerate(max((k for _, k in kept), key=len)):
            replies = {m: k[i]["reply"] for m, k in kept if i < len(k)}
            yield task, first["prompt"], first["reference"], replies


def samples_text(summary: dict[str, Any]) -> str:
    """The sample replies for the terminal: each prompt, every model's reply, the reference."""
    models = list(summary["results"])
    width = max([len(m) for m in models] + [len("reference")])
    out = []
    for task, prompt, ref, replies in samples(summary):
        out += ["", f"{task}: {prompt}"]
        out += [f"  {m:<{width}}  {r}" for m, r in replies.items()]
        if ref is not None:  # prompts alone (--task_metric response) have none
            out.append(f"  {'reference':<{width}}  {ref}")
    return "\n".join(out[1:])


def markdown_table(summary: dict[str, Any], show_subjects: bool = False) -> str:
    models = list(summary["results"])
    out = ["| task | metric | " + " | ".join(models) + " |", "|---|---|" + "---:|" * len(models)]
    for task, metric, fmt, values in metric_rows(summary, show_subjects):
        out.append(f"| {task} | {metric.strip()} | " + " | ".join(cells(fmt, values)) + " |")
    return "\n".join(out)


def _clean(obj: Any) -> Any:
    """JSON without NaN/inf (written as null), so every JSON reader accepts it."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_outputs(summary: dict[str, Any], out_dir: Path, cfg: Any = None) -> list[Path]:
    """eval_results.json, eval_results.md and one C-Eval-style submission file per model and task."""
    from zhtune.atomic import atomic_write_text
    from zhtune.config.parse import versions

    written = []
    for model, per_task in summary["results"].items():
        for task, res in per_task.items():
            preds = res.pop("predictions", None) if isinstance(res, dict) else None
            if preds:
                name = (
                    f"submission_{task}.json"
                    if len(summary["results"]) == 1
                    else f"submission_{task}_{model}.json"
                )
                path = out_dir / name
                atomic_write_text(path, json.dumps(preds, ensure_ascii=False, indent=1))
                res["submission"] = str(path)
                written.append(path)
    data = dict(summary)
    if cfg is not None:
        data["config"] = cfg.to_dict()
    data["versions"] = versions()
    js = out_dir / "eval_results.json"
    atomic_write_text(js, json.dumps(_clean(data), ensure_ascii=False, indent=2))
    md = out_dir / "eval_results.md"
    atomic_write_text(md, markdown_table(summary, show_subjects=True) + "\n")
    return [js, md, *written]
