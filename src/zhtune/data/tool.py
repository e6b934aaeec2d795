"""The engine every ``zhtune data`` tool runs on: stream, map in worker processes, reduce, write, summarise.

A tool is a :class:`Tool`: ``apply`` turns one record into zero or more output records (run in
``--num_proc`` worker processes, on batches), ``reduce`` sees every result in input order in the main
process (for state such as seen ids or hashes), ``finish`` runs at the end. The engine keeps a bounded
number of batches in flight, so memory does not grow with the input; it shows a progress bar in bytes and
ends with a summary: records in, out, dropped and why, changed, bad records, records/s and MB/s.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import re
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zhtune.config.parse import Config, build, field, parse_cli
from zhtune.data.jsonl import (
    LAYOUTS,
    BadRecord,
    RecordWriter,
    check_output,
    detect_layout,
    dumps,
    iter_raw,
    output_layout,
    parse,
)
from zhtune.errors import ConfigError, DataError
from zhtune.text.records import to_messages

COLUMN = re.compile(r",? column \d+")  # "malformed JSON (..., column 66)" counts with every other column
BATCH_RECORDS = 512
BATCH_BYTES = 2 << 20


@dataclass
class InputArgs:
    """input files and processing"""

    in_file: list[str] | None = field(
        None, "Input JSON or JSON Lines files, comma separated (Alpaca, ShareGPT, messages, Chinese-Vicuna)."
    )
    skip_bad_records: bool = field(
        False, "Count and skip malformed records instead of stopping at the first one with its file:line."
    )
    num_proc: int = field(1, "Worker processes for the per-record work.")
    report_file: str | None = field(None, "Also write the summary (and the tool's report) here as JSON.")

    def __post_init__(self) -> None:
        if not self.in_file:
            raise ConfigError("--in_file is required: one or more .json/.jsonl files, comma separated")
        for p in self.in_file:
            if not Path(p).is_file():
                raise ConfigError(f"--in_file {p} does not exist")
        if self.num_proc < 1:
            raise ConfigError(f"--num_proc must be at least 1, got {self.num_proc}")


@dataclass
class OutputArgs:
    """output file"""

    out_file: str | None = field(None, "Output file; .json writes a JSON array, anything else JSON Lines.")
    output_format: Literal["auto", "json", "jsonl"] = field("auto", "Output layout (auto: from the suffix).")
    overwrite: bool = field(False, "Replace --out_file when it exists (an input is never replaced).")

    def __post_init__(self) -> None:
        if not self.out_file:
            raise ConfigError("--out_file is required: where the result goes (.json or .jsonl)")


@dataclass(slots=True)
class Result:
    """What ``apply`` made of one record."""

    outs: list[Any]
    reason: str | None = None  # why it was dropped (outs empty) or, with outs, a note for reduce
    changed: bool = False
    fmt: str | None = None
    key: Any = None  # anything reduce needs (hashes, lengths, ids)


@dataclass(slots=True)
class Item:
    line: int
    outs: list[str]
    reason: str | None = None
    changed: bool = False
    error: str | None = None
    fmt: str | None = None
    key: Any = None


def messages(rec: Any, check: bool = True) -> tuple[str, list[dict]]:
    """``readers.to_messages``, with its complaints turned into BadRecord (reported by file:line)."""
    try:
        return to_messages(rec, check=check)
    except ValueError as e:
        raise BadRecord(str(e)) from None


def edit_texts(rec: Any, edit: Any, doing: str, *, check: bool = True) -> Result:
    """Apply ``edit(text, role)`` to every message text of a record, in its own format; a record that is no
    longer a valid conversation afterwards is dropped with the reason."""
    from zhtune.text.formats import map_texts

    fmt, _ = messages(rec, check=check)
    new, changed = map_texts(rec, fmt, edit)
    try:
        messages(new)
    except ValueError as e:
        return Result([], f"unusable after {doing} ({str(e).split(' (')[0]})", fmt=fmt)
    return Result([new], changed=changed, fmt=fmt)


def parse_batch(recs: list[Any]) -> tuple[list[Any], list[str]]:
    """Each record as (format, messages) or its error message, and every message text in order (for one
    batched tokenizer call)."""
    parsed: list[Any] = []
    texts: list[str] = []
    for rec in recs:
        try:
            fmt, msgs = messages(rec)
        except ValueError as e:
            parsed.append(str(e))
            continue
        parsed.append((fmt, msgs))
        texts += [m["content"] for m in msgs]
    return parsed, texts


class Tool:
    """Base class: override ``apply`` (or ``apply_batch``), optionally ``setup``, ``reduce``, ``finish``."""

    name = "tool"

    def setup(self) -> None:
        """Load what ``apply`` needs (models, tables); runs once in each process that applies."""

    def apply(self, rec: Any) -> Result:
        raise NotImplementedError

    def apply_batch(self, recs: list[Any]) -> list[Result | str]:
        """Results in order; a string is the problem that makes that record bad (raised as BadRecord)."""
        out: list[Result | str] = []
        for rec in recs:
            try:
                out.append(self.apply(rec))
            except BadRecord as e:
                out.append(str(e))
        return out

    def reduce(self, item: Item, path: Path, summary: Summary) -> None:
        """Main process, input order: may drop (clear ``item.outs``, set ``item.reason``) or rewrite."""

    def finish(self, summary: Summary) -> None:
        """After the last record: add the tool's report to ``summary.extra``."""

    def notes(self, summary: Summary) -> list[str]:
        """Lines ``zhtune data`` prints before the summary table: what this tool found."""
        return []

    def table(self, summary: Summary) -> str:
        """The summary table ``zhtune data`` prints."""
        return summary.table()


@dataclass
class Summary:
    tool: str
    inputs: list[dict[str, Any]]
    output: str | None = None
    records_in: int = 0
    records_out: int = 0
    changed: int = 0
    bytes_in: int = 0
    seconds: float = 0.0
    setup_seconds: float = 0.0
    dropped: Counter = None  # type: ignore[assignment]
    bad: Counter = None  # type: ignore[assignment]
    formats: Counter = None  # type: ignore[assignment]
    extra: dict[str, Any] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.dropped, self.bad, self.formats = Counter(), Counter(), Counter()
        self.extra = {}

    @property
    def records_per_s(self) -> float:
        return self.records_in / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes_in / 1e6 / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": self.tool,
            "inputs": self.inputs,
            "output": self.output,
            "records_in": self.records_in,
            "records_out": self.records_out,
            "dropped": dict(self.dropped.most_common()),
            "changed": self.changed,
            "bad_records": dict(self.bad.most_common()),
            "formats": dict(self.formats.most_common()),
            "bytes_in": self.bytes_in,
            "seconds": round(self.seconds, 3),
            "setup_seconds": round(self.setup_seconds, 3),
            "records_per_s": round(self.records_per_s, 1),
            "mb_per_s": round(self.mb_per_s, 2),
            **self.extra,
        }

    def table(self) -> str:
        rows: list[tuple[str, Any]] = [("records in", self.records_in), ("records out", self.records_out)]
        rows.append(("dropped", sum(self.dropped.values())))
        rows += [(f"  {reason}", n) for reason, n in self.dropped.most_common()]
        rows.append(("changed", self.changed))
        rows.append(("bad records", sum(self.bad.values())))
        rows += [(f"  {problem}", n) for problem, n in self.bad.most_common(8)]
        if self.formats:
            rows.append(("record formats", ", ".join(f"{k} {v}" for k, v in self.formats.most_common())))
        rows.append(
            (
                "throughput",
                f"{self.records_per_s:,.0f} records/s, {self.mb_per_s:.2f} MB/s "
                f"({self.bytes_in / 1e6:.1f} MB in {self.seconds:.1f} s)",
            )
        )
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"  {name:<{width}}  {val}" for name, val in rows)


_WORKER_TOOL: Tool | None = None


def _init_worker(tool: Tool) -> None:
    global _WORKER_TOOL
    _WORKER_TOOL = tool
    tool.setup()


def _ready() -> None:
    time.sleep(0.2)  # long enough that every worker takes one, so all have run setup


def _apply_in_worker(batch: list[tuple[int, Any]]) -> list[Item]:
    assert _WORKER_TOOL is not None
    return process_batch(_WORKER_TOOL, batch)


def process_batch(tool: Tool, batch: list[tuple[int, Any]]) -> list[Item]:
    """Parse, apply and serialize one batch; bad records become items with an ``error``."""
    items: list[Item | None] = [None] * len(batch)
    recs, where = [], []
    for i, (line, payload) in enumerate(batch):
        try:
            recs.append(parse(payload))
            where.append(i)
        except BadRecord as e:
            items[i] = Item(line, [], error=str(e))
    for i, res in zip(where, tool.apply_batch(recs)):
        line = batch[i][0]
        if isinstance(res, str):
            items[i] = Item(line, [], error=res)
        else:
            outs = [o if isinstance(o, str) else dumps(o) for o in res.outs]
            items[i] = Item(line, outs, res.reason, res.changed, None, res.fmt, res.key)
    return items  # type: ignore[return-value]


def _batches(path: Path, layout: str) -> Iterator[tuple[list[tuple[int, Any]], int]]:
    batch: list[tuple[int, Any]] = []
    size, done = 0, 0
    for line, payload, done in iter_raw(path, layout):
        batch.append((line, payload))
        size += len(payload) if isinstance(payload, bytes) else 256
        if len(batch) >= BATCH_RECORDS or size >= BATCH_BYTES:
            yield batch, done
            batch, size = [], 0
    if batch:
        yield batch, done


def run(tool: Tool, inp: InputArgs, out: OutputArgs | None = None, *, quiet: bool = False) -> Summary:
    """Stream every input file through ``tool``; write its outputs to ``out`` atomically."""
    from tqdm.auto import tqdm

    paths = [Path(p) for p in inp.in_file or []]
    layouts = [detect_layout(p) for p in paths]
    summary = Summary(tool.name, [{"file": str(p), "layout": lay} for p, lay in zip(paths, layouts)])
    say = (lambda *a: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    for p, lay in zip(paths, layouts):
        say(f"reading {p}: {LAYOUTS[lay]} (detected), {p.stat().st_size / 1e6:.1f} MB")
    writer = None
    if out is not None:
        dest = check_output(out.out_file, paths, out.overwrite)
        writer = RecordWriter(dest, output_layout(dest, out.output_format))
        summary.output = str(dest)
        say(f"writing {dest}: {LAYOUTS[writer.layout]}")
    pool = None
    t_setup = time.perf_counter()
    if inp.num_proc > 1:
        ctx = mp.get_context("spawn")
        pool = ProcessPoolExecutor(inp.num_proc, mp_context=ctx, initializer=_init_worker, initargs=(tool,))
        for fut in [pool.submit(_ready) for _ in range(inp.num_proc)]:
            fut.result()
    else:
        tool.setup()
    summary.setup_seconds = time.perf_counter() - t_setup
    total = sum(p.stat().st_size for p in paths)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=tool.name, disable=None)
    t0 = time.perf_counter()
    base = 0

    def collect(path: Path, items: list[Item], done: int) -> None:
        for item in items:
            summary.records_in += 1
            if item.error is not None:
                if not inp.skip_bad_records:
                    raise DataError(
                        path,
                        item.line,
                        f"{item.error} (or pass --skip_bad_records to count and skip such records)",
                    )
                summary.bad[COLUMN.sub("", item.error.split(":")[0])[:80]] += 1
                continue
            if item.fmt:
                summary.formats[item.fmt] += 1
            tool.reduce(item, path, summary)
            if item.reason and not item.outs:
                summary.dropped[item.reason] += 1
            summary.changed += bool(item.changed and item.outs)
            if writer is not None:
                for s in item.outs:
                    writer.write(s)
            summary.records_out += len(item.outs)
        bar.update(base + done - bar.n)
        el = time.perf_counter() - t0
        bar.set_postfix_str(f"{summary.records_in / max(el, 1e-9):,.0f} rec/s", refresh=False)

    try:
        pending: deque = deque()
        for path, layout in zip(paths, layouts):
            for batch, done in _batches(path, layout):
                if pool is None:
                    collect(path, process_batch(tool, batch), done)
                    continue
                pending.append((path, pool.submit(_apply_in_worker, batch), done))
                while len(pending) > 2 * inp.num_proc:
                    p, fut, d = pending.popleft()
                    collect(p, fut.result(), d)
            while pending:  # finish this file before counting the next one's bytes
                p, fut, d = pending.popleft()
                collect(p, fut.result(), d)
            base += path.stat().st_size
        tool.finish(summary)
    except BaseException:
        if writer is not None:
            writer.abort()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
        raise
    summary.seconds = time.perf_counter() - t0
    summary.bytes_in = total
    if writer is not None:
        writer.commit()
    if pool is not None:
        pool.shutdown()
    bar.close()
    return summary


def as_config(cfg: Config | dict[str, Any], sections: dict[str, type]) -> Config:
    return cfg if isinstance(cfg, Config) else build(sections, cfg)


def save_report(summary: Summary, path: str) -> None:
    from zhtune.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(summary.to_dict(), ensure_ascii=False, indent=2) + "\n")
    print(f"report: {path}")


class ToolCommand:
    """A tool as a command: ``main(cfg)`` from Python, ``cli(argv)`` for ``zhtune data <tool.name>``.

    The tool is built from the config section that is neither ``input`` nor ``output``; it writes to
    ``output`` when the command has that section. The CLI prints the tool's notes, then the summary table
    (saved as JSON with ``--report_file``).
    """

    def __init__(self, tool: type[Tool], sections: dict[str, type], description: str):
        self.tool, self.sections, self.description = tool, sections, description
        self.section = next(s for s in sections if s not in ("input", "output"))
        self.prog = f"zhtune data {tool.name}"

    def run(self, cfg: Config) -> tuple[Tool, Summary]:
        tool = self.tool(getattr(cfg, self.section))
        return tool, run(tool, cfg.input, getattr(cfg, "output", None))

    def main(self, cfg: Config | dict[str, Any]) -> Summary:
        return self.run(as_config(cfg, self.sections))[1]

    def cli(self, argv: list[str] | None = None) -> int:
        cfg = parse_cli(argv, self.sections, prog=self.prog, description=self.description)
        tool, summary = self.run(cfg)
        for line in tool.notes(summary):
            print(line)
        print(f"{self.prog}:\n{tool.table(summary)}", flush=True)
        if cfg.input.report_file:
            save_report(summary, cfg.input.report_file)
        return 0
