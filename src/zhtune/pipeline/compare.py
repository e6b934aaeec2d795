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


def _fmt_tokens(n: float | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(round(n))


def _spread(values: list[Any]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation or None for one value, count) of the finite numbers in ``values``."""
    xs = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not xs:
        return None, None, 0
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return mean, std, len(xs)


def _cell(fmt: str, values: list[Any]) -> str:
    from zhtune.eval.report import cells

    mean, std, n = _spread(values)
    if mean is None or std is None:
        return cells(fmt, [mean])[0]
    if fmt == "pct":
        return f"{100 * mean:.1f}% ± {100 * std:.1f}"
    if fmt == "{:d}":
        return f"{mean:.1f} ± {std:.1f}"
    return f"{fmt.format(mean)} ± {fmt.format(std)}"


def _metrics(by_arm: dict[str, list[dict[str, Any]]]) -> tuple[list[str], dict[tuple, tuple[str, list]]]:
    """Columns (base, then each arm's compared model) and, per (task, metric), its format and every column's
    values over the seeds."""
    from zhtune.eval.report import metric_rows

    n = max(len(v) for v in by_arm.values())
    columns: list[str] = []
    rows: dict[tuple, tuple[str, list]] = {}
    for k in range(n):  # the k-th seed of every arm
        summary = combined([runs[k] for runs in by_arm.values() if k < len(runs)])
        if not summary:
            continue
        for col in summary["results"]:
            if col not in columns:
                columns.insert(0 if col == "base" else len(columns), col)
        for task, metric, fmt, values in metric_rows(summary):
            _, per_col = rows.setdefault((task, metric), (fmt, []))
            for col, v in zip(summary["results"], values):
                per_col.append((col, v))
    return columns, {key: (fmt, [[v for c, v in got if c == col] for col in columns]) for key, (fmt, got) in
                     rows.items()}  # fmt: skip


def write_comparison(
    run_dir: Path, runs: list[tuple[str, int | None]], compare_model: str | None = None
) -> Path:
    """The report of the arms ``runs`` ((arm, seed or None) each) under ``run_dir``/arms."""
    from zhtune.atomic import atomic_write_text
    from zhtune.eval.report import direction
    from zhtune.pipeline.report import _cell as md
    from zhtune.pipeline.report import _fmt_s, bar_grid

    out = run_dir / "compare"
    out.mkdir(parents=True, exist_ok=True)
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for name, seed in runs:
        d = run_dir / "arms" / name / (f"seed-{seed}" if seed is not None else "")
        f = d / "pipeline_state.json"
        state = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
        by_arm.setdefault(name, []).append({**arm_summary(name, state, compare_model), "seed": seed})
    seeds = sorted({s for _, s in runs if s is not None})
    lines = [f"# Arms compared: {run_dir.name}", ""]
    if seeds:
        lines += [f"Each arm ran once per training seed ({', '.join(map(str, seeds))}); a cell is the mean ± the "
                  "sample standard deviation over the seeds that finished.", ""]  # fmt: skip
    lines += ["| arm | stages | compared model | training tokens | training time | all stages | status |"]
    lines += ["|---|---|---|---:|---:|---:|---|"]
    for name, group in by_arm.items():
        a = group[0]
        about = f" ({md(a['about'])})" if a["about"] else ""
        tokens, _, _ = _spread([g["train_tokens"] for g in group])
        train_s, _, _ = _spread([g["train_seconds"] for g in group])
        all_s, _, _ = _spread([g["stage_seconds"] for g in group])
        done = sum(g["done"] for g in group)
        status = ("done" if done else "not finished") if len(group) == 1 else f"{done} of {len(group)} done"
        lines.append(
            f"| {name}{about} | {', '.join(a['stages']) or '-'} | {a['model'] or '-'} | {_fmt_tokens(tokens)} | "
            f"{_fmt_s(train_s)} | {_fmt_s(all_s)} | {status} |"
        )
    lines.append("")
    tokens = [t for g in by_arm.values() for t in [_spread([x["train_tokens"] for x in g])[0]] if t]
    if len(tokens) > 1 and max(tokens) > (1 + MATCHED) * min(tokens):
        lines += [
            f"The arms trained on unequal token counts ({_fmt_tokens(min(tokens))} to {_fmt_tokens(max(tokens))}):"
            " a difference between them is also a difference in training budget.",
            "",
        ]
    every = [a for g in by_arm.values() for a in g]
    digests = {json.dumps(a["data"], sort_keys=True) for a in every if a["data"]}
    if len(digests) > 1:
        lines += [
            "**The arms' data files differ** (their digests are in arms.json): they are not comparable.",
            "",
        ]
    elif digests:
        lines += ["Every arm read the same data files (same SHA-256 digests).", ""]
    columns, metrics = _metrics(by_arm) if any(a["results"] is not None for a in every) else ([], {})
    bars = []
    if metrics:
        lines += ["## Held-out evaluation", "", "| task | metric | " + " | ".join(columns) + " | best |"]
        lines.append("|---|---|" + "---:|" * len(columns) + "---|")
        for (task, metric), (fmt, per_col) in metrics.items():
            sign = direction(fmt, metric)
            means = [_spread(v)[0] for v in per_col]
            arm_means = [(c, m) for c, m in zip(columns, means) if c != "base" and m is not None]
            best = "-"
            if sign and len(arm_means) > 1:
                top = max(sign * m for _, m in arm_means)
                winners = [c.split(" (")[0] for c, m in arm_means if sign * m >= top - 1e-12]
                best = winners[0] if len(winners) == 1 else "tie"
            row = " | ".join(_cell(fmt, v) for v in per_col)
            lines.append(f"| {task} | {metric.strip()} | {row} | {best} |")
            if sign and not metric.startswith(" "):
                bars.append((f"{task}: {metric.strip()}", fmt, per_col))
        lines += [
            "",
            "bits/char: held-out text in bits per character, lower is better and comparable across tokenizers; "
            "perplexity is per token and is not (an extended vocabulary changes what a token is).",
            "",
        ]
    if bars:
        panels = []
        for title, fmt, per_col in bars:
            stats = [_spread(v) for v in per_col]
            errors = [sd for _, sd, _ in stats] if seeds else None
            panels.append((title, fmt, [m for m, _, _ in stats], errors))
        colors = ["#999999" if c == "base" else "#3b7dd8" for c in columns]
        bar_grid(out / "arms.png", [c.split(" (")[0] for c in columns], colors, panels)
        lines += ["![arms](arms.png)", ""]
    own = [f"`{a['arm']}" + (f"/seed-{a['seed']}" if a["seed"] is not None else "") + "/report/report.md`"
           for a in every]  # fmt: skip
    lines += ["Each run's own report, under `arms/`: " + ", ".join(own), ""]
    compared = {f"{k[0]} / {k[1].strip()}": dict(zip(columns, v[1])) for k, v in metrics.items()}
    atomic_write_text(
        out / "arms.json",
        json.dumps({"arms": every, "seeds": seeds, "compared": compared}, ensure_ascii=False, indent=2,
                   default=str),
    )  # fmt: skip
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
