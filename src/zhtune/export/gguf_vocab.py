"""A Hugging Face tokenizer as GGUF metadata: llama.cpp's ``llama`` (SentencePiece) or ``gpt2`` (byte-level BPE).

Tokens, scores and types come from ``tokenizer.model`` when the directory has one (exactly what
SentencePiece holds, extended Chinese pieces included), else from the fast tokenizer's own JSON: BPE
merges give the scores (a piece made by an earlier merge scores higher), added tokens become control
(special) or user-defined tokens. The vocabulary is padded to the model's embedding rows, as llama.cpp
requires. Merges are written for both kinds, so readers that rebuild the tokenizer from merges
(transformers' GGUF loader) need not guess them from scores.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zhtune.errors import ConfigError

# gguf.TokenType values (kept here so this table reads without importing gguf)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass
class Vocab:
    model: str  # "llama" | "gpt2"
    pre: str | None  # llama.cpp pre-tokenizer name for gpt2 vocabularies
    tokens: list[str]
    scores: list[float]
    types: list[int]
    merges: list[str]
    special: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad, eot -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None


def _backend_json(tok: Any) -> dict[str, Any]:
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is None:
        raise ConfigError(
            f"{type(tok).__name__} has no fast (tokenizers) backend; GGUF export needs tokenizer.json "
            "or a SentencePiece tokenizer.model"
        )
    return json.loads(backend.to_str())


def _walk(node: Any) -> list[dict[str, Any]]:
    """Flatten a pre_tokenizer / normalizer tree (Sequence nodes) into its parts."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        out: list[dict[str, Any]] = []
        for sub in node.get("pretokenizers") or node.get("normalizers") or []:
            out += _walk(sub)
        return out
    return [node]


def _kind(tj: dict[str, Any]) -> str:
    parts = _walk(tj.get("pre_tokenizer"))
    model = tj.get("model") or {}
    if any(p.get("type") == "ByteLevel" for p in parts):
        return "gpt2"
    if model.get("type") in ("BPE", "Unigram") and (
        model.get("byte_fallback")
        or any(p.get("type") == "Metaspace" for p in parts)
        or model.get("type") == "Unigram"
    ):
        return "llama"
    raise ConfigError(
        f"tokenizer model {model.get('type')} with pre-tokenizer {[p.get('type') for p in parts]}: neither a "
        "SentencePiece (byte-fallback/Metaspace) nor a byte-level BPE vocabulary, which is what GGUF llama supports"
    )


def _pre_name(tj: dict[str, Any]) -> str:
    """The llama.cpp pre-tokenizer that splits text like this tokenizer's pre_tokenizer does."""
    parts = _walk(tj.get("pre_tokenizer"))
    types = [p.get("type") for p in parts]
    byte_level = next(p for p in parts if p.get("type") == "ByteLevel")
    if types == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"
    if (
        types == ["Digits", "ByteLevel"]
        and parts[0].get("individual_digits")
        and byte_level.get("use_regex", True)
    ):
        return "smollm"
    splits = [p for p in parts if p.get("type") == "Split"]
    if len(splits) == 1 and not byte_level.get("use_regex", True):
        pat = (splits[0].get("pattern") or {}).get("Regex", "")
        if r"\p{N}{1,3}" in pat and r"[^\r\n\p{L}\p{N}]?\p{L}+" in pat:
            return "llama-bpe"
        if r"\p{N}|" in pat and r"[^\r\n\p{L}\p{N}]?\p{L}+" in pat:
            return "qwen2"
    raise ConfigError(
        f"the tokenizer's pre-tokenizer ({types}) has no llama.cpp counterpart known to zhtune "
        "(supported: GPT-2 byte-level, SmolLM digits+byte-level, LLaMA-3 and Qwen2 regex splits)"
    )


def _merges(model: dict[str, Any]) -> list[str]:
    out = []
    for m in model.get("merges") or []:
        out.append(" ".join(m) if isinstance(m, list) else m)
    return out


def _sp_pieces(path: Path) -> tuple[list[str], list[float], list[int], bool]:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    kinds = {1: NORMAL, 2: UNKNOWN, 3: CONTROL, 4: USER_DEFINED, 5: UNUSED, 6: BYTE}
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [kinds.get(int(p.type), NORMAL) for p in proto.pieces]
    spm.SentencePieceProcessor(model_proto=proto.SerializeToString())  # fails loudly on a broken model
    return tokens, scores, types, bool(proto.normalizer_spec.add_dummy_prefix)


def build_vocab(tok: Any, tok_dir: str | Path | None, rows: int, chat_template: str | None) -> Vocab:
    """GGUF vocabulary for ``tok``, padded to ``rows`` entries (the model's embedding rows)."""
    if len(tok) > rows:
        raise ConfigError(f"the tokenizer has {len(tok)} tokens but the model only {rows} embedding rows")
    tj = _backend_json(tok)
    model = tj.get("model") or {}
    kind = _kind(tj)
    added = {a["id"]: a for a in tj.get("added_tokens") or []}
    vocab = tok.get_vocab()
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    merges = _merges(model)
    sp_file = Path(tok_dir) / "tokenizer.model" if tok_dir else None
    add_space = None

    from_sp = kind == "llama" and sp_file is not None and sp_file.is_file()
    rank = {m.replace(" ", ""): r for r, m in enumerate(merges)}
    unigram = (
        {i: float(s) for i, (_, s) in enumerate(model.get("vocab") or [])}
        if model.get("type") == "Unigram"
        else {}
    )
    if from_sp:
        tokens, scores, types, add_space = _sp_pieces(sp_file)  # type: ignore[arg-type]
        for i in range(len(tokens)):
            if by_id.get(i) not in (None, tokens[i]):
                raise ConfigError(
                    f"{sp_file} disagrees with the tokenizer's vocabulary at id {i} "
                    f"({tokens[i]!r} vs {by_id[i]!r}); save the tokenizer and its tokenizer.model together"
                )
    else:
        tokens, scores, types = [], [], []
        if kind == "llama":
            parts = _walk(tj.get("pre_tokenizer")) + _walk(tj.get("normalizer"))
            add_space = any(
                p.get("type") == "Prepend" or p.get("prepend_scheme", "never") not in ("never", None)
                for p in parts
            )
    start = len(tokens)
    for i in range(start, max(max(by_id, default=-1) + 1, start)):
        t = by_id.get(i)
        a = added.get(i)
        if t is None:
            t, typ, score = f"[PAD{i}]", UNUSED, -1000.0
        else:
            if kind == "llama" and i == tok.unk_token_id:
                typ = UNKNOWN
            elif a is not None:
                typ = CONTROL if a.get("special") else USER_DEFINED
            elif kind == "llama" and BYTE_PIECE.match(t):
                typ = BYTE
            else:
                typ = NORMAL
            # SentencePiece merges the adjacent pair whose result scores highest: earlier merge, higher score
            score = unigram.get(i, -float(rank.get(t, 0))) if kind == "llama" and a is None else 0.0
        tokens.append(t)
        scores.append(score)
        types.append(typ)
    for i in range(len(tokens), rows):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(UNUSED)

    special = {}
    for name, tid in (
        ("bos", tok.bos_token_id),
        ("eos", tok.eos_token_id),
        ("unk", tok.unk_token_id),
        ("pad", tok.pad_token_id),
    ):
        if isinstance(tid, int):
            special[name] = tid
    eot = _end_of_turn(tok, chat_template)
    if eot is not None:
        special["eot"] = eot
    add_bos, add_eos = _adds_bos_eos(tok)
    pre = _pre_name(tj) if kind == "gpt2" else None
    if kind == "llama" and any(len(m.split(" ")) != 2 for m in merges):
        merges = []  # a piece with a literal space cannot be written as "left right"; readers use scores
    return Vocab(
        kind, pre, tokens, scores, types, merges, special, add_bos, add_eos, add_space, chat_template
    )


def _adds_bos_eos(tok: Any) -> tuple[bool, bool]:
    probe = tok("a")["input_ids"]
    bare = tok("a", add_special_tokens=False)["input_ids"]
    add_bos = tok.bos_token_id is not None and len(probe) > len(bare) and probe[0] == tok.bos_token_id
    add_eos = tok.eos_token_id is not None and len(probe) > len(bare) and probe[-1] == tok.eos_token_id
    return add_bos, add_eos


def _end_of_turn(tok: Any, chat_template: str | None) -> int | None:
    """The end-of-turn token of a chat template (e.g. <|im_end|>) when it is a single token other than eos."""
    from zhtune.text.templates import KNOWN_END_TOKENS

    vocab = tok.get_vocab()
    for t in KNOWN_END_TOKENS:
        if chat_template and t in chat_template and t in vocab and vocab[t] != tok.eos_token_id:
            return vocab[t]
    return None


def add_to_writer(writer: Any, v: Vocab) -> None:
    """Write the vocabulary keys with gguf's writer."""
    writer.add_tokenizer_model(v.model)
    if v.pre:
        writer.add_tokenizer_pre(v.pre)
    writer.add_token_list(v.tokens)
    writer.add_token_scores(v.scores)
    writer.add_token_types(v.types)
    if v.merges:
        writer.add_token_merges(v.merges)
    setters = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
        "eot": writer.add_eot_token_id,
    }
    for name, tid in v.special.items():
        setters[name](tid)
    writer.add_add_bos_token(v.add_bos)
    writer.add_add_eos_token(v.add_eos)
    if v.add_space_prefix is not None:
        writer.add_add_space_prefix(v.add_space_prefix)
    if v.chat_template:
        writer.add_chat_template(v.chat_template)
