"""Multiple-choice benchmark data (C-Eval, CMMLU, MMLU) from local CSV folders or the Hugging Face hub.

Local data is laid out as its authors publish it: one CSV per subject under ``<split>/``, named
``<subject>_<split>.csv`` (C-Eval, MMLU) or ``<subject>.csv`` (CMMLU). Column layouts differ and are
declared in ``benchmarks.yaml``: C-Eval ``id,question,A,B,C,D,answer[,explanation]``; CMMLU an unnamed
index column then ``Question,A,B,C,D,Answer``; MMLU no header, ``question,A,B,C,D,answer``. A question whose
answer is empty (C-Eval's test split) is kept without one: it is predicted for a submission file, not scored.
"""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from zhtune.errors import ConfigError, DataError

LETTERS = ("A", "B", "C", "D")


@dataclass
class Question:
    id: str
    question: str
    options: tuple[str, str, str, str]
    answer: str | None  # A-D, or None where the split publishes no answers


@dataclass
class Benchmark:
    name: str
    title: str
    hub: str
    hub_splits: dict[str, str]
    default_split: str
    files: list[str]
    csv: dict[str, Any]
    header: str
    question: str
    answer: str
    submission: bool
    categories: list[str]
    groups: dict[str, list[str]]
    subjects: dict[str, list[str]]

    def display_name(self, subject: str) -> str:
        entry = self.subjects.get(subject)
        return entry[0] if entry else subject.replace("_", " ")

    def categories_of(self, subject: str) -> list[str]:
        entry = self.subjects.get(subject)
        cats = list(entry[1:]) if entry else ["Other"]
        cats += [g for g, members in self.groups.items() if subject in members]
        return cats

    def format_question(self, q: Question, with_answer: str | None = None) -> str:
        text = self.question.replace("{question}", q.question)
        for letter, option in zip(LETTERS, q.options):
            text = text.replace("{" + letter + "}", option)
        if with_answer is not None:
            text += self.answer.replace("{answer}", with_answer)
        return text

    def answer_text(self, letter: str) -> str:
        """What follows the question for this answer letter, up to the letter itself (e.g. ' A' for MMLU)."""
        return self.answer.split("{answer}")[0] + letter

    def header_for(self, subject: str) -> str:
        return self.header.replace("{subject}", self.display_name(subject))


@functools.cache
def _specs() -> dict[str, dict[str, Any]]:
    text = resources.files("zhtune.eval").joinpath("benchmarks.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def names() -> list[str]:
    return list(_specs())


def get(name: str) -> Benchmark:
    specs = _specs()
    if name not in specs:
        raise ConfigError(f"unknown benchmark {name!r}; choose one of {', '.join(specs)}")
    return Benchmark(name=name, **specs[name])


# ---- local CSV files ----


def _norm(s: str) -> str:
    return s.strip().lstrip("\ufeff").lower()


def _answer(value: str, path: Path, line: int) -> str | None:
    v = value.strip().upper()
    if not v:
        return None
    if v not in LETTERS:
        raise DataError(path, line, f"answer {value!r} is not one of A, B, C, D")
    return v


def read_csv(bench: Benchmark, path: Path) -> list[Question]:
    """Questions of one subject file, checked against the benchmark's column layout."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(path, None, "not valid UTF-8 (convert the file to UTF-8)") from None
    except OSError as e:
        raise DataError(path, None, f"cannot read: {e.strerror}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    layout = bench.csv
    out: list[Question] = []
    if layout.get("header"):
        try:
            head = next(reader)
        except StopIteration:
            raise DataError(path, 1, "empty file (expected a header row)") from None
        cols = {_norm(c): i for i, c in enumerate(head)}
        want = [layout["question"], *LETTERS]
        missing = [c for c in want if _norm(c) not in cols]
        if missing:
            expected = ",".join(([layout["id"]] if layout.get("id") is not None else []) + want)
            raise DataError(
                path,
                1,
                f"{bench.title} header expected ({expected},{layout['answer']}...), got {','.join(head)!r}; "
                f"missing {', '.join(missing)}",
            )
        id_col = cols.get(_norm(layout["id"])) if layout.get("id") is not None else None
        ans_col = cols.get(_norm(layout["answer"]))
        q_col = cols[_norm(layout["question"])]
        opt_cols = [cols[_norm(c)] for c in LETTERS]
        for row in reader:
            if not any(c.strip() for c in row):
                continue
            line = reader.line_num
            if len(row) < len(head):
                raise DataError(path, line, f"{len(row)} columns where the header has {len(head)}")
            ans = _answer(row[ans_col], path, line) if ans_col is not None else None
            qid = row[id_col].strip() if id_col is not None else str(len(out))
            out.append(Question(qid, row[q_col], tuple(row[c] for c in opt_cols), ans))  # type: ignore[arg-type]
    else:
        for row in reader:
            if not any(c.strip() for c in row):
                continue
            line = reader.line_num
            if [_norm(c) for c in row] == ["question", "a", "b", "c", "d", "answer"]:
                continue  # a header row someone added
            if len(row) != 6:
                raise DataError(
                    path,
                    line,
                    f"{len(row)} columns; {bench.title} rows are question,A,B,C,D,answer (no header)",
                )
            out.append(Question(str(len(out)), row[0], tuple(row[1:5]), _answer(row[5], path, line)))  # type: ignore[arg-type]
    if not out:
        raise DataError(path, None, "no questions")
    return out


def subject_file(bench: Benchmark, data_dir: Path, split: str, subject: str) -> Path | None:
    for pattern in bench.files:
        p = data_dir / pattern.replace("{split}", split).replace("{subject}", subject)
        if p.is_file():
            return p
    return None


def local_subjects(bench: Benchmark, data_dir: Path, split: str) -> list[str]:
    folder = data_dir / split
    if not folder.is_dir():
        raise ConfigError(
            f"{data_dir} has no {split}/ folder ({bench.title} keeps each split in its own folder)"
        )
    out = []
    for p in sorted(folder.glob("*.csv")):
        stem = p.stem
        out.append(stem[: -len(split) - 1] if stem.endswith("_" + split) else stem)
    if not out:
        raise ConfigError(f"{folder} holds no .csv files")
    return out


def load_local(bench: Benchmark, data_dir: Path, split: str, subject: str) -> list[Question] | None:
    p = subject_file(bench, data_dir, split, subject)
    return read_csv(bench, p) if p is not None else None


# ---- the hub ----


def load_hub(bench: Benchmark, split: str, subject: str, cache_dir: str | None = None) -> list[Question]:
    """One subject's split from the benchmark's public dataset repository."""
    import datasets

    hub_split = bench.hub_splits.get(split)
    if hub_split is None:
        raise ConfigError(f"{bench.title} has no split {split!r}; it has {', '.join(bench.hub_splits)}")
    try:
        ds = datasets.load_dataset(bench.hub, subject, split=hub_split, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - network, missing config, script datasets: one actionable message
        raise ConfigError(
            f"could not load {bench.hub} ({subject}, {hub_split}) from the Hugging Face hub: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}. Download the {bench.title} CSV files "
            "and pass their folder with --data_dir instead."
        ) from e
    out = []
    for i, rec in enumerate(ds):
        if "choices" in rec:  # cais/mmlu: choices list, answer index
            opts = tuple(rec["choices"])
            ans = LETTERS[rec["answer"]] if rec.get("answer") is not None else None
            q = rec["question"]
        else:
            keys = {k.lower(): k for k in rec}
            opts = tuple(rec[keys[c.lower()]] for c in LETTERS)
            raw = rec.get(keys.get("answer", ""), "") or ""
            ans = raw.strip().upper() or None
            q = rec[keys["question"]]
        qid = str(rec.get("id", i))
        out.append(Question(qid, q, opts, ans))  # type: ignore[arg-type]
    return out


def load_split(
    bench: Benchmark, data_dir: str | None, split: str, subject: str, cache_dir: str | None = None
) -> list[Question] | None:
    """A subject's questions of one split, or None where a local folder lacks that file."""
    if data_dir:
        return load_local(bench, Path(data_dir), split, subject)
    return load_hub(bench, split, subject, cache_dir)


def subjects_for(bench: Benchmark, data_dir: str | None, split: str, wanted: list[str] | None) -> list[str]:
    available = local_subjects(bench, Path(data_dir), split) if data_dir else list(bench.subjects)
    if not wanted:
        return available
    unknown = [s for s in wanted if s not in available]
    if unknown:
        import difflib

        hints = [difflib.get_close_matches(s, available, n=1) for s in unknown]
        hint = "; ".join(f"{s} (did you mean {h[0]}?)" if h else s for s, h in zip(unknown, hints))
        where = f"{data_dir}/{split}" if data_dir else bench.title
        raise ConfigError(f"--subjects: not in {where}: {hint}")
    return list(wanted)
