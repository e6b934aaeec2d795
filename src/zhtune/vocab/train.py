"""``zhtune vocab train``: learn a Chinese vocabulary to merge into a base tokenizer.

* No base, or a SentencePiece base (LLaMA-1/2, Baichuan): sentencepiece BPE or unigram, written as
  ``chinese_sp.model``. With a base, its normalization rule and dummy-prefix setting are used, so the
  pieces match text the way the merged tokenizer will see it.
* A byte-level BPE base (LLaMA-3, Qwen, SmolLM2): a BPE trained by ``tokenizers`` with the base's own
  normalizer and pre-tokenizer over the byte alphabet, written as ``tokenizer.json``; its merges are
  what ``zhtune vocab merge --vocab`` appends to the base.

The corpus is sampled (``--max_lines``, ``--max_chars``), so memory stays bounded on any input size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zhtune.config.parse import Config, build, field, parse_cli
from zhtune.errors import ConfigError
from zhtune.vocab.base import base_kind

log = logging.getLogger(__name__)
DESCRIPTION = "Train a Chinese vocabulary (sentencepiece, or BPE with a byte-level base's pre-tokenizer)."


@dataclass
class VocabTrainArgs:
    """what to train on and what to learn"""

    input: list[str] = field(
        factory=list, help="Text files or directories (.txt one document a line, .jsonl)."
    )
    output_dir: str = field("outputs/vocab", "Where the vocabulary is written.")
    base_tokenizer: str | None = field(
        None,
        "The tokenizer this vocabulary will be merged into (directory, .model file or 'default'). A byte-level "
        "BPE base is trained with its own pre-tokenizer; a SentencePiece base lends its normalization.",
    )
    model_type: Literal["bpe", "unigram"] = field(
        "bpe", "sentencepiece algorithm (no base or SentencePiece base)."
    )
    vocab_size: int = field(20000, "Size of the learned vocabulary.")
    character_coverage: float = field(0.9995, "sentencepiece: share of characters the alphabet must cover.")
    byte_fallback: bool = field(
        False,
        "sentencepiece: spell unknown characters as bytes (for a standalone tokenizer; a merge uses the base's).",
    )
    split_digits: bool = field(True, "sentencepiece: one digit a piece, as LLaMA does.")
    max_piece_length: int = field(
        16, "Longest piece: characters for sentencepiece, bytes for byte-level BPE."
    )
    min_frequency: int = field(2, "byte-level BPE: a merge must occur at least this often.")
    text_field: str = field("text", "The text field of .jsonl records.")
    max_lines: int = field(2_000_000, "Sample at most this many documents.")
    max_chars: int = field(500_000_000, "Sample at most this many characters.")
    seed: int = field(42, "Seed of the sample.")
    num_threads: int = field(2, "Training threads.")
    overwrite_output_dir: bool = field(False, "Replace an existing --output_dir.")

    def __post_init__(self) -> None:
        if not self.input:
            raise ConfigError("--input is required: text files or directories to learn the vocabulary from")
        if self.vocab_size < 100:
            raise ConfigError(f"--vocab_size {self.vocab_size} is too small; use at least 100")
        if not 0.9 <= self.character_coverage <= 1.0:
            raise ConfigError("--character_coverage is a share in [0.9, 1.0], e.g. 0.9995 for Chinese")
        if self.max_lines <= 0 or self.max_chars <= 0:
            raise ConfigError("--max_lines and --max_chars must be positive")


SECTIONS = {"vocab": VocabTrainArgs}


def _train_sentencepiece(v: VocabTrainArgs, docs: list[str], out: Path, base_proto: Any | None) -> Path:
    import sentencepiece as spm

    normalization, dummy_prefix, remove_ws = "nmt_nfkc", True, True
    if base_proto is not None:
        ns = base_proto.normalizer_spec
        normalization, dummy_prefix, remove_ws = (
            ns.name or "identity",
            ns.add_dummy_prefix,
            ns.remove_extra_whitespaces,
        )
    print(
        f"training a sentencepiece {v.model_type} vocabulary of {v.vocab_size} on {len(docs):,} documents",
        flush=True,
    )
    try:
        _spm_train(spm, v, docs, out, normalization, dummy_prefix, remove_ws)
    except RuntimeError as e:
        if "Vocabulary size too high" in str(e):
            raise ConfigError(
                f"--vocab_size {v.vocab_size} is more than this corpus supports: {str(e).split('. ')[-1]}"
            ) from None
        raise
    return out / "chinese_sp.model"


def _spm_train(
    spm: Any,
    v: VocabTrainArgs,
    docs: list[str],
    out: Path,
    normalization: str,
    dummy_prefix: bool,
    remove_ws: bool,
) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs),
        model_prefix=str(out / "chinese_sp"),
        model_type=v.model_type,
        vocab_size=v.vocab_size,
        character_coverage=v.character_coverage,
        byte_fallback=v.byte_fallback,
        split_digits=v.split_digits,
        max_sentencepiece_length=v.max_piece_length,
        normalization_rule_name=normalization,
        add_dummy_prefix=dummy_prefix,
        remove_extra_whitespaces=remove_ws,
        max_sentence_length=1 << 16,
        num_threads=v.num_threads,
        seed_sentencepiece_size=min(1_000_000, max(10 * v.vocab_size, 100_000)),
        minloglevel=1,
    )


def _train_bytelevel(v: VocabTrainArgs, docs: list[str], out: Path, base: Any) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = base.backend_tokenizer
    tk = Tokenizer(models.BPE())
    if backend.normalizer is not None:
        tk.normalizer = backend.normalizer
    tk.pre_tokenizer = backend.pre_tokenizer
    if backend.decoder is not None:
        tk.decoder = backend.decoder
    trainer = trainers.BpeTrainer(
        vocab_size=v.vocab_size,
        min_frequency=v.min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=v.max_piece_length,
        show_progress=True,
    )
    print(
        f"training a byte-level BPE of {v.vocab_size} with the base's pre-tokenizer on {len(docs):,} documents",
        flush=True,
    )
    tk.train_from_iterator(docs, trainer=trainer, length=len(docs))
    path = out / "tokenizer.json"
    tk.save(str(path))
    return path


def as_config(cfg: Config | dict[str, Any]) -> Config:
    return cfg if isinstance(cfg, Config) else build(SECTIONS, cfg)


def main(cfg: Config | dict[str, Any]) -> dict[str, Any]:
    from zhtune.atomic import atomic_dir, write_json
    from zhtune.text.documents import list_text_files, sample_documents
    from zhtune.vocab.base import load_base

    v = as_config(cfg).vocab
    out = Path(v.output_dir)
    if out.exists() and not v.overwrite_output_dir:
        raise ConfigError(f"{out} already exists; pass --overwrite_output_dir or choose another --output_dir")
    base = load_base(v.base_tokenizer) if v.base_tokenizer else None
    kind = "sentencepiece" if base is None or base.sp_proto is not None else base_kind(base.tokenizer)
    if kind == "other":
        raise ConfigError(
            f"the base tokenizer {v.base_tokenizer} is neither SentencePiece nor byte-level BPE; zhtune can "
            "extend those two kinds"
        )
    files = list_text_files(v.input)
    docs, counts = sample_documents(
        files, max_lines=v.max_lines, max_chars=v.max_chars, text_field=v.text_field, seed=v.seed
    )
    with atomic_dir(out, overwrite=v.overwrite_output_dir) as tmp:
        if kind == "sentencepiece":
            made = _train_sentencepiece(v, docs, tmp, base.sp_proto if base else None)
        else:
            made = _train_bytelevel(v, docs, tmp, base.tokenizer)
        report = {
            "kind": kind,
            "file": made.name,
            "base_tokenizer": v.base_tokenizer,
            "files": [str(f) for f in files],
            **counts,
            "config": as_config(cfg).to_dict(),
        }
        write_json(tmp / "vocab_train.json", report)
    report["path"] = str(out / made.name)
    return report


def cli(argv: list[str] | None = None) -> int:
    cfg = parse_cli(argv, SECTIONS, prog="zhtune vocab train", description=DESCRIPTION)
    r = main(cfg)
    print(f"done: {r['kind']} vocabulary from {r['documents_sampled']:,} documents -> {r['path']}")
    return 0
