"""Prompts and response parsing for ``zhtune data generate``.

The prompts (Chinese, self-instruct style, after Chinese-LLaMA-Alpaca's ``crawl_prompt.py``) live in
``generate_prompt.yaml``; a user template may replace the batch prompt. Replies are read leniently: a JSON
array, JSON objects scattered in text, or "指令：... 输入：... 输出：..." blocks.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from zhtune.errors import ConfigError

PROMPTS = Path(__file__).with_name("generate_prompt.yaml")
SEEDS = Path(__file__).with_name("seed_tasks_zh.json")
FIELD_NAMES = {"instruction": "instruction", "指令": "instruction", "input": "input", "输入": "input"}
FIELD_NAMES |= {"output": "output", "输出": "output", "回答": "output", "response": "output"}
BLOCK = re.compile(
    r"指令[:：]\s*(.+?)\s*(?:输入[:：]\s*(.*?)\s*)?输出[:：]\s*(.+?)\s*(?=(?:\d+[.、]\s*)?指令[:：]|\Z)", re.S
)


class Prompts:
    def __init__(self, template_file: str | None = None):
        import yaml

        data = yaml.safe_load(PROMPTS.read_text(encoding="utf-8"))
        self.batch: str = data["batch"]
        self.instruction_only: str = data["instruction_only"]
        self.topics: list[str] = data["topics"]
        self.task_types: list[str] = data["task_types"]
        if template_file:
            p = Path(template_file)
            if not p.is_file():
                raise ConfigError(f"--prompt_template {p} does not exist")
            self.batch = p.read_text(encoding="utf-8")
            if "{examples}" not in self.batch:
                raise ConfigError(f"--prompt_template {p} has no {{examples}} placeholder for the seed tasks")

    def render(self, kind: str, rng: random.Random, examples: list[dict], num_tasks: int) -> str:
        shown = "\n".join(
            json.dumps({k: e.get(k, "") for k in ("instruction", "input", "output")}, ensure_ascii=False)
            for e in examples
        )
        if kind == "instruction_only":
            shown = "\n".join(f"- {e['instruction']}" for e in examples)
        template = self.batch if kind == "batch" else self.instruction_only
        return template.format_map(
            {
                "num_tasks": num_tasks,
                "examples": shown,
                "topics": "、".join(rng.sample(self.topics, min(8, len(self.topics)))),
                "task_types": "、".join(rng.sample(self.task_types, min(8, len(self.task_types)))),
            }
        )


def _task(obj: Any) -> dict[str, str] | None:
    if not isinstance(obj, dict):
        return None
    task = {}
    for k, v in obj.items():
        name = FIELD_NAMES.get(str(k).strip().lower())
        if name and isinstance(v, (str, int, float)):
            task[name] = str(v).strip()
    if "instruction" not in task and "output" not in task:
        return None
    return {
        "instruction": task.get("instruction", ""),
        "input": task.get("input", ""),
        "output": task.get("output", ""),
    }


def parse_tasks(text: str) -> list[dict[str, str]]:
    """Tasks found in a reply, in order; fields missing from a task are left empty (and filtered later)."""
    dec = json.JSONDecoder()
    found: list[dict[str, str]] = []
    start = text.find("[")
    if start >= 0:
        try:
            arr, _ = dec.raw_decode(text, start)
            if isinstance(arr, list):
                found = [t for t in map(_task, arr) if t is not None]
        except json.JSONDecodeError:
            pass
    if not found:
        i = text.find("{")
        while i >= 0:
            try:
                obj, end = dec.raw_decode(text, i)
            except json.JSONDecodeError:
                i = text.find("{", i + 1)
                continue
            t = _task(obj)
            if t is not None:
                found.append(t)
            i = text.find("{", end)
    if not found:
        found = [{"instruction": a, "input": b or "", "output": c} for a, b, c in BLOCK.findall(text)]
    return found


def first_line(text: str) -> str:
    """The instruction in a two-step reply: its first non-empty line, without list marks or quotes."""
    for line in text.strip().splitlines():
        line = re.sub(r"^\s*(?:[-*]|\d+[.、)]|新的指令[:：]|指令[:：])\s*", "", line).strip().strip("\"“”'")
        if line:
            return line
    return ""


def load_seeds(path: str | None) -> list[dict[str, str]]:
    """Seed tasks as Alpaca dicts, from any supported format (JSON or JSON Lines)."""
    from zhtune.data.jsonl import BadRecord, detect_layout, iter_raw, parse
    from zhtune.errors import DataError
    from zhtune.text.formats import from_messages
    from zhtune.text.records import to_messages

    p = Path(path) if path else SEEDS
    if not p.is_file():
        raise ConfigError(f"--seed_tasks {p} does not exist")
    seeds = []
    for line, payload, _ in iter_raw(p, detect_layout(p)):
        try:
            rec = parse(payload)
            fmt, msgs = to_messages(rec)
        except (BadRecord, ValueError) as e:
            raise DataError(p, line, f"bad seed task: {e}") from None
        if fmt == "alpaca":
            seeds.append({k: rec.get(k) or "" for k in ("instruction", "input", "output")})
        else:
            seeds.append(from_messages(msgs[-2:], "alpaca"))
    if not seeds:
        raise DataError(p, None, "holds no seed tasks")
    return seeds
