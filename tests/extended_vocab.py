"""Tiny Chinese-extended tokenizers built in-process with zhtune vocab, for the embedding and PT tests."""

from __future__ import annotations

import random
from pathlib import Path

from conftest import CORPUS


def made_up_chinese(path: Path, n: int = 400, seed: int = 0) -> Path:
    """Lines of made-up four-character words: text whose words the tiny base tokenizers have never seen."""
    chars = sorted({c for line in CORPUS for c in line if "\u4e00" <= c <= "\u9fff"})
    vocab_rng, rng = random.Random(0), random.Random(seed)  # the same words whatever the seed of the lines
    words = ["".join(vocab_rng.sample(chars, 4)) for _ in range(40)]
    path.write_text(
        "\n".join("".join(rng.choices(words, k=8)) + "。" for _ in range(n)) + "\n", encoding="utf-8"
    )
    return path


def extend(base_dir: Path, work: Path, *, size: int | None = None, max_new: int | None = 150) -> Path:
    """Train a Chinese vocabulary on made-up text and merge it into ``base_dir``; returns the merged directory."""
    from zhtune.vocab import merge, train

    text = made_up_chinese(work / "zh.txt")
    if size is None:
        size = 200 if (base_dir / "tokenizer.model").exists() else 700
    v = train.main(
        {
            "input": [str(text)],
            "base_tokenizer": str(base_dir),
            "vocab_size": size,
            "output_dir": str(work / "v"),
        }
    )
    key = "vocab" if v["kind"] == "bytelevel" else "chinese_sp_model_file"
    opts = {"base_tokenizer": str(base_dir), key: v["path"], "output_dir": str(work / "merged")}
    if key == "vocab" and max_new:
        opts["max_new_tokens"] = max_new
    merge.main(opts)
    return work / "merged"
