"""``zhtune vocab train|merge|stats``: the vocabulary stage, one module per subcommand."""

from __future__ import annotations

import importlib

SUBCOMMANDS = {
    "train": ("zhtune.vocab.train", "learn a Chinese vocabulary from text files"),
    "merge": ("zhtune.vocab.merge", "merge it into a base tokenizer (base ids unchanged)"),
    "stats": ("zhtune.vocab.stats", "tokens per character and per Han character of tokenizers on text"),
}


def usage() -> str:
    lines = ["usage: zhtune vocab <train|merge|stats> [recipe.yaml] [--option value ...]", "", "subcommands:"]
    lines += [f"  {name:<6}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] not in SUBCOMMANDS:
        print(f"zhtune vocab: unknown subcommand {argv[0]!r}\n{usage()}", file=sys.stderr)
        return 2
    return int(importlib.import_module(SUBCOMMANDS[argv[0]][0]).cli(argv[1:]) or 0)


def main(cfg: dict) -> dict:
    """``main({"command": "merge", ...options})`` runs one subcommand from Python."""
    cfg = dict(cfg)
    name = cfg.pop("command")
    return importlib.import_module(SUBCOMMANDS[name][0]).main(cfg)
