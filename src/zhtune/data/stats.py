"""``zhtune data stats``: what a data set holds, as a table, a PNG histogram and (with --report_file) JSON.

Counts by record format, conversation lengths in tokens of a given tokenizer (or in characters), prompt
and answer lengths, human/assistant pairs per conversation and the language mix (langid.py, on the first
600 characters of each conversation). Memory grows by a few bytes per record (the lengths), not with
the records' size.
"""

from __future__ import annotations

import io
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zhtune.config.parse import field
from zhtune.data.tool import InputArgs, Item, Result, Summary, Tool, ToolCommand, parse_batch
from zhtune.text.formats import conversation_text, split_system

DESCRIPTION = "Statistics of a data set: counts, token lengths, turns, language mix; a table and a PNG."


@dataclass
class StatsArgs:
    """what to measure"""

    count: Literal["tokens", "chars"] = field("tokens", "Measure lengths in tokens or in characters.")
    model_name_or_path: str = field(
        "default", "Model whose tokenizer counts tokens (directory, hub id, default)."
    )
    tokenizer_name_or_path: str | None = field(None, "A tokenizer directory to use instead of the model's.")
    languages: bool = field(True, "Identify each conversation's language (langid.py).")
    plot_file: str | None = field(
        None, "PNG histogram to write (default: <first input's stem>.stats.png here)."
    )
    bins: int = field(50, "Histogram bins.")


SECTIONS = {"input": InputArgs, "stats": StatsArgs}


def describe(values: array) -> dict[str, float]:
    import numpy as np

    if not len(values):
        return {"count": 0}
    v = np.frombuffer(values, dtype=np.int64) if values.typecode == "q" else np.asarray(values)
    p = np.percentile(v, [50, 90, 99])
    return {
        "count": int(v.size),
        "mean": round(float(v.mean()), 1),
        "min": int(v.min()),
        "p50": float(p[0]),
        "p90": float(p[1]),
        "p99": float(p[2]),
        "max": int(v.max()),
        "total": int(v.sum()),
    }


class Stats(Tool):
    name = "stats"

    def __init__(self, args: StatsArgs):
        self.args = args
        self.tok: Any = None
        self.lang: Any = None
        self.total, self.prompt, self.answer = array("q"), array("q"), array("q")
        self.turns: Counter = Counter()
        self.langs: Counter = Counter()

    def setup(self) -> None:
        if self.args.count == "tokens":
            from zhtune.data.split_long import load_counting_tokenizer

            self.tok = load_counting_tokenizer(self.args.model_name_or_path, self.args.tokenizer_name_or_path)
        if self.args.languages:
            from zhtune.data.filter_lang import LangId

            self.lang = LangId()

    def apply_batch(self, recs: list[Any]) -> list[Result | str]:
        parsed, texts = parse_batch(recs)
        if self.tok is not None:
            from zhtune.data.split_long import count_tokens

            lens = iter(count_tokens(self.tok, texts))
        else:
            lens = iter(len(t) for t in texts)
        out: list[Result | str] = []
        for p in parsed:
            if isinstance(p, str):
                out.append(p)
                continue
            fmt, msgs = p
            n = {"system": 0, "user": 0, "assistant": 0}
            for m in msgs:
                n[m["role"]] += next(lens)
            _, body = split_system(msgs)
            lang = self.lang(conversation_text(msgs)) if self.lang else None
            key = (sum(n.values()), n["system"] + n["user"], n["assistant"], len(body) // 2, lang)
            out.append(Result([], fmt=fmt, key=key))
        return out

    def reduce(self, item: Item, path: Path, summary: Summary) -> None:
        total, prompt, answer, pairs, lang = item.key
        self.total.append(total)
        self.prompt.append(prompt)
        self.answer.append(answer)
        self.turns[pairs] += 1
        if lang:
            self.langs[lang] += 1

    def finish(self, summary: Summary) -> None:
        summary.extra.update(
            unit=self.args.count,
            conversation_length=describe(self.total),
            prompt_length=describe(self.prompt),
            answer_length=describe(self.answer),
            pairs_per_conversation=dict(sorted(self.turns.items())),
            languages=dict(self.langs.most_common()),
        )
        files = [Path(i["file"]) for i in summary.inputs]
        plot_file = Path(self.args.plot_file or f"{files[0].stem}.stats.png")
        plot(self, plot_file, self.args.bins, ", ".join(f.name for f in files))
        summary.extra["plot_file"] = str(plot_file)

    def table(self, summary: Summary) -> str:
        return f"{table(summary)}\nhistogram: {summary.extra['plot_file']}"


def plot(stats: Stats, path: Path, bins: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from zhtune.atomic import atomic_write_bytes

    unit = stats.args.count
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    for a, data, what in ((ax[0, 0], stats.total, "conversation"), (ax[0, 1], stats.answer, "answer")):
        v = np.asarray(data)
        a.hist(v, bins=bins, color="#4c72b0")
        a.set_title(f"{what} length ({unit})")
        a.set_xlabel(unit)
        a.set_ylabel("conversations")
        if v.size:
            a.axvline(float(np.percentile(v, 90)), color="#c44e52", ls="--", label="p90")
            a.legend()
    pairs = sorted(stats.turns.items())
    ax[1, 0].bar([k for k, _ in pairs], [n for _, n in pairs], color="#55a868")
    ax[1, 0].set_xticks([k for k, _ in pairs])
    ax[1, 0].set_title("human/assistant pairs per conversation")
    langs = stats.langs.most_common(12)
    ax[1, 1].bar([k for k, _ in langs], [n for _, n in langs], color="#8172b2")
    ax[1, 1].set_title("language mix" if langs else "language mix (not measured)")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def table(summary: Summary) -> str:
    e = summary.extra
    unit = e["unit"]
    rows: list[tuple[str, str]] = [("conversations", f"{summary.records_in - sum(summary.bad.values()):,}")]
    rows.append(("bad records", f"{sum(summary.bad.values()):,}"))
    rows.append(("formats", ", ".join(f"{k} {v}" for k, v in summary.formats.most_common()) or "-"))
    for name in ("conversation_length", "prompt_length", "answer_length"):
        d = e[name]
        if d.get("count"):
            rows.append(
                (
                    f"{name.replace('_', ' ')} ({unit})",
                    f"mean {d['mean']:,}, p50 {d['p50']:,.0f}, p90 {d['p90']:,.0f}, p99 {d['p99']:,.0f}, max {d['max']:,}",
                )
            )
    rows.append(("total " + unit, f"{e['conversation_length'].get('total', 0):,}"))
    rows.append(
        ("pairs per conversation", ", ".join(f"{k}: {v}" for k, v in e["pairs_per_conversation"].items()))
    )
    if e["languages"]:
        n = sum(e["languages"].values())
        rows.append(
            ("languages", ", ".join(f"{k} {100 * v / n:.1f}%" for k, v in list(e["languages"].items())[:8]))
        )
    rows.append(("throughput", f"{summary.records_per_s:,.0f} records/s, {summary.mb_per_s:.2f} MB/s"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


COMMAND = ToolCommand(Stats, SECTIONS, DESCRIPTION)
main, cli = COMMAND.main, COMMAND.cli
