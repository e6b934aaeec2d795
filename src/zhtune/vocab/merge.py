"""``zhtune vocab merge``: extend a base tokenizer with a Chinese vocabulary, base ids unchanged.

SentencePiece bases get the Chinese pieces appended to their model proto (:mod:`zhtune.vocab.sp`);
byte-level BPE bases get new vocab entries and merges (:mod:`zhtune.vocab.bpe`). The output directory
loads with ``AutoTokenizer.from_pretrained`` and keeps the base's special tokens and chat template; it is
checked before it is published (base ids, English and code ids, fast against SentencePiece).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zhtune.config.parse import Config, build, field, parse_cli
from zhtune.errors import ConfigError
from zhtune.vocab.base import Base, load_base

log = logging.getLogger(__name__)
DESCRIPTION = "Merge a Chinese vocabulary into a LLaMA-family tokenizer (SentencePiece or byte-level BPE)."

# text with no CJK character: a merged tokenizer must give these exactly the base's ids (BPE bases)
PROBE = [
    "The quick brown fox jumps over the lazy dog. It's 3.14 o'clock, isn't it?",
    "Large language models are trained on trillions of tokens; fine-tuning adapts them.",
    "def merge(a: list[int], b: list[int]) -> list[int]:\n    return sorted(a + b)  # O(n log n)\n",
    'for (int i = 0; i < n; ++i) { printf("%d\\n", x[i]); }',
    "  leading spaces,\ttabs and\n\nnewlines  ",
    "Café naïve — “quotes” and émoji 🎉, Ελληνικά, русский.",
]
PROBE_ZH = [
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "人民日报发表新年讲话，迈向充满希望的新世纪。",
    "中共中央总书记、国家主席江泽民发表１９９８年新年讲话。",
    "机器学习让计算机从数据中学习规律 (machine learning)。",
]


@dataclass
class MergeArgs:
    """what to merge"""

    base_tokenizer: str | None = field(
        None,
        "Base tokenizer: a directory, a SentencePiece .model file or 'default'. Alias: --llama_tokenizer_dir.",
    )
    chinese_sp_model_file: str | None = field(None, "A SentencePiece model whose pieces are added.")
    vocab: str | None = field(
        None,
        "A tokenizer.json (or its directory) from 'zhtune vocab train' on a byte-level BPE base, or a .model.",
    )
    output_dir: str = field("outputs/merged_tokenizer", "Where the merged tokenizer is written.")
    piece_scores: Literal["ranked", "zero"] = field(
        "ranked",
        "SentencePiece bases: 'ranked' gives new pieces distinct scores above the base (SentencePiece, llama.cpp "
        "and the fast tokenizer agree); 'zero' scores them 0 exactly as Chinese-LLaMA did.",
    )
    max_new_tokens: int | None = field(
        None, "Byte-level BPE bases: add at most this many tokens (in training order)."
    )
    check_files: list[str] | None = field(
        None,
        "Text files whose ids must not change (non-CJK lines), on top of the built-in English/code probe.",
    )
    overwrite_output_dir: bool = field(False, "Replace an existing --output_dir.")

    def __post_init__(self) -> None:
        if not self.base_tokenizer:
            raise ConfigError("--base_tokenizer (or --llama_tokenizer_dir) is required")
        if bool(self.chinese_sp_model_file) == bool(self.vocab):
            raise ConfigError("give one of --chinese_sp_model_file and --vocab")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise ConfigError("--max_new_tokens must be positive")


SECTIONS = {"merge": MergeArgs}


def _read_lines(files: list[str]) -> list[str]:
    from zhtune.text.documents import iter_documents, list_text_files

    return [t for f in list_text_files(files) for _, t in iter_documents(f)]


def _has_cjk(text: str) -> bool:
    return any(0x3000 <= ord(c) <= 0x9FFF or 0xFF00 <= ord(c) <= 0xFFFF or 0x20000 <= ord(c) for c in text)


def _merge_sp(m: MergeArgs, base: Base, tmp: Path) -> dict[str, Any]:
    from transformers import LlamaTokenizer

    from zhtune.text.templates import save_tokenizer
    from zhtune.vocab.sp import load_proto, merge_protos, special_pieces, vocab_and_merges

    src = Path(m.chinese_sp_model_file or m.vocab)
    try:
        chinese = load_proto(src.read_bytes())
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{src} is not a SentencePiece model: {e}") from None
    try:
        merged, counts = merge_protos(base.sp_proto, chinese, m.piece_scores)
    except ValueError as e:
        raise ConfigError(f"{base.origin}: {e}") from None
    vocab, merges = vocab_and_merges(merged)
    n_base = len(base.sp_proto.pieces)
    if base.tokenizer is None:
        tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, **special_pieces(merged))
        save_tokenizer(tok, tmp)
    else:
        beyond = {t: i for t, i in base.tokenizer.get_added_vocab().items() if i >= n_base}
        if beyond:
            raise ConfigError(
                f"{base.origin} has added tokens after its SentencePiece pieces ({beyond}); appending pieces would "
                "move them. Merge into the tokenizer without them, then add them again."
            )
        save_tokenizer(base.tokenizer, tmp)
        spec = json.loads((tmp / "tokenizer.json").read_text(encoding="utf-8"))
        as_str = bool(spec["model"].get("merges")) and isinstance(spec["model"]["merges"][0], str)
        spec["model"]["vocab"] = vocab
        spec["model"]["merges"] = [f"{a} {b}" if as_str else [a, b] for a, b in merges]
        (tmp / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (tmp / "tokenizer.model").write_bytes(merged.SerializeToString())
    return {"kind": "sentencepiece", "piece_scores": m.piece_scores, **counts}


def _bpe_candidates(path: Path) -> list[tuple[str, tuple[str, str] | None]]:
    from zhtune.vocab.bpe import byte_decoder, candidates_from_tokenizer_json
    from zhtune.vocab.sp import NORMAL, load_proto

    if path.is_dir():
        path = path / "tokenizer.json"
    if path.suffix == ".model":
        enc = {b: c for c, b in byte_decoder().items()}
        pieces = [p.piece for p in load_proto(path.read_bytes()).pieces if p.type == NORMAL]
        return [("".join(enc[b] for b in p.replace("\u2581", " ").encode("utf-8")), None) for p in pieces]
    try:
        return candidates_from_tokenizer_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, ValueError) as e:
        raise ConfigError(f"--vocab {path}: not a BPE tokenizer.json ({e})") from None


def _merge_bpe(m: MergeArgs, base: Base, tmp: Path) -> dict[str, Any]:
    from zhtune.text.templates import save_tokenizer
    from zhtune.vocab.bpe import extend

    src = Path(m.vocab or m.chinese_sp_model_file)
    cands = _bpe_candidates(src)
    backend = base.tokenizer.backend_tokenizer
    spec = json.loads(backend.to_str())
    pre = backend.pre_tokenizer
    new_spec, rep = extend(
        spec,
        cands,
        max_new_tokens=m.max_new_tokens,
        pretokenize=(lambda s: pre.pre_tokenize_str(s)) if pre is not None else None,
    )
    save_tokenizer(base.tokenizer, tmp)
    (tmp / "tokenizer.json").write_text(json.dumps(new_spec, ensure_ascii=False), encoding="utf-8")
    out = {k: v for k, v in rep.__dict__.items() if k != "new_tokens"}
    out["total"] = len(new_spec["model"]["vocab"]) + sum(
        1 for t in new_spec.get("added_tokens") or [] if t["content"] not in new_spec["model"]["vocab"]
    )
    return {"kind": "bytelevel", **out}


def verify(base: Base, out_dir: Path, extra_lines: list[str], kind: str) -> dict[str, Any]:
    """Reload the merged tokenizer and check what must hold; returns the figures for the report."""
    from transformers import AutoTokenizer

    new = AutoTokenizer.from_pretrained(str(out_dir))
    n_base = len(base.tokenizer) if base.tokenizer is not None else len(base.sp_proto.pieces)
    old_tokens = (
        base.tokenizer.convert_ids_to_tokens(list(range(n_base)))
        if base.tokenizer is not None
        else [p.piece for p in base.sp_proto.pieces]
    )
    moved = [
        i
        for i, (a, b) in enumerate(zip(old_tokens, new.convert_ids_to_tokens(list(range(n_base)))))
        if a != b
    ]
    if moved:
        raise RuntimeError(f"internal error: merging moved base ids {moved[:5]}")
    res: dict[str, Any] = {"vocab_size": len(new), "base_vocab_size": n_base}
    if base.tokenizer is not None and base.tokenizer.chat_template:
        res["chat_template_kept"] = new.chat_template == base.tokenizer.chat_template
    res["special_tokens"] = {k: str(v) for k, v in new.special_tokens_map.items()}
    texts = [t for t in PROBE + extra_lines if not _has_cjk(t)]
    if base.tokenizer is not None:
        changed = sum(
            base.tokenizer.encode(t, add_special_tokens=False) != new.encode(t, add_special_tokens=False)
            for t in texts
        )
        res["non_cjk_texts_checked"] = len(texts)
        res["non_cjk_texts_changed"] = changed
        if kind == "bytelevel" and changed:
            raise RuntimeError(f"internal error: {changed} non-CJK texts encode differently after the merge")
    if kind == "sentencepiece":
        from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

        slow = SentencePieceBackend.from_pretrained(str(out_dir))
        # tokenizers' Metaspace adds no dummy prefix before leading whitespace, SentencePiece does: a
        # difference of every LLaMA fast tokenizer, so texts starting with whitespace are left out here
        probe = [t for t in PROBE + PROBE_ZH + extra_lines if t[:1] and not t[:1].isspace()]
        res["fast_slow_disagree"] = sum(
            new.encode(t, add_special_tokens=False) != slow.encode(t, add_special_tokens=False) for t in probe
        )
        res["fast_slow_checked"] = len(probe)
    return res


def as_config(cfg: Config | dict[str, Any]) -> Config:
    return cfg if isinstance(cfg, Config) else build(SECTIONS, cfg)


def main(cfg: Config | dict[str, Any]) -> dict[str, Any]:
    from zhtune.atomic import atomic_dir, write_json
    from zhtune.vocab.base import base_kind

    cfg = as_config(cfg)
    m = cfg.merge
    out = Path(m.output_dir)
    if out.exists() and not m.overwrite_output_dir:
        raise ConfigError(f"{out} already exists; pass --overwrite_output_dir or choose another --output_dir")
    base = load_base(m.base_tokenizer)
    kind = "sentencepiece" if base.sp_proto is not None else base_kind(base.tokenizer)
    if kind == "sentencepiece" and base.tokenizer is not None and base_kind(base.tokenizer) == "bytelevel":
        kind = "bytelevel"  # a stray tokenizer.model next to a byte-level tokenizer.json
    if kind == "other":
        raise ConfigError(f"{m.base_tokenizer}: neither a SentencePiece nor a byte-level BPE tokenizer")
    extra = _read_lines(m.check_files) if m.check_files else []
    with atomic_dir(out, overwrite=m.overwrite_output_dir) as tmp:
        report = _merge_sp(m, base, tmp) if kind == "sentencepiece" else _merge_bpe(m, base, tmp)
        report.update(verify(base, tmp, extra, kind))
        report.update({"base_tokenizer": m.base_tokenizer, "added_from": m.chinese_sp_model_file or m.vocab})
        write_json(tmp / "merge_report.json", report)
    report["output_dir"] = str(out)
    return report


def cli(argv: list[str] | None = None) -> int:
    cfg = parse_cli(argv, SECTIONS, prog="zhtune vocab merge", description=DESCRIPTION)
    r = main(cfg)
    rows = [(k, v) for k, v in r.items() if not isinstance(v, (dict, list))]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
    print(f"done: {r['base_vocab_size']} -> {r['vocab_size']} tokens in {r['output_dir']}")
    return 0
