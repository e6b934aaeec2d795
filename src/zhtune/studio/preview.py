"""The data preview: what ``zhtune sft`` (or ``pt``) will make of the chosen files, before anything trains.

Per file: the number of records, the detected format of each (Alpaca, ShareGPT, messages, Chinese-Vicuna;
see :mod:`zhtune.text.records`), the records that would fail with their ``file:line`` problem; over all
files a token-length histogram and how many exceed ``max_seq_length``; and the first records rendered
through the chosen chat template as the trainer sees them, each segment marked supervised or not
(:mod:`zhtune.text.templates`, :mod:`zhtune.text.encode`). Plain text (``.txt``, ``.jsonl`` of ``text``) is
counted and measured as pre-training documents.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from zhtune.errors import ConfigError, DataError

MAX_RECORDS = 2000  # records measured per file; counting goes on to the end
SHOWN = 3
BINS = 20


@functools.lru_cache(maxsize=4)
def tokenizer_for(model: str, tokenizer: str | None) -> Any:
    from zhtune.config.args import ModelArgs
    from zhtune.model.loader import load_tokenizer

    return load_tokenizer(ModelArgs(model_name_or_path=model, tokenizer_name_or_path=tokenizer))


def chat_format(tok: Any, model: str, template: str | None) -> Any:
    from zhtune.text.templates import get_format

    directory = model if Path(model).is_dir() else None
    return get_format(tok, template or None, directory=directory)


def histogram(lengths: list[int], bins: int = BINS) -> list[dict[str, int]]:
    if not lengths:
        return []
    top = max(lengths) + 1
    width = max(1, -(-top // bins))
    counts = [0] * (-(-top // width))
    for n in lengths:
        counts[n // width] += 1
    return [{"lo": i * width, "hi": (i + 1) * width - 1, "count": c} for i, c in enumerate(counts)]


def is_text_file(path: Path) -> bool:
    if path.suffix == ".txt":
        return True
    if path.suffix != ".jsonl":
        return False
    import json

    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(rec, dict) and "text" in rec and "messages" not in rec
    return False


def conversations(path: Path, fmt: Any, enc: Any, shown: list[dict], lengths: list[int]) -> dict[str, Any]:
    from zhtune.text.encode import encode_conversation
    from zhtune.text.records import iter_json_records, to_messages

    info: dict[str, Any] = {"records": 0, "formats": {}, "bad": 0, "problems": []}
    for line, rec in iter_json_records(path):
        info["records"] += 1
        try:
            kind, msgs = to_messages(rec)
        except ValueError as e:
            info["bad"] += 1
            if len(info["problems"]) < 5:
                info["problems"].append(f"{path.name}:{line}: {e}")
            continue
        info["formats"][kind] = info["formats"].get(kind, 0) + 1
        if info["records"] > MAX_RECORDS:
            continue
        lengths.append(len(encode_conversation(fmt, enc, msgs, 1 << 30).input_ids))
        if len(shown) < SHOWN:
            segs = fmt.segments(msgs)
            shown.append(
                {
                    "where": f"{path.name}:{line}",
                    "format": kind,
                    "segments": [
                        {"text": t, "supervised": s, "tokens": len(enc.encode(t, first=i == 0))}
                        for i, (t, s) in enumerate(segs)
                    ],
                }
            )
    return info


def documents(path: Path, tok: Any, shown: list[dict], lengths: list[int]) -> dict[str, Any]:
    from zhtune.text.documents import iter_documents

    info: dict[str, Any] = {"records": 0, "formats": {"text": 0}, "bad": 0, "problems": []}
    for line, text in iter_documents(path):
        info["records"] += 1
        info["formats"]["text"] += 1
        if info["records"] <= MAX_RECORDS:
            lengths.append(len(tok(text, add_special_tokens=False)["input_ids"]))
        if len(shown) < SHOWN:
            shown.append(
                {
                    "where": f"{path.name}:{line}",
                    "format": "text",
                    "segments": [{"text": text, "supervised": True}],
                }
            )
    return info


def preview(
    files: list[Path],
    model: str,
    *,
    tokenizer: str | None = None,
    template: str | None = None,
    max_seq_length: int = 512,
) -> dict[str, Any]:
    """The preview of ``files`` (already checked to be inside the workspace) for ``model``'s tokenizer."""
    from zhtune.text.encode import SegmentEncoder

    if not files:
        raise ConfigError("choose at least one data file to preview")
    tok = tokenizer_for(model, tokenizer)
    fmt = chat_format(tok, tokenizer or model, template)
    enc = SegmentEncoder(tok)
    shown: list[dict] = []
    lengths: list[int] = []
    per_file = []
    for path in files:
        try:
            if is_text_file(path):
                info = documents(path, tok, shown, lengths)
            else:
                info = conversations(path, fmt, enc, shown, lengths)
        except DataError as e:
            info = {"records": 0, "formats": {}, "bad": 1, "problems": [str(e)], "error": str(e)}
        per_file.append({"path": path.name, **info})
    return {
        "template": getattr(fmt, "name", "model"),
        "files": per_file,
        "records": sum(f["records"] for f in per_file),
        "measured": len(lengths),
        "histogram": histogram(lengths),
        "longest": max(lengths, default=0),
        "mean": round(sum(lengths) / len(lengths), 1) if lengths else 0,
        "over_max": sum(n > max_seq_length for n in lengths),
        "max_seq_length": max_seq_length,
        "samples": shown,
    }
