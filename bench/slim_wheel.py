"""Rewrite a wheel without the files a training benchmark never imports, so the carried wheels fit the GPU
machine's 64 MiB transfer limit: unsloth without its Studio web app (``studio/``, 80 MB of the 88 MB), and
bitsandbytes with only the CUDA libraries of the CUDA versions named. RECORD loses the dropped files' lines;
every kept file is byte-identical.

    python bench/slim_wheel.py WHEEL --drop studio/ [--keep_cuda 130,132]
"""

from __future__ import annotations

import argparse
import os
import re
import zipfile
from pathlib import Path


def dropped(name: str, prefixes: list[str], keep_cuda: list[str]) -> bool:
    if any(name.startswith(p) for p in prefixes):
        return True
    m = re.search(r"libbitsandbytes_(cuda\d+|rocm\d+)\.so$", name)
    return bool(m and keep_cuda and m.group(1) not in {f"cuda{v}" for v in keep_cuda})


def slim(path: Path, prefixes: list[str], keep_cuda: list[str]) -> tuple[int, int]:
    tmp = path.with_suffix(".tmp")
    gone = 0
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            name = info.filename
            if dropped(name, prefixes, keep_cuda):
                gone += 1
                continue
            data = src.read(name)
            if name.endswith(".dist-info/RECORD"):
                rows = data.decode().splitlines()
                data = (
                    "\n".join(r for r in rows if not dropped(r.split(",")[0], prefixes, keep_cuda)) + "\n"
                ).encode()
            dst.writestr(info, data)
    os.replace(tmp, path)
    return gone, path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("wheel", type=Path)
    ap.add_argument("--drop", nargs="*", default=[], help="path prefixes inside the wheel to leave out")
    ap.add_argument(
        "--keep_cuda", default="", help="bitsandbytes: CUDA versions whose library stays (130,132)"
    )
    a = ap.parse_args()
    gone, size = slim(a.wheel, a.drop, [v for v in a.keep_cuda.split(",") if v])
    print(f"{a.wheel.name}: {gone} files dropped, {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
