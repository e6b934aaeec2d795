"""Plain-text corpora for vocabulary work: .txt (one document a line) or .jsonl (a text field).

Large corpora are sampled, never read whole: lines stream through a reservoir of at most ``max_lines``
lines and ``max_chars`` characters, with a progress bar over the bytes read.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from zhtune.errors import DataError

TEXT_SUFFIXES = (".txt", ".jsonl")


def is_han(ch: str) -> bool:
    """A Han (CJK ideograph) character, including the extension blocks and compatibility ideographs."""
    o = ord(ch)
    return (
        0x4E00 <= o <= 0x9FFF
        or 0x3400 <= o <= 0x4DBF
        or 0x20000 <= o <= 0x3134F
        or 0xF900 <= o <= 0xFAFF
        or 0x2F800 <= o <= 0x2FA1F
    )


def count_han(text: str) -> int:
    return sum(1 for ch in text if is_han(ch))


def list_text_files(paths: list[str] | str) -> list[Path]:
    """Expand files and directories (their .txt/.jsonl files, sorted) into a list of files."""
    if isinstance(paths, str):
        paths = [paths]
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            if not found:
                raise DataError(p, None, "no .txt or .jsonl file in this directory")
            out += found
        elif p.is_file():
            if p.suffix not in TEXT_SUFFIXES:
                raise DataError(p, None, "expected a .txt (one document a line) or .jsonl file")
            out.append(p)
        else:
            raise DataError(p, None, "no such file or directory")
    return out


def iter_documents(path: Path, text_field: str = "text") -> Iterator[tuple[int, str]]:
    """``(line, text)`` for each non-empty document of one file; malformed lines are errors with file:line."""
    with open(path, encoding="utf-8-sig", errors="strict") as f:  # -sig: a leading BOM is not text
        try:
            for i, line in enumerate(f, start=1):
                if path.suffix == ".jsonl":
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(path, i, f"malformed JSON ({e.msg} at column {e.colno})") from None
                    text = rec.get(text_field) if isinstance(rec, dict) else None
                    if not isinstance(text, str):
                        raise DataError(path, i, f"no string field {text_field!r} (pass --text_field)")
                else:
                    text = line.rstrip("\r\n")
                if text.strip():
                    yield i, text
        except UnicodeDecodeError:
            raise DataError(path, None, "not valid UTF-8 (convert the file to UTF-8)") from None


def sample_documents(
    files: list[Path],
    *,
    max_lines: int = 2_000_000,
    max_chars: int = 500_000_000,
    text_field: str = "text",
    seed: int = 42,
    desc: str = "reading corpus",
) -> tuple[list[str], dict[str, int]]:
    """A uniform sample of the documents (reservoir sampling), bounded in lines and characters.

    Documents longer than ``max_chars // max_lines * 16`` characters are cut, so one huge line cannot
    break the memory bound. Returns the sample and counts of what was read.
    """
    from tqdm import tqdm

    rng = random.Random(seed)
    cap = max(1, max_chars // max(1, max_lines) * 16)
    keep: list[str] = []
    chars = seen = 0
    total_bytes = sum(f.stat().st_size for f in files)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc) as bar:
        for f in files:
            for _, text in iter_documents(f, text_field):
                bar.update(len(text.encode("utf-8")) + 1)
                text = text[:cap]
                seen += 1
                if len(keep) < max_lines and chars + len(text) <= max_chars:
                    keep.append(text)
                    chars += len(text)
                else:
                    j = rng.randrange(seen)
                    if j < len(keep):
                        chars += len(text) - len(keep[j])
                        keep[j] = text
                        while chars > max_chars and keep:  # stay under the character budget
                            chars -= len(keep.pop(rng.randrange(len(keep))))
    if not keep:
        raise DataError(files[0] if files else "<corpus>", None, "the corpus holds no non-empty document")
    return keep, {"documents_read": seen, "documents_sampled": len(keep), "chars_sampled": chars}
