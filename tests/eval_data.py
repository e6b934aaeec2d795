"""Small benchmark folders in the exact layouts C-Eval, CMMLU and MMLU publish, for the eval tests."""

from __future__ import annotations

import csv
from pathlib import Path

QUESTIONS = [
    ("TCP 属于哪一层协议？", ("应用层", "传输层", "网络层", "物理层"), "B"),
    ("IP 地址（IPv4）有多少位？", ("16", "32", "64", "128"), "B"),
    ("HTTP 默认端口是？", ("80", "21", "22", "25"), "A"),
    ("DNS 的作用是\n什么？", ("域名解析", "文件传输", "收发邮件", "加密"), "A"),
    ("以太网帧最小长度是多少字节？", ("32", "64", "128", "256"), "B"),
    ("光在真空中的速度约为？", ("3×10^5 m/s", "3×10^8 m/s", "3×10^6 m/s", "340 m/s"), "B"),
    ("下列哪一个是惰性气体？", ("氧", "氮", "氦", "氢"), "C"),
    ("“床前明月光”的作者是？", ("杜甫", "李白", "白居易", "王维"), "B"),
]


def _write(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)


def write_ceval(root: Path, subjects=("computer_network", "high_school_physics", "law")) -> Path:
    """C-Eval: {split}/{subject}_{split}.csv; dev/val id,question,A,B,C,D,answer,explanation; test without answer."""
    for k, subject in enumerate(subjects):
        qs = QUESTIONS[k:] + QUESTIONS[:k]
        head = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
        _write(
            root / "dev" / f"{subject}_dev.csv",
            [head] + [[str(i), q, *o, a, f"{i + 1}. 解析"] for i, (q, o, a) in enumerate(qs[:3])],
        )
        _write(
            root / "val" / f"{subject}_val.csv",
            [head] + [[str(i), q, *o, a, ""] for i, (q, o, a) in enumerate(qs[3:])],
        )
        _write(
            root / "test" / f"{subject}_test.csv",
            [head[:6]] + [[str(100 + i), q, *o] for i, (q, o, _) in enumerate(qs[3:7])],
        )
    return root


def write_cmmlu(root: Path, subjects=("agronomy", "chinese_history")) -> Path:
    """CMMLU: {split}/{subject}.csv with an unnamed index column, then Question,A,B,C,D,Answer."""
    for k, subject in enumerate(subjects):
        qs = QUESTIONS[k:] + QUESTIONS[:k]
        head = ["", "Question", "A", "B", "C", "D", "Answer"]
        _write(
            root / "dev" / f"{subject}.csv",
            [head] + [[str(i), q, *o, a] for i, (q, o, a) in enumerate(qs[:2])],
        )
        _write(
            root / "test" / f"{subject}.csv",
            [head] + [[str(i), q, *o, a] for i, (q, o, a) in enumerate(qs[2:])],
        )
    return root


def write_mmlu(root: Path, subjects=("abstract_algebra", "world_religions")) -> Path:
    """MMLU: {split}/{subject}_{split}.csv, no header: question,A,B,C,D,answer."""
    for k, subject in enumerate(subjects):
        qs = QUESTIONS[k:] + QUESTIONS[:k]
        _write(root / "dev" / f"{subject}_dev.csv", [[q, *o, a] for q, o, a in qs[:2]])
        _write(root / "test" / f"{subject}_test.csv", [[q, *o, a] for q, o, a in qs[2:]])
    return root
