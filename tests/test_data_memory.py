"""The streaming claim under a hard memory limit: a file several times larger than the address space a
process is allowed beyond its start-up size goes through the tools, while loading it whole fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEADROOM_MB = 48
FILE_MB = 100

LIMITED = """
import resource, sys
sys.argv = ["zhtune"] + sys.argv[1:]
import json, zhtune.cli, zhtune.data.convert, zhtune.data.dedup, zhtune.data.tool, numpy, datasketch, tqdm.auto
vm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:")][0] * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + {headroom} * 2**20, resource.RLIM_INFINITY))
if sys.argv[1] == "load-whole":
    with open(sys.argv[2], "rb") as f:
        json.loads(f.read())
    sys.exit(0)
sys.exit(zhtune.cli.main(sys.argv[1:]))
"""


def make_big(path: Path, mb: int, layout: str) -> int:
    """Distinct multi-turn conversations of about 16 KB each, written fast."""
    para = "长江是中国第一长河，流经十一个省级行政区，全长六千三百多公里。" * 40
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        if layout == "json":
            f.write("[\n")
        while f.tell() < mb * 2**20:
            rec = {
                "id": f"c{n}",
                "conversations": [
                    {"from": "human", "value": f"第{n}个问题：{para[: 50 + n % 97]}"},
                    {"from": "gpt", "value": f"回答{n}：" + para * 3},
                    {"from": "human", "value": f"追问{n}"},
                    {"from": "gpt", "value": para + str(n)},
                ],
            }
            if layout == "json" and n:
                f.write(",\n")
            f.write(json.dumps(rec, ensure_ascii=False))
            if layout == "jsonl":
                f.write("\n")
            n += 1
        if layout == "json":
            f.write("\n]\n")
    return n


def limited(*args: str) -> subprocess.CompletedProcess:
    code = LIMITED.replace("{headroom}", str(HEADROOM_MB))
    env = {
        "PYTHONPATH": str(REPO / "src"),
        "PATH": "/usr/bin:/bin",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.parametrize("layout", ["jsonl", "json"])
def test_tools_stream_a_file_larger_than_the_memory_limit(tmp_path, layout):
    big = tmp_path / f"big.{layout}"
    n = make_big(big, FILE_MB, layout)
    assert big.stat().st_size > 2 * HEADROOM_MB * 2**20
    whole = limited("load-whole", str(big))
    assert whole.returncode != 0 and "MemoryError" in whole.stderr  # the limit is real
    out = tmp_path / "out.jsonl"
    rep = tmp_path / "r.json"
    p = limited(
        "data",
        "convert",
        "--in_file",
        str(big),
        "--out_file",
        str(out),
        "--to",
        "messages",
        "--report_file",
        str(rep),
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(rep.read_text())["records_out"] == n
    with open(out, encoding="utf-8") as f:
        first = json.loads(f.readline())
        count = 1 + sum(1 for _ in f)
    assert count == n and first["id"] == "c0" and first["messages"][0]["role"] == "user"
    if layout == "jsonl":  # dedup keeps per-record hashes only: it fits too
        args = ["--out_file", str(tmp_path / "d.jsonl"), "--method", "exact", "--report_file", str(rep)]
        p = limited("data", "dedup", "--in_file", str(big), *args)
        assert p.returncode == 0, p.stderr[-2000:]
        assert json.loads(rep.read_text())["records_out"] == n
