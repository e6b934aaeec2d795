"""Crash-safe writes: everything zhtune produces appears whole or not at all.

Files are written to a temporary sibling and renamed into place (``os.replace`` is atomic on POSIX);
directories are built under a hidden temporary name and renamed once complete. A kill at any point
leaves either the previous output or no output, plus at most a ``.tmp-*`` leftover that later runs
ignore and clean up.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk; a no-op where that is unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` to disk, so a rename cannot publish data still in the page cache."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def tmp_sibling(path: Path) -> Path:
    return path.parent / f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on clean exit it becomes ``final`` in one rename.

    With ``overwrite``, an existing ``final`` is moved aside first and deleted only after the new one is in
    place, so there is no moment without a complete copy on disk.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise FileExistsError(
            f"{final} already exists; choose another output path or pass --overwrite_output_dir"
        )
    tmp = tmp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if final.exists():
            old = tmp_sibling(final)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_files(staging: Path, dest: Path, last: Iterable[str] = ()) -> None:
    """Move every file of ``staging`` into ``dest`` by rename, the names in ``last`` at the end.

    Used where the output directory also holds other things (checkpoints, logs), so it cannot be swapped
    as a whole: each file still appears atomically, and the marker files that make the directory loadable
    (``adapter_config.json``, ``config.json``) appear only after the weights they describe.
    """
    dest.mkdir(parents=True, exist_ok=True)
    fsync_tree(staging)
    last = list(last)
    names = sorted(p.name for p in staging.iterdir())
    order = [n for n in names if n not in last] + [n for n in last if n in names]
    for name in order:
        src, dst = staging / name, dest / name
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        os.replace(src, dst)
    fsync_dir(dest)
    shutil.rmtree(staging, ignore_errors=True)


def clean_stale_tmp(directory: str | Path) -> list[Path]:
    """Remove ``.tmp-*`` leftovers of a killed run. Returns what was removed."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for p in directory.iterdir():
            if p.name.startswith(TMP_PREFIX):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        p.unlink()
                removed.append(p)
    return removed


def write_json(path: str | Path, data: object) -> None:
    """Write a report as indented UTF-8 JSON, atomically."""
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=2))
