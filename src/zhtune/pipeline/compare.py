"""The arms of a recipe side by side: ``<run_dir>/compare/report.md``, ``arms.json`` and ``arms.png``.

``zhtune pipeline recipe.yaml --compare plain,pt,full`` runs each arm in ``<run_dir>/arms/<arm>`` (see
:func:`zhtune.pipeline.recipe.arm_args`) and this module puts them in one table: every eval metric of each
arm's compared model (``--compare_model``, else the last model its eval stage scores) beside the base model,
what each arm cost (training tokens, training time, all stages' time) and whether the arms really read the
same data (the demo data files' digests). Arms are matched by the recipe (its step counts), not here: the
report states the tokens and time each one trained, so a comparison at unequal budgets is plain to see.
The report is rewritten after every arm, so a long comparison shows its finished arms while the rest run.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

TRAINING = ("pt", "sft", "dpo", "grpo")
MATCHED = 0.05  # arms within 5% of each other's training tokens are "matched"


def _digest(path: str) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def arm_summary(name: str, state: dict[str, Any], compare_model: str | None) -> dict[str, Any]:
    """What the comparison needs of one arm's pipeline_state.json."""
    stages = state.get("stages") or {}
    train = [r for r in stages.values() if r.get("command") in TRAINING and r.get("status") == "done"]
    tokens = [(r.get("result") or {}).get("train_tokens") for r in train]
    evals = [r for r in stages.values() if r.get("command") == "eval" and r.get("status") == "done"]
    summary = (evals[-1].get("result") or {}) if evals else {}
    models = [m for m in summary.get("results") or {} if m != "base"]
    model = compare_model if compare_model in models else (models[-1] if models else None)
    data = {}
    for r in stages.values():
        if r.get("command") == "demo_data" and r.get("status") == "done":
            data = {
                k: _digest(v) for k, v in sorted(((r.get("state_after") or {}).get("data") or {}).items())
            }
    return {
        "arm": name,
        "about": state.get("about"),
        "stages": [n for n in stages if not n.endswith("-input")],
        "done": bool(stages) and all(r.get("status") == "done" for r in stages.values()),
        "train_tokens": sum(t for t in tokens if t) if train and all(tokens) else None,
        "train_seconds": round(sum(r.get("seconds") or 0 for r in train), 1),
        "stage_seconds": round(sum(r.get("seconds") or 0 for r in stages.values()), 1),
        "model": model,
        "results": (summary.get("results") or {}).get(model) if model else None,
        "base": (summary.get("results") or {}).get("base"),
        "tasks": summary.get("tasks") or {},
        "data": data,
    }


def combined(arms: list[dict[str, Any]]) -> dict[str, Any] | None:
    """An eval summary whose models are the base and each arm's compared model (eval.report reads it)."""
    scored = [a for a in arms if a["results"] is not None]
    if not scored:
        return None
    results: dict[str, Any] = {}
    base = next((a["base"] for a in scored if a["base"] is not None), None)
    if base is not None:
        results["base"] = base
    for a in scored:
        results[f"{a['arm']} ({a['model']})"] = a["results"]
    tasks = {}
    for a in scored:
        tasks.update({k: v for k, v in a["tasks"].items() if k not in tasks})
    return {"results": results, "tasks": tasks}


def _better(fmt: str, metric: str) -> int:
    """+1 when higher is better, -1 when lower is, 0 when the metric is not a score (counts, speeds)."""
    if metric.strip() in ("bits/char", "response bits/char", "replies with U+FFFD", "repetitive replies"):
        return -1
    if metric.strip() in ("perplexity", "tokens/char", "Han chars/s") or metric.startswith(" "):
        return 0
    return 1 if fmt == "pct" or metric.strip() in ("F1", "accuracy") else 0


def _fmt_tokens(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def write_comparison(run_dir: Path, names: list[str], compare_model: str | None = None) -> Path:
    from zhtune.atomic import atomic_write_text
    from zhtune.eval.report import cells, metric_rows
    from zhtune.pipeline.report import _cell, _fmt_s, _plt, _save

    out = run_dir / "compare"
    out.mkdir(parents=True, exist_ok=True)
    arms = []
    for name in names:
        f = run_dir / "arms" / name / "pipeline_state.json"
        state = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
        arms.append(arm_summary(name, state, compare_model))
    lines = [f"# Arms compared: {run_dir.name}", ""]
    lines += ["| arm | stages | compared model | training tokens | training time | all stages | status |"]
    lines += ["|---|---|---|---:|---:|---:|---|"]
    for a in arms:
        about = f" ({_cell(a['about'])})" if a["about"] else ""
        lines.append(
            f"| {a['arm']}{about} | {', '.join(a['stages']) or '-'} | {a['model'] or '-'} | "
            f"{_fmt_tokens(a['train_tokens'])} | {_fmt_s(a['train_seconds'])} | {_fmt_s(a['stage_seconds'])} | "
            f"{'done' if a['done'] else 'not finished'} |"
        )
    lines.append("")
    tokens = [a["train_tokens"] for a in arms if a["train_tokens"]]
    if len(tokens) > 1 and max(tokens) > (1 + MATCHED) * min(tokens):
        lines += [
            f"The arms trained on unequal token counts ({_fmt_tokens(min(tokens))} to {_fmt_tokens(max(tokens))}):"
            " a difference between them is also a difference in training budget.",
            "",
        ]
    digests = {json.dumps(a["data"], sort_keys=True) for a in arms if a["data"]}
    if len(digests) > 1:
        lines += [
            "**The arms' data files differ** (their digests are in arms.json): they are not comparable.",
            "",
        ]
    elif digests:
        lines += ["Every arm read the same data files (same SHA-256 digests).", ""]
    summary = combined(arms)
    bars = []
    if summary:
        models = list(summary["results"])
        lines += ["## Held-out evaluation", "", "| task | metric | " + " | ".join(models) + " | best |"]
        lines.append("|---|---|" + "---:|" * len(models) + "---|")
        for task, metric, fmt, values in metric_rows(summary):
            sign = _better(fmt, metric)
            best = "-"
            arm_vals = [(m, v) for m, v in zip(models, values) if m != "base"]
            arm_vals = [(m, v) for m, v in arm_vals if isinstance(v, (int, float)) and math.isfinite(v)]
            if sign and len(arm_vals) > 1:
                top = max(sign * v for _, v in arm_vals)
                winners = [m.split(" (")[0] for m, v in arm_vals if sign * v >= top - 1e-12]
                best = winners[0] if len(winners) == 1 else "tie"
            lines.append(f"| {task} | {metric.strip()} | " + " | ".join(cells(fmt, values)) + f" | {best} |")
            if sign and not metric.startswith(" "):
                bars.append((f"{task}: {metric.strip()}", fmt, values))
        lines += [
            "",
            "bits/char: held-out text in bits per character, lower is better and comparable across tokenizers; "
            "perplexity is per token and is not (an extended vocabulary changes what a token is).",
            "",
        ]
    if bars:
        plt = _plt()
        cols = min(3, len(bars))
        rows = math.ceil(len(bars) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), dpi=100, squeeze=False)
        models = list(summary["results"])
        for ax, (title, fmt, values) in zip(axes.flat, bars):
            vals = [
                (100 * v if fmt == "pct" else v) if isinstance(v, (int, float)) and math.isfinite(v) else 0.0
                for v in values
            ]
            colors = ["#999999" if m == "base" else "#3b7dd8" for m in models]
            ax.bar(range(len(models)), vals, color=colors)
            ax.set_xticks(range(len(models)), [m.split(" (")[0] for m in models], rotation=30, fontsize=8)
            ax.set_title(title, fontsize=9)
            ax.grid(axis="y", alpha=0.3)
        for ax in list(axes.flat)[len(bars) :]:
            ax.axis("off")
        _save(fig, out / "arms.png")
        lines += ["![arms](arms.png)", ""]
    lines += ["Each arm's own report: " + ", ".join(f"`arms/{a['arm']}/report/report.md`" for a in arms), ""]
    atomic_write_text(
        out / "arms.json",
        json.dumps({"arms": arms, "compared": summary}, ensure_ascii=False, indent=2, default=str),
    )
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
