"""``zhtune vocab train|merge|stats``: the vocabulary stage, one module per subcommand."""

from __future__ import annotations

from zhtune.config.subcommands import Subcommands

SUBCOMMANDS = {
    "train": ("zhtune.vocab.train", "learn a Chinese vocabulary from text files"),
    "merge": ("zhtune.vocab.merge", "merge it into a base tokenizer (base ids unchanged)"),
    "stats": ("zhtune.vocab.stats", "tokens per character and per Han character of tokenizers on text"),
}

VOCAB = Subcommands("zhtune vocab", SUBCOMMANDS)
cli, main = VOCAB.cli, VOCAB.main  # main({"command": "merge", ...options}) runs one from Python
