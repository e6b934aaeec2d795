"""Pre-training data: plain text tokenized, concatenated and cut into ``--block_size`` blocks.

Each file is tokenized and grouped once through ``datasets`` and cached on disk under a key of its bytes,
the tokenizer and the options, so a re-run loads the blocks instead of tokenizing again (and adding one file
to a directory tokenizes only that file). Documents are .txt lines or the text field of .jsonl records;
each gets the tokenizer's BOS (where it adds one) and an EOS, as separators in the concatenated stream.

Every block carries ``n_chars``: how many characters of text its predicted tokens (all but the first) spell,
each character counted at the first token that reaches it. Bits per character (total loss in bits over
characters) then compares models whose tokenizers cut the same text into different numbers of tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from zhtune.atomic import atomic_dir
from zhtune.config.parse import field
from zhtune.errors import ConfigError

log = logging.getLogger(__name__)
PT_VERSION = "2"  # bump when encoding or grouping changes, to invalidate caches


@dataclass
class PtDataArgs:
    """pre-training text"""

    dataset_dir: str | None = field(
        None, "Directory whose every .txt (one document a line) and .jsonl file is used."
    )
    train_files: list[str] | None = field(None, "Training files, comma separated (.txt or .jsonl).")
    validation_file: str | None = field(
        None, "Held-out text (.txt or .jsonl) for perplexity and bits per character."
    )
    validation_split_percentage: float = field(
        0.0, "Percent of the training blocks held out for validation when no --validation_file is given."
    )
    block_size: int = field(512, "Tokens per training block.")
    text_field: str = field("text", "The text field of .jsonl records.")
    add_eos: bool = field(True, "End every document with the EOS token.")
    data_cache_dir: str | None = field(
        None,
        "Cache of tokenized blocks (default ~/.cache/zhtune/datasets); a re-run does not tokenize again.",
    )
    overwrite_cache: bool = field(False, "Tokenize again even when a cached copy exists.")
    preprocessing_num_workers: int | None = field(None, "Processes for tokenization.")
    max_train_samples: int | None = field(None, "Use at most this many training blocks.")
    max_eval_samples: int | None = field(None, "Use at most this many validation blocks.")

    def __post_init__(self) -> None:
        if not 0 <= self.validation_split_percentage < 100:
            raise ConfigError("--validation_split_percentage is a percentage in [0, 100)")
        if self.block_size < 8:
            raise ConfigError(f"--block_size {self.block_size} is too short; use at least 8")
        if self.validation_file and self.validation_split_percentage:
            raise ConfigError("give either --validation_file or --validation_split_percentage, not both")


@dataclass
class PtReport:
    files: int = 0
    cached_files: int = 0
    documents: int = 0
    tokens: int = 0
    chars: int = 0
    train_blocks: int = 0
    eval_blocks: int = 0

    def table(self) -> str:
        rows = [(k.replace("_", " "), f"{v:,}") for k, v in asdict(self).items()]
        if self.chars:
            rows.append(("tokens per character", f"{self.tokens / self.chars:.4f}"))
        w = max(len(r[0]) for r in rows)
        return "\n".join(f"  {a:<{w}}  {b}" for a, b in rows)


def encode_documents(
    texts: list[str], tokenizer: Any, add_eos: bool
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids per document and, per token, the characters it completes (0 for specials and byte pieces)."""
    try:
        enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):
        enc, offsets = tokenizer(texts, add_special_tokens=True), None
    ids_out, chars_out = [], []
    for k, ids in enumerate(enc["input_ids"]):
        ids = list(ids)
        if offsets is None:
            chars = [0] * len(ids)
            if chars:
                chars[-1] = len(texts[k])
        else:
            chars, done = [], 0
            for _start, end in offsets[k]:
                chars.append(max(0, end - done))
                done = max(done, end)
        if add_eos and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
            chars.append(0)
        ids_out.append(ids)
        chars_out.append(chars)
    return ids_out, chars_out


def group_blocks(ids: list[list[int]], chars: list[list[int]], block_size: int) -> dict[str, list]:
    """Concatenate documents and cut full blocks (the remainder is dropped), with each block's n_chars."""
    flat_ids = [t for doc in ids for t in doc]
    flat_chars = [c for doc in chars for c in doc]
    n = len(flat_ids) // block_size * block_size
    blocks, n_chars = [], []
    for i in range(0, n, block_size):
        blocks.append(flat_ids[i : i + block_size])
        n_chars.append(sum(flat_chars[i + 1 : i + block_size]))
    return {"input_ids": blocks, "n_chars": n_chars}


def _tokenize(batch: dict[str, list], tokenizer: Any, add_eos: bool) -> dict[str, list]:
    ids, chars = encode_documents(batch["text"], tokenizer, add_eos)
    return {"input_ids": ids, "chars": chars, "n_tokens": [len(x) for x in ids]}


def _group(batch: dict[str, list], block_size: int) -> dict[str, list]:
    return group_blocks(batch["input_ids"], batch["chars"], block_size)


def _gen(path: str, text_field: str):
    from zhtune.text.documents import iter_documents

    for _, text in iter_documents(Path(path), text_field):
        yield {"text": text}


def cache_key(path: Path, tokenizer: Any, d: PtDataArgs) -> str:
    from zhtune.train.sft_data import _file_digest, tokenizer_digest

    h = hashlib.sha256()
    h.update(_file_digest(path).encode())
    h.update(tokenizer_digest(tokenizer).encode())
    h.update(json.dumps([d.block_size, d.add_eos, d.text_field, PT_VERSION]).encode())
    return h.hexdigest()[:16]


def tokenize_file(
    path: Path, tokenizer: Any, d: PtDataArgs, cache_dir: Path
) -> tuple[Any, dict[str, int], bool]:
    """One file's blocks, from the cache or tokenized now. Returns (dataset or None if it fills no block,
    counts, cached)."""
    import datasets

    from zhtune.text.records import dataset_from_generator

    target = cache_dir / f"pt-{path.stem[:40]}-{cache_key(path, tokenizer, d)}"
    if target.is_dir() and not d.overwrite_cache:
        counts = json.loads((target / "zhtune_counts.json").read_text(encoding="utf-8"))
        return (datasets.load_from_disk(str(target)) if counts["blocks"] else None), counts, True
    with tempfile.TemporaryDirectory(prefix="zhtune-pt-") as tmp:
        raw = dataset_from_generator(
            _gen, {"path": str(path), "text_field": d.text_field}, cache_dir=str(Path(tmp) / "gen")
        )
        n_docs = len(raw)
        chars = sum(len(t) for t in raw["text"])
        workers = d.preprocessing_num_workers if (d.preprocessing_num_workers or 0) > 1 else None
        docs = raw.map(
            _tokenize,
            batched=True,
            num_proc=workers,
            remove_columns=["text"],
            fn_kwargs={"tokenizer": tokenizer, "add_eos": d.add_eos},
            desc=f"Tokenizing {path.name}",
        )
        tokens = int(sum(docs["n_tokens"]))
        blocks = None
        if tokens >= d.block_size:  # else no block at all (and datasets cannot store zero rows)
            blocks = docs.map(
                _group,
                batched=True,
                batch_size=1000,
                num_proc=workers,
                remove_columns=["input_ids", "chars", "n_tokens"],
                fn_kwargs={"block_size": d.block_size},
                desc=f"Grouping into blocks of {d.block_size}",
            )
        counts = {
            "documents": n_docs,
            "chars": chars,
            "tokens": tokens,
            "blocks": len(blocks) if blocks else 0,
        }
        with atomic_dir(target, overwrite=True) as out:
            if blocks is not None:
                blocks.save_to_disk(str(out))
            (out / "zhtune_counts.json").write_text(json.dumps(counts), encoding="utf-8")
    return (datasets.load_from_disk(str(target)) if counts["blocks"] else None), counts, False


def pt_files(d: PtDataArgs) -> list[Path]:
    from zhtune.errors import DataError
    from zhtune.text.documents import list_text_files

    given = ([d.dataset_dir] if d.dataset_dir else []) + list(d.train_files or [])
    if not given:
        raise DataError("<config>", None, "no training text: pass --dataset_dir or --train_files")
    return list_text_files(given)


def build_pt_data(tokenizer: Any, d: PtDataArgs, seed: int) -> tuple[Any, Any | None, PtReport]:
    """Training and optional validation blocks, with a report of what was read."""
    import datasets

    from zhtune.errors import DataError
    from zhtune.model.default import cache_root
    from zhtune.text.documents import list_text_files

    cache_dir = Path(d.data_cache_dir) if d.data_cache_dir else cache_root() / "datasets"
    rep = PtReport()
    parts = []
    files = pt_files(d)
    for f in files:
        ds, counts, cached = tokenize_file(f, tokenizer, d, cache_dir)
        if ds is not None:
            parts.append(ds)
        rep.files += 1
        rep.cached_files += int(cached)
        rep.documents += counts["documents"]
        rep.tokens += counts["tokens"]
        rep.chars += counts["chars"]
    if not parts:
        raise DataError(
            files[0],
            None,
            f"no full block of {d.block_size} tokens in {rep.tokens:,} tokens: lower --block_size",
        )
    train = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    eval_ds = None
    if d.validation_file:
        (vf,) = list_text_files([d.validation_file])
        eval_ds, _, _ = tokenize_file(vf, tokenizer, d, cache_dir)
        if eval_ds is None:
            raise DataError(vf, None, f"the validation text holds no block of {d.block_size} tokens")
    elif d.validation_split_percentage > 0 and len(train) > 1:
        n_eval = max(1, int(round(len(train) * d.validation_split_percentage / 100)))
        split = train.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
        train, eval_ds = split["train"], split["test"]
    if d.max_train_samples:
        train = train.shuffle(seed=seed).select(range(min(d.max_train_samples, len(train))))
    if eval_ds is not None and d.max_eval_samples:
        eval_ds = eval_ds.select(range(min(d.max_eval_samples, len(eval_ds))))
    if len(train) == 0:
        raise DataError(
            files[0],
            None,
            f"no full block of {d.block_size} tokens in {rep.tokens:,} tokens: lower --block_size",
        )
    if eval_ds is not None and len(eval_ds) == 0:
        raise DataError(
            d.validation_file or files[0],
            None,
            f"the validation text holds no block of {d.block_size} tokens",
        )
    rep.train_blocks = len(train)
    rep.eval_blocks = len(eval_ds) if eval_ds is not None else 0
    return train, eval_ds, rep


class BlockCollator:
    """Stack blocks into a batch; labels are the inputs (the model shifts them)."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone()}
