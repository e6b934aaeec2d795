"""The run report: ``<run_dir>/report/report.md`` with PNG plots, rewritten after every stage.

* stages: command, status, time, output, and what each one measured on the way (vocabulary sizes,
  bits per character before/after pre-training, final training loss);
* tokenizer statistics: tokens per character of the base and every extended tokenizer on held-out text;
* loss curves of every training stage;
* every eval metric for every evaluated stage, side by side with the base model, and the change; a change in
  perplexity (a per-token figure) only between models with the same tokenizer;
* the greedy replies an eval task kept (``sample_replies``; every reply of a ``response`` task, such as the
  fixed prompts of ``builtin:zh_prompts``), each model's side by side.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
PER_TOKEN = ("perplexity",)  # figures per token: a different tokenizer makes them incomparable
NOT_COMPARABLE = "not comparable (different tokenizers)"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    from zhtune.atomic import atomic_write_bytes

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    _plt().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def stage_notes(rec: dict[str, Any]) -> str:
    r = rec.get("result") or {}
    cmd = rec.get("command")
    if cmd == "vocab_merge" and "vocab_size" in r:
        return f"vocabulary {r.get('base_vocab_size')} -> {r['vocab_size']}"
    if cmd == "vocab_train" and "documents_sampled" in r:
        return f"{r['kind']} vocabulary from {r['documents_sampled']:,} documents"
    if cmd in ("pt", "sft"):
        parts = []
        b, after = r.get("eval_before"), r.get("eval_after")
        if b and after:
            parts.append(f"held-out bits/char {b['bpc']:.3f} -> {after['bpc']:.3f}")
        losses = [h["loss"] for h in r.get("log_history") or [] if "loss" in h]
        if losses:
            parts.append(f"train loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        if rec.get("resumed_from"):
            parts.append(f"resumed from {Path(rec['resumed_from']).name}")
        return "; ".join(parts)
    if cmd == "export" and "bytes" in r:
        return f"{r.get('quant')} GGUF, {r['bytes'] / 2**20:.1f} MiB"
    if cmd == "merge" and "vocab_rows" in r:
        return f"{len(r.get('adapters') or [])} adapter(s) merged, vocabulary {r['vocab_rows']} rows"
    return ""


def loss_plot(stages: dict[str, dict[str, Any]], path: Path) -> bool:
    curves = {}
    for name, rec in stages.items():
        hist = (rec.get("result") or {}).get("log_history") or []
        train = [(h["step"], h["loss"]) for h in hist if "loss" in h and "step" in h]
        ev = [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h and "step" in h]
        if train or ev:
            curves[name] = (train, ev)
    if not curves:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), dpi=100, squeeze=False)
    for ax, (name, (train, ev)) in zip(axes[0], curves.items()):
        if train:
            ax.plot(*zip(*train), ".-", label="train")
        if ev:
            ax.plot(*zip(*ev), "o-", label="held-out")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)
    return True


def _delta(fmt: str, base: Any, last: Any) -> str:
    if base is None or last is None or not all(isinstance(x, (int, float)) for x in (base, last)):
        return "-"
    if fmt == "pct":
        return f"{100 * (last - base):+.1f} pt"
    if base == 0 or not math.isfinite(base) or not math.isfinite(last):
        return "-"
    return f"{100 * (last - base) / abs(base):+.1f}%"


def same_tokenizer(summary: dict[str, Any], task: str, a: str, b: str) -> bool:
    """Whether models ``a`` and ``b`` cut text into the same tokens: the same tokenizer digest (``zhtune eval``
    records one per model), or in results without one, as many tokens for as many characters of the task."""
    digests = [((summary.get("models") or {}).get(m) or {}).get("tokenizer") for m in (a, b)]
    if all(digests):
        return digests[0] == digests[1]
    ra, rb = ((summary["results"].get(m) or {}).get(task) or {} for m in (a, b))
    return (ra.get("tokens"), ra.get("chars")) == (rb.get("tokens"), rb.get("chars"))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def samples_section(summary: dict[str, Any]) -> list[str]:
    """Each kept sample prompt with every model's greedy reply and the reference."""
    from zhtune.eval.report import samples

    rows = list(samples(summary))
    if not rows:
        return []
    models = list(summary["results"])
    lines = ["Greedy replies:", "", "| task | prompt | reference | " + " | ".join(models) + " |"]
    lines.append("|---" * (3 + len(models)) + "|")
    for task, prompt, ref, replies in rows:
        cells = [task, prompt, "-" if ref is None else ref, *(replies.get(m, "-") for m in models)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return [*lines, ""]


def eval_section(summary: dict[str, Any], out: Path, name: str) -> list[str]:
    from zhtune.eval.report import cells, metric_rows

    models = list(summary["results"])
    lines = [f"### {name}", ""]
    has_base = models and models[0] == "base" and len(models) > 1
    head = ["task", "metric", *models] + ([f"{models[-1]} vs base"] if has_base else [])
    lines += ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    bars = []
    for task, metric, fmt, values in metric_rows(summary):
        row = [task, metric.strip(), *cells(fmt, values)]
        if (
            has_base
            and metric.strip() in PER_TOKEN
            and not same_tokenizer(summary, task, models[0], models[-1])
        ):
            row.append(NOT_COMPARABLE)
        elif has_base:
            row.append(_delta(fmt, values[0], values[-1]))
        lines.append("| " + " | ".join(row) + " |")
        if not metric.startswith(" ") and metric not in ("perplexity", "tokens/char"):  # headline metrics
            bars.append((f"{task}: {metric.strip()}", fmt, values))
    lines.append("")
    lines += samples_section(summary)
    if bars:
        colors = ["#999999"] + ["#3b7dd8"] * (len(models) - 1)
        png = out / f"eval_{name}.png"
        bar_grid(png, models, colors, [(title, fmt, values, None) for title, fmt, values in bars])
        lines += [f"![eval {name}]({png.name})", ""]
    return lines


def bar_grid(
    path: Path, labels: list[str], colors: list[str], panels: list[tuple[str, str, list, list | None]]
) -> None:
    """One bar chart per panel (title, value format, a value per label, error bars or None), three a row;
    ``pct`` values are drawn in percent, missing ones as 0."""
    plt = _plt()
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), dpi=100, squeeze=False)

    def scale(fmt: str, v: Any) -> float:
        ok = isinstance(v, (int, float)) and math.isfinite(v)
        return (100 * v if fmt == "pct" else v) if ok else 0.0

    for ax, (title, fmt, values, errors) in zip(axes.flat, panels):
        yerr = [scale(fmt, e) for e in errors] if errors is not None else None
        ax.bar(range(len(labels)), [scale(fmt, v) for v in values], yerr=yerr, color=colors, capsize=3)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        if fmt == "pct":
            ax.set_ylabel("%")
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    _save(fig, path)


def tokenizer_section(data: dict[str, Any], text_files: list[str], out: Path) -> list[str]:
    stages = data["stages"]
    toks = [("base", data.get("base_model") or "default")]
    toks += [
        (name, rec["options"]["output_dir"])
        for name, rec in stages.items()
        if rec.get("command") == "vocab_merge" and rec.get("status") == "done"
    ]
    files = [f for f in text_files if Path(f).is_file()]
    if len(toks) < 2 or not files:
        return []
    try:
        from zhtune.text.documents import list_text_files, sample_documents
        from zhtune.vocab.stats import measure
    except ImportError:
        return []
    texts, _ = sample_documents(list_text_files(files), max_lines=5000, max_chars=1 << 40, text_field="text")
    rows = measure([t for _, t in toks], texts)
    lines = [
        "## Tokenizer",
        "",
        f"On {len(texts):,} documents of {', '.join(Path(f).name for f in files)}:",
        "",
    ]
    lines += [
        "| tokenizer | tokens | tokens/char | chars/token | tokens/Han char |",
        "|---|---:|---:|---:|---:|",
    ]
    for (label, _), r in zip(toks, rows):
        han = "-" if r["tokens_per_han_char"] is None else f"{r['tokens_per_han_char']:.3f}"
        lines.append(
            f"| {label} | {r['tokens']:,} | {r['tokens_per_char']:.3f} | {r['chars_per_token']:.3f} | {han} |"
        )
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 3), dpi=100)
    ax.bar([lab for lab, _ in toks], [r["tokens_per_char"] for r in rows], color="#3b7dd8")
    ax.set_ylabel("tokens per character")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, out / "tokenizer.png")
    return [*lines, "", "![tokenizer](tokenizer.png)", ""]


def _eval_text_files(stages: dict[str, dict[str, Any]]) -> list[str]:
    for rec in stages.values():
        if rec.get("command") != "eval":
            continue
        opts = rec.get("options") or {}
        files = list(opts.get("text_files") or [])
        for t in opts.get("tasks") or []:
            files += list(t.get("text_files") or [])
        if files:
            return files
    return []


def write_report(run_dir: Path, data: dict[str, Any], args: Any) -> Path:
    from zhtune.atomic import atomic_write_text

    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    stages = {k: v for k, v in data["stages"].items()}
    total = sum(r.get("seconds") or 0 for r in stages.values())
    lines = [
        f"# Pipeline report: {run_dir.name}",
        "",
        f"Base model `{data.get('base_model')}`"
        + (f", variant `{data['variant']}`" if data.get("variant") else "")
        + f"; stage time {_fmt_s(total)}.",
        "",
        "## Stages",
        "",
        "| stage | command | status | time | notes |",
        "|---|---|---|---:|---|",
    ]
    for name, rec in stages.items():
        lines.append(
            f"| {name} | {rec.get('command')} | {rec.get('status')} | {_fmt_s(rec.get('seconds'))} | "
            f"{stage_notes(rec)} |"
        )
    lines.append("")
    try:
        lines += tokenizer_section(data, list(args.report_text or _eval_text_files(stages)), out)
    except Exception as e:  # noqa: BLE001 - a report section must not fail the run
        log.warning("tokenizer statistics skipped: %s", e)
    if loss_plot(stages, out / "loss_curves.png"):
        lines += ["## Training loss", "", "![loss curves](loss_curves.png)", ""]
    evals = [(n, r) for n, r in stages.items() if r.get("command") == "eval" and r.get("status") == "done"]
    if evals:
        lines += ["## Evaluation", ""]
        lines.append(
            "bits/char: held-out text in bits per character (lower is better; comparable across tokenizers); "
            "response bits/char: the same for reference replies. Perplexity is per token: its change is shown "
            "only between models with the same tokenizer. Accuracy and share changes are in points; other "
            "changes relative."
        )
        lines.append("")
        for name, rec in evals:
            lines += eval_section(rec["result"], out, name)
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
