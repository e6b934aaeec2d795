"""Eval results of several runs side by side, and what a run's output is (for chat, merge and export).

Results are the files the commands already write: ``eval_results.json`` of a ``zhtune eval`` run, and the
eval stages of a pipeline run (``pipeline_state.json``, whose report under ``report/`` has the plots). Rows
are the metrics :func:`zhtune.eval.report.metric_rows` gives, one column per run and model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from zhtune.eval.report import cells, metric_rows


def summaries(out: Path) -> list[tuple[str, dict[str, Any]]]:
    """(label, eval summary) of a run's output folder: its eval_results.json and its pipeline's eval stages."""
    found: list[tuple[str, dict[str, Any]]] = []
    own = out / "eval_results.json"
    if own.is_file():
        found.append(("", json.loads(own.read_text(encoding="utf-8"))))
    state = out / "pipeline_state.json"
    if state.is_file():
        stages = json.loads(state.read_text(encoding="utf-8")).get("stages", {})
        for name, rec in stages.items():
            result = rec.get("result")
            if rec.get("command") == "eval" and rec.get("status") == "done" and isinstance(result, dict):
                if "results" in result and "tasks" in result:
                    found.append((name, result))
    return found


def table(runs: dict[str, Path]) -> dict[str, Any]:
    """``{columns, rows: [{task, metric, cells}]}`` over every summary of every run, rows in first-seen order."""
    columns: list[str] = []
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for run, out in runs.items():
        for stage, summary in summaries(out):
            models = list(summary.get("results", {}))
            names = [f"{run}{'/' + stage if stage else ''}/{m}" for m in models]
            columns += names
            for task, metric, fmt, values in metric_rows(summary):
                row = rows.setdefault((task, metric.strip()), {})
                row.update(dict(zip(names, cells(fmt, values))))
    return {
        "columns": columns,
        "rows": [
            {"task": task, "metric": metric, "cells": [row.get(c, "") for c in columns]}
            for (task, metric), row in rows.items()
        ],
    }


def plots(out: Path) -> list[Path]:
    """The PNGs a run wrote: its loss curve and the pipeline report's plots."""
    found = [out / "loss_curve.png"] if (out / "loss_curve.png").is_file() else []
    if (out / "report").is_dir():
        found += sorted((out / "report").glob("*.png"))
    return found


def trained_model(out: Path) -> dict[str, Any] | None:
    """What a run produced, as ``{model, adapters}`` (paths as the run wrote them, relative to the
    workspace), or None when it has produced nothing loadable yet."""
    state = out / "pipeline_state.json"
    if state.is_file():
        stages = json.loads(state.read_text(encoding="utf-8")).get("stages", {})
        done = [r for r in stages.values() if r.get("status") == "done" and r.get("state_after")]
        if done:
            after = done[-1]["state_after"]
            return {"model": after["model"], "adapters": list(after.get("adapters") or [])}
    if (out / "config.json").is_file():
        return {"model": str(out), "adapters": []}
    if (out / "adapter_config.json").is_file():
        return {"model": base_of(out), "adapters": [str(out)]}
    ggufs = sorted(out.glob("*.gguf"))
    if ggufs:
        return {"model": str(ggufs[-1]), "adapters": []}
    return None


def base_of(adapter: Path) -> str:
    """The base an adapter was trained on, as its saved zhtune config names it."""
    cfg = adapter / "zhtune_config.yaml"
    if cfg.is_file():
        data = yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}
        base = (data.get("model") or {}).get("model_name_or_path")
        if base:
            return str(base)
    return "default"
