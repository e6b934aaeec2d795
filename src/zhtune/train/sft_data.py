"""Build tokenized SFT datasets through ``datasets``, cached on disk by content.

The cache key covers the data files' bytes, the tokenizer, the template and every option that changes the
result, so a re-run with the same inputs loads the tokenized set instead of tokenizing again, and a change
to any input is never served a stale copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zhtune.atomic import atomic_dir
from zhtune.config.args import DataArgs
from zhtune.errors import DataError
from zhtune.model.default import cache_root
from zhtune.text.encode import SegmentEncoder, encode_conversation
from zhtune.text.records import ReadStats, dataset_from_generator, list_data_files, read_conversations
from zhtune.text.templates import ChatFormat

log = logging.getLogger(__name__)
ENCODE_VERSION = "1"  # bump when encoding changes, to invalidate caches
STATUSES = ("ok", "turns_dropped", "response_truncated", "too_long", "no_labels")


@dataclass
class DataReport:
    records: int = 0
    bad_records: int = 0
    bad_reasons: dict[str, int] = field(default_factory=dict)
    formats: dict[str, int] = field(default_factory=dict)
    ok: int = 0
    turns_dropped: int = 0
    response_truncated: int = 0
    too_long: int = 0
    no_labels: int = 0
    train_samples: int = 0
    eval_samples: int = 0
    cached: bool = False

    def table(self) -> str:
        rows = [
            ("records read", self.records),
            ("bad records skipped", self.bad_records),
            ("kept as is", self.ok),
            ("kept, leading turns dropped", self.turns_dropped),
            ("kept, last response truncated", self.response_truncated),
            ("dropped: prompt too long", self.too_long),
            ("dropped: nothing to learn", self.no_labels),
            ("train samples", self.train_samples),
            ("eval samples", self.eval_samples),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [f"  {name:<{width}}  {val}" for name, val in rows]
        if self.formats:
            lines.append(f"  {'formats':<{width}}  " + ", ".join(f"{k} {v}" for k, v in self.formats.items()))
        if self.bad_reasons:
            for reason, n in sorted(self.bad_reasons.items(), key=lambda x: -x[1])[:5]:
                lines.append(f"    {n} x {reason}")
        return "\n".join(lines)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode("utf-8"))
    h.update(
        json.dumps([str(tokenizer.bos_token), str(tokenizer.eos_token), str(tokenizer.pad_token)]).encode()
    )
    return h.hexdigest()


def cache_key(paths: list[Path], tokenizer: Any, fmt: ChatFormat, d: DataArgs) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.name).encode())
        h.update(_file_digest(p).encode())
    h.update(tokenizer_digest(tokenizer).encode())
    h.update(json.dumps(fmt.to_json(), sort_keys=True, ensure_ascii=False).encode())
    h.update(fmt.jinja().encode())
    opts = [d.max_seq_length, d.truncation, d.system_prompt, d.skip_bad_records, ENCODE_VERSION]
    h.update(json.dumps(opts).encode())
    return h.hexdigest()[:16]


def _encode_batch(
    batch: dict[str, list], fmt: ChatFormat, tokenizer: Any, max_len: int, truncation: str
) -> dict:
    enc = SegmentEncoder(tokenizer)
    out: dict[str, list] = {"input_ids": [], "labels": [], "status": []}
    for msgs_json in batch["messages"]:
        e = encode_conversation(fmt, enc, json.loads(msgs_json), max_len, truncation)
        out["input_ids"].append(e.input_ids)
        out["labels"].append(e.labels)
        out["status"].append(e.status)
    return out


def _gen(paths: list[str], skip_bad: bool, system_prompt: str | None, stats_path: str):
    stats = ReadStats()
    for _file, _line, msgs in read_conversations(
        [Path(p) for p in paths], skip_bad_records=skip_bad, stats=stats
    ):
        if system_prompt and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": system_prompt}] + msgs
        yield {"messages": json.dumps(msgs, ensure_ascii=False)}
    Path(stats_path).write_text(json.dumps(asdict(stats)), encoding="utf-8")


def tokenize_files(
    paths: list[Path], tokenizer: Any, fmt: ChatFormat, d: DataArgs, cache_dir: Path, split: str
) -> tuple[Any, DataReport]:
    """Read, encode and cache one split. Returns (dataset, report)."""
    import datasets

    key = cache_key(paths, tokenizer, fmt, d)
    target = cache_dir / f"sft-{split}-{key}"
    if target.is_dir() and not d.overwrite_cache:
        ds = datasets.load_from_disk(str(target))
        report = DataReport(**json.loads((target / "zhtune_report.json").read_text(encoding="utf-8")))
        report.cached = True
        log.info("loaded tokenized %s set from cache %s", split, target)
        return ds, report

    with tempfile.TemporaryDirectory(prefix="zhtune-read-") as tmp:
        stats_path = str(Path(tmp) / "stats.json")
        raw = dataset_from_generator(
            _gen,
            {
                "paths": [str(p) for p in paths],
                "skip_bad": d.skip_bad_records,
                "system_prompt": d.system_prompt,
                "stats_path": stats_path,
            },
            cache_dir=str(Path(tmp) / "gen"),
        )
        stats = ReadStats(**json.loads(Path(stats_path).read_text(encoding="utf-8")))
        report = DataReport(
            records=stats.records, bad_records=stats.bad, bad_reasons=stats.problems, formats=stats.formats
        )
        if len(raw) == 0:
            raise DataError(
                paths[0], None, f"no usable record in {len(paths)} file(s): {report.bad_records} bad"
            )
        encoded = raw.map(
            _encode_batch,
            batched=True,
            batch_size=256,
            num_proc=d.preprocessing_num_workers if (d.preprocessing_num_workers or 0) > 1 else None,
            fn_kwargs={
                "fmt": fmt,
                "tokenizer": tokenizer,
                "max_len": d.max_seq_length,
                "truncation": d.truncation,
            },
            remove_columns=["messages"],
            desc=f"Tokenizing {split}",
        )
        counts = {s: 0 for s in STATUSES}
        for s in encoded["status"]:
            counts[s] += 1
        for s in STATUSES:
            setattr(report, s, counts[s])
        kept = encoded.filter(
            lambda b: [s in ("ok", "turns_dropped", "response_truncated") for s in b["status"]],
            batched=True,
            desc="Filtering",
        )
        kept = kept.remove_columns(["status"])
        with atomic_dir(target, overwrite=True) as out:
            kept.save_to_disk(str(out))
            (out / "zhtune_report.json").write_text(json.dumps(asdict(report)), encoding="utf-8")
    ds = datasets.load_from_disk(str(target))
    return ds, report


def build_sft_data(
    tokenizer: Any, fmt: ChatFormat, d: DataArgs, seed: int
) -> tuple[Any, Any | None, DataReport]:
    """Training and optional validation sets, tokenized and labelled, with a report of what was kept."""
    paths = list_data_files(d.dataset_dir, d.train_files)
    if not paths:
        raise DataError("<config>", None, "no training data: pass --dataset_dir or --train_files")
    cache_dir = Path(d.data_cache_dir) if d.data_cache_dir else cache_root() / "datasets"
    train, report = tokenize_files(paths, tokenizer, fmt, d, cache_dir, "train")
    eval_ds = None
    if d.validation_file:
        eval_ds, erep = tokenize_files([Path(d.validation_file)], tokenizer, fmt, d, cache_dir, "eval")
    elif d.validation_split_percentage > 0 and len(train) > 1:
        n_eval = max(1, int(round(len(train) * d.validation_split_percentage / 100)))
        split = train.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
        train, eval_ds = split["train"], split["test"]
    train = train.shuffle(seed=seed)
    if d.max_train_samples:
        train = train.select(range(min(d.max_train_samples, len(train))))
    if eval_ds is not None and d.max_eval_samples:
        eval_ds = eval_ds.select(range(min(d.max_eval_samples, len(eval_ds))))
    if len(train) == 0:
        raise DataError(
            paths[0],
            None,
            f"no usable training sample: {report.records} records read, {report.bad_records} bad, "
            f"{report.too_long} too long for --max_seq_length {d.max_seq_length}, {report.no_labels} with nothing to learn",
        )
    report.train_samples = len(train)
    report.eval_samples = len(eval_ds) if eval_ds is not None else 0
    return train, eval_ds, report
