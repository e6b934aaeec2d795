"""``zhtune data merge``: several files into one (FastChat's ``merge.py``), with ids kept unique.

Records are checked and copied in file order. A record whose id was already used gets the first free
``<id>_<n>``; a record without one gets ``<file stem>_<line>`` (``--add_ids false`` leaves it without).
Seen ids are kept as 64-bit hashes, about 100 bytes each in memory, whatever the records' size.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.config.parse import field
from zhtune.data.jsonl import dumps
from zhtune.data.tool import (
    InputArgs,
    Item,
    OutputArgs,
    Result,
    Summary,
    Tool,
    ToolCommand,
    messages,
)
from zhtune.errors import ConfigError

DESCRIPTION = "Merge several instruction files into one (FastChat merge.py), keeping ids unique."


@dataclass
class MergeArgs:
    """ids"""

    id_field: str = field("id", "The field that holds a record's id.")
    add_ids: bool = field(True, "Give records without an id one: <file stem>_<line>.")

    def __post_init__(self) -> None:
        if not self.id_field:
            raise ConfigError("--id_field must name a field, e.g. id")


SECTIONS = {"input": InputArgs, "output": OutputArgs, "merge": MergeArgs}


def _h(value: str) -> int:
    return int.from_bytes(hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest(), "little")


class Merge(Tool):
    name = "merge"

    def __init__(self, args: MergeArgs):
        self.id_field, self.add_ids = args.id_field, args.add_ids
        self.seen: set[int] = set()
        self.next_suffix: Counter = Counter()
        self.renamed = self.added = 0

    def apply(self, rec: Any) -> Result:
        fmt, _ = messages(rec)
        rid = rec.get(self.id_field)
        return Result([rec], fmt=fmt, key=None if rid is None else str(rid))

    def _free(self, base: str) -> str:
        while True:
            self.next_suffix[base] += 1
            cand = f"{base}_{self.next_suffix[base]}"
            if _h(cand) not in self.seen:
                return cand

    def reduce(self, item: Item, path: Path, summary: Summary) -> None:
        rid = item.key
        if rid is None and not self.add_ids:
            return
        new = None
        if rid is None:
            new = f"{path.stem}_{item.line}"
            if _h(new) in self.seen:
                new = self._free(new)
            self.added += 1
        elif _h(rid) in self.seen:
            new = self._free(rid)
            self.renamed += 1
        if new is None:
            self.seen.add(_h(rid))
            return
        self.seen.add(_h(new))
        rec = json.loads(item.outs[0])
        rec = {self.id_field: new, **{k: v for k, v in rec.items() if k != self.id_field}}
        item.outs = [dumps(rec)]
        item.changed = True

    def finish(self, summary: Summary) -> None:
        summary.extra["ids_renamed"] = self.renamed
        summary.extra["ids_added"] = self.added

    def notes(self, summary: Summary) -> list[str]:
        e = summary.extra
        return [f"ids renamed to stay unique: {e['ids_renamed']}, ids added: {e['ids_added']}"]


COMMAND = ToolCommand(Merge, SECTIONS, DESCRIPTION)
main, cli = COMMAND.main, COMMAND.cli
