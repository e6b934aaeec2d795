"""``zhtune vocab stats``: how efficiently tokenizers encode given text (fewer tokens is cheaper and longer context).

For each tokenizer: tokens, characters, Han characters, tokens per character, characters per token and
tokens per Han character, on the text of the given files. Printed as a table and written as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.config.parse import Config, build, field, parse_cli
from zhtune.errors import ConfigError

DESCRIPTION = "Compare tokenizers on text: tokens per character and per Han character."


@dataclass
class StatsArgs:
    """which tokenizers, which text"""

    tokenizers: list[str] = field(
        factory=list, help="Tokenizers to compare, comma separated: directories, .model files or 'default'."
    )
    input: list[str] = field(
        factory=list, help="Text files or directories (.txt one document a line, .jsonl)."
    )
    text_field: str = field("text", "The text field of .jsonl records.")
    max_lines: int = field(200_000, "Use at most this many documents (a uniform sample beyond that).")
    output_file: str | None = field(None, "Write the figures here as JSON.")

    def __post_init__(self) -> None:
        if not self.tokenizers:
            raise ConfigError("--tokenizers is required (comma separated)")
        if not self.input:
            raise ConfigError("--input is required: text files or directories")


SECTIONS = {"stats": StatsArgs}


def _encoder(name: str) -> Any:
    """A function text -> number of tokens (no special tokens added)."""
    p = Path(name)
    if p.is_file() and p.suffix == ".model":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(p))
        return lambda batch: [len(x) for x in sp.encode(batch)]
    from zhtune.vocab.base import load_base

    tok = load_base(name).tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return lambda batch: [len(e.ids) for e in backend.encode_batch(batch, add_special_tokens=False)]
    return lambda batch: [len(tok.encode(t, add_special_tokens=False)) for t in batch]


def measure(names: list[str], texts: list[str]) -> list[dict[str, Any]]:
    from tqdm import tqdm

    from zhtune.text.documents import count_han

    chars = sum(len(t) for t in texts)
    han = sum(count_han(t) for t in texts)
    rows = []
    for name in names:
        enc = _encoder(name)
        n = 0
        for i in tqdm(range(0, len(texts), 1000), desc=f"encoding with {name}", leave=False):
            n += sum(enc(texts[i : i + 1000]))
        rows.append(
            {
                "tokenizer": name,
                "tokens": n,
                "chars": chars,
                "han_chars": han,
                "tokens_per_char": n / max(chars, 1),
                "chars_per_token": chars / max(n, 1),
                "tokens_per_han_char": n / max(han, 1) if han else None,
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = ("tokenizer", "tokens", "tokens/char", "chars/token", "tokens/Han char")
    body = [
        (
            r["tokenizer"],
            f"{r['tokens']:,}",
            f"{r['tokens_per_char']:.4f}",
            f"{r['chars_per_token']:.3f}",
            "-" if r["tokens_per_han_char"] is None else f"{r['tokens_per_han_char']:.4f}",
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, body)])


def as_config(cfg: Config | dict[str, Any]) -> Config:
    return cfg if isinstance(cfg, Config) else build(SECTIONS, cfg)


def main(cfg: Config | dict[str, Any]) -> dict[str, Any]:
    from zhtune.text.documents import list_text_files, sample_documents

    s = as_config(cfg).stats
    files = list_text_files(s.input)
    texts, counts = sample_documents(files, max_lines=s.max_lines, max_chars=1 << 40, text_field=s.text_field)
    result = {"files": [str(f) for f in files], **counts, "results": measure(s.tokenizers, texts)}
    if s.output_file:
        from zhtune.atomic import write_json

        write_json(Path(s.output_file), result)
    return result


def cli(argv: list[str] | None = None) -> int:
    cfg = parse_cli(argv, SECTIONS, prog="zhtune vocab stats", description=DESCRIPTION)
    r = main(cfg)
    print(table(r["results"]))
    print(f"{r['documents_sampled']:,} documents, {r['results'][0]['chars']:,} characters")
    return 0
