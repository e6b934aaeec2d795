"""``zhtune data dedup``: remove exact and near-duplicate conversations, with a report of the clusters.

Text is normalised first (NFKC, case folded, whitespace and punctuation removed). Exact duplicates share a
64-bit hash of that text. Near duplicates are found with MinHash over character ``--ngram`` shingles and
datasketch's LSH index at ``--threshold`` Jaccard similarity; each LSH candidate is then checked against
the MinHash estimate, so a pair is removed only when its estimated similarity reaches the threshold.

Levels: ``document`` (all turns), ``prompt`` (the user turns: one answer per question), or ``turn`` (each
human/assistant pair: pairs seen before are cut out of a conversation, which is dropped when none is
left). The first occurrence is kept; the others are removed and listed under it in ``--clusters_file``.
Memory grows with the number of kept units (about 2 KB each with the default 128 permutations).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from array import array
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

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
from zhtune.text.formats import extras_of, from_messages, split_system
from zhtune.text.records import json_line

DESCRIPTION = "Remove exact and near-duplicate conversations (MinHash LSH), document, prompt or turn level."
NON_WORD = re.compile(r"[\W_]+")


@dataclass
class DedupArgs:
    """what counts as a duplicate"""

    method: Literal["exact", "near", "both"] = field(
        "both", "exact (normalised hash), near (MinHash LSH) or both."
    )
    level: Literal["document", "prompt", "turn"] = field(
        "document", "Compare whole conversations, their user turns only, or each human/assistant pair."
    )
    threshold: float = field(0.8, "Jaccard similarity from which two texts are near duplicates.")
    num_perm: int = field(128, "MinHash permutations (more: a finer similarity estimate, more memory).")
    ngram: int = field(5, "Characters per shingle.")
    seed: int = field(1, "Seed of the MinHash permutations.")
    clusters_file: str | None = field(
        None, "Write the clusters removed here as JSON Lines (kept and removed)."
    )

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"--threshold is a Jaccard similarity in (0, 1], got {self.threshold}")
        if self.num_perm < 16:
            raise ConfigError(f"--num_perm {self.num_perm} is too few; use at least 16 (128 is usual)")
        if self.ngram < 1:
            raise ConfigError("--ngram must be at least 1")


SECTIONS = {"input": InputArgs, "output": OutputArgs, "dedup": DedupArgs}


def normalise(text: str) -> str:
    return NON_WORD.sub("", unicodedata.normalize("NFKC", text).casefold())


def text_hash(norm: str) -> int:
    return int.from_bytes(hashlib.blake2b(norm.encode("utf-8"), digest_size=8).digest(), "little")


FNV_PRIME = 0x100000001B3


def shingle_hashes(norm: str, n: int) -> list[int]:
    """Distinct 32-bit hashes of the character n-grams of ``norm`` (a polynomial rolling hash, in numpy).

    The text itself is hashed when shorter than ``n``. About ten times faster than hashing each shingle
    in Python; MinHash's random permutations are applied on top by datasketch.
    """
    cps = np.frombuffer(norm.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    width = min(n, len(cps)) or 1
    count = max(1, len(cps) - width + 1)
    h = np.zeros(count, dtype=np.uint64)
    prime = np.uint64(FNV_PRIME)
    for k in range(min(width, len(cps))):
        h = h * prime + cps[k : k + count]
    h ^= h >> np.uint64(32)
    return np.unique(h & np.uint64(0xFFFFFFFF)).tolist()


def _identity(x: int) -> int:
    return x


def lsh_params(threshold: float, num_perm: int, recall: float = 0.97) -> tuple[int, int]:
    """Bands and rows for LSH so a pair at the threshold becomes a candidate with this probability.

    datasketch's default balances misses against false candidates; since every candidate is checked
    against its MinHash estimate here, false candidates cost only time, so recall is what to buy.
    """
    for b in range(1, num_perm + 1):
        r = num_perm // b
        if 1 - (1 - threshold**r) ** b >= recall:
            return b, r
    return num_perm, 1


def _band_hash(band: bytes) -> bytes:
    return hashlib.blake2b(band, digest_size=8).digest()


class Signer:
    """MinHash signatures of normalised texts (datasketch), permutations made once."""

    def __init__(self, num_perm: int, ngram: int, seed: int):
        from zhtune.deps import require

        ds = require("datasketch", "near-duplicate detection")
        self.MinHash = ds.MinHash
        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed
        proto = ds.MinHash(num_perm=num_perm, seed=seed)
        self.perms, self.scheme = proto.permutations, proto.scheme

    def __call__(self, norm: str) -> bytes:
        m = self.MinHash(
            num_perm=self.num_perm,
            seed=self.seed,
            hashfunc=_identity,
            permutations=self.perms,
            scheme=self.scheme,
        )
        m.update_batch(shingle_hashes(norm, self.ngram))
        return m.hashvalues.astype(np.uint32).tobytes()


def units_of(msgs: list[dict], level: str) -> list[str]:
    _, body = split_system(msgs)
    if level == "document":
        return ["\n".join(m["content"] for m in msgs)]
    if level == "prompt":
        return ["\n".join(m["content"] for m in body if m["role"] == "user")]
    return [body[i]["content"] + "\n" + body[i + 1]["content"] for i in range(0, len(body), 2)]


class Dedup(Tool):
    name = "dedup"

    def __init__(self, args: DedupArgs):
        self.args = args
        self.signer: Signer | None = None

    def setup(self) -> None:
        if self.args.method != "exact":
            self.signer = Signer(self.args.num_perm, self.args.ngram, self.args.seed)

    def apply(self, rec: Any) -> Result:
        fmt, msgs = messages(rec)
        units = []
        for text in units_of(msgs, self.args.level):
            norm = normalise(text)
            units.append((text_hash(norm), self.signer(norm) if self.signer else None))
        return Result([rec], fmt=fmt, key=units)

    # ---- main process: the index ----
    def _start(self) -> None:
        from datasketch import MinHash, MinHashLSH

        a = self.args
        self.MinHash = MinHash
        self.scheme = MinHash(num_perm=a.num_perm, seed=a.seed).scheme
        params = lsh_params(a.threshold, a.num_perm)
        self.lsh = MinHashLSH(num_perm=a.num_perm, params=params, hashfunc=_band_hash)
        self.exact: dict[int, int] = {}
        self.sigs: list[np.ndarray] = []  # kept units' signatures, in blocks of 4096
        self.unit_rec = array("q")  # kept unit -> record number
        self.rec_file, self.rec_line = array("H"), array("q")
        self.files: list[str] = []
        self.clusters: dict[int, list[tuple[int, str, float]]] = defaultdict(list)

    def _mh(self, arr: np.ndarray) -> Any:
        return self.MinHash(self.args.num_perm, seed=self.args.seed, hashvalues=arr, scheme=self.scheme)

    def _sig(self, u: int) -> np.ndarray:
        return self.sigs[u >> 12][u & 4095]

    def _keep(self, h: int, sig: bytes | None, rec_no: int) -> None:
        u = len(self.unit_rec)
        self.unit_rec.append(rec_no)
        if self.args.method != "near":
            self.exact.setdefault(h, u)
        if sig is not None and self.args.method != "exact":
            arr = np.frombuffer(sig, dtype=np.uint32)
            if u & 4095 == 0:
                self.sigs.append(np.empty((4096, self.args.num_perm), dtype=np.uint32))
            self.sigs[-1][u & 4095] = arr
            self.lsh.insert(u, self._mh(arr), check_duplication=False)

    def _match(self, h: int, sig: bytes | None) -> tuple[int, str, float] | None:
        if self.args.method != "near" and h in self.exact:
            return self.exact[h], "exact", 1.0
        if sig is None or self.args.method == "exact":
            return None
        arr = np.frombuffer(sig, dtype=np.uint32)
        best, best_sim = None, 0.0
        for c in self.lsh.query(self._mh(arr)):
            sim = float(np.mean(self._sig(c) == arr))
            if sim > best_sim or (sim == best_sim and best is not None and c < best):
                best, best_sim = c, sim
        if best is not None and best_sim >= self.args.threshold:
            return best, "near", best_sim
        return None

    def reduce(self, item: Item, path: Path, summary: Summary) -> None:
        if not hasattr(self, "lsh"):
            self._start()
        if not self.files or self.files[-1] != str(path):
            self.files.append(str(path))
        rec_no = len(self.rec_line)
        self.rec_file.append(len(self.files) - 1)
        self.rec_line.append(item.line)
        dup_pairs = []
        for j, (h, sig) in enumerate(item.key):
            m = self._match(h, sig)
            if m is None:
                self._keep(h, sig, rec_no)
                continue
            kept_u, how, sim = m
            self.clusters[kept_u].append((rec_no * 4096 + j, how, sim))
            dup_pairs.append((j, how))
        if not dup_pairs:
            return
        if self.args.level != "turn" or len(dup_pairs) == len(item.key):
            how = "exact" if all(h == "exact" for _, h in dup_pairs) else "near"
            item.outs, item.reason = (
                [],
                f"{how} duplicate" + (" (every turn)" if self.args.level == "turn" else ""),
            )
            return
        rec = json.loads(item.outs[0])
        fmt, msgs = messages(rec)
        system, body = split_system(msgs)
        gone = {j for j, _ in dup_pairs}
        keep = [t for j in range(len(body) // 2) if j not in gone for t in body[2 * j : 2 * j + 2]]
        item.outs = [dumps(from_messages(msgs[:1] + keep if system else keep, fmt, extras_of(rec, fmt)))]
        item.changed = True

    def finish(self, summary: Summary) -> None:
        if not hasattr(self, "lsh"):
            self._start()
        clusters = sorted(self.clusters.items(), key=lambda kv: -len(kv[1]))

        def where(rec_no: int) -> dict[str, Any]:
            return {"file": self.files[self.rec_file[rec_no]], "line": self.rec_line[rec_no]}

        def unit(code: int) -> dict[str, Any]:
            d = where(code >> 12)
            if self.args.level == "turn":
                d["pair"] = code & 4095
            return d

        rows = []
        for kept_u, removed in clusters:
            rows.append(
                {
                    "kept": where(self.unit_rec[kept_u]),
                    "removed": [
                        {**unit(c), "match": how, "similarity": round(s, 3)} for c, how, s in removed
                    ],
                }
            )
        if self.args.clusters_file:
            from zhtune.atomic import atomic_write_text

            atomic_write_text(self.args.clusters_file, "".join(json_line(r) + "\n" for r in rows))
        summary.extra["clusters"] = len(rows)
        summary.extra["units_removed"] = sum(len(r["removed"]) for r in rows)
        summary.extra["largest_clusters"] = rows[:5]

    def notes(self, summary: Summary) -> list[str]:
        a = self.args
        unit = {"document": "conversations", "prompt": "conversations", "turn": "human/assistant pairs"}
        lines = [
            f"duplicate clusters: {summary.extra['clusters']}, {unit[a.level]} removed: {summary.extra['units_removed']}"
        ]
        for r in summary.extra["largest_clusters"][:3]:
            k = r["kept"]
            lines.append(
                f"  kept {k['file']}:{k['line']}, removed {len(r['removed'])}: "
                + ", ".join(f"line {x['line']} ({x['match']} {x['similarity']})" for x in r["removed"][:4])
            )
        if a.clusters_file:
            lines.append(f"clusters: {a.clusters_file}")
        return lines


COMMAND = ToolCommand(Dedup, SECTIONS, DESCRIPTION)
main, cli = COMMAND.main, COMMAND.cli
