"""Append Chinese pieces to a SentencePiece BPE model (LLaMA-1/2, Baichuan), as Chinese-LLaMA does.

Pieces of the Chinese model that the base lacks are appended in the Chinese model's order, so every base
id stays where it was; duplicates are skipped. Merging Chinese-LLaMA's 20,000-piece model into LLaMA's
32,000 gives their 49,953 pieces.

Scores decide which merge a SentencePiece BPE applies first (highest score first). Two choices:

* ``ranked`` (default): the new pieces score above every base piece, like Chinese-LLaMA's, so Chinese words
  win over the base's merges, but each new piece gets its own score, in the Chinese model's order.
  SentencePiece, llama.cpp and the Hugging Face fast tokenizer written here then agree token for token.
* ``zero``: every new piece scores 0, exactly Chinese-LLaMA's ``merge_tokenizers.py`` (the same
  tokenizer.model). SentencePiece breaks the ties by position (leftmost first), which no ranked merge list
  can express, so a fast tokenizer disagrees with it on some Chinese text; zhtune reports how often.

The fast tokenizer's merges are written from the scores (highest first). transformers 5 converts a
tokenizer.model by piece id instead, which reorders LLaMA's whitespace merges and every appended piece.
"""

from __future__ import annotations

import struct
from typing import Any

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE = 2


def load_proto(data: bytes) -> Any:
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(data)
    if not m.pieces:
        raise ValueError("not a SentencePiece model (no pieces)")
    return m


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def new_scores(base: Any, n: int, mode: str) -> list[float]:
    if mode == "zero":
        return [0.0] * n
    normal = [p.score for p in base.pieces if p.type == NORMAL]
    top = max(normal) if normal else 0.0
    # n distinct scores in (top, top + 1), first piece highest; integers if float32 cannot tell them apart
    scores = [_f32(top + 1.0 - (k + 1) / (n + 1)) for k in range(n)]
    if len(set(scores)) < n or (n and scores[-1] <= top):
        scores = [float(top + n - k) for k in range(n)]
    return scores


def merge_protos(base: Any, chinese: Any, mode: str = "ranked") -> tuple[Any, dict[str, int]]:
    """Base proto with the Chinese pieces appended. Returns (merged proto, counts)."""
    if base.trainer_spec.model_type != BPE:
        raise ValueError(
            "the base SentencePiece model is not BPE; zhtune extends SentencePiece BPE bases (LLaMA-1/2, Baichuan)"
        )
    merged = type(base)()
    merged.CopyFrom(base)
    have = {p.piece for p in base.pieces}
    todo, skipped_special = [], 0
    for p in chinese.pieces:
        if p.piece in have:
            continue
        if p.type not in (NORMAL, USER_DEFINED):
            skipped_special += 1
            continue
        have.add(p.piece)
        todo.append(p.piece)
    for piece, score in zip(todo, new_scores(base, len(todo), mode)):
        q = merged.pieces.add()
        q.piece = piece
        q.score = score
    counts = {
        "base_pieces": len(base.pieces),
        "chinese_pieces": len(chinese.pieces),
        "added": len(todo),
        "duplicates": len(chinese.pieces) - len(todo) - skipped_special,
        "skipped_special": skipped_special,
        "total": len(merged.pieces),
    }
    return merged, counts


def vocab_and_merges(proto: Any) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocab and merges equivalent to a SentencePiece BPE model, merges ranked by score."""
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    ranked = []
    for i, p in enumerate(proto.pieces):
        if p.type != NORMAL or len(p.piece) < 2:
            continue
        for k in range(1, len(p.piece)):
            a, b = p.piece[:k], p.piece[k:]
            if a in vocab and b in vocab:
                ranked.append((-p.score, i, k, a, b))
    ranked.sort()
    return vocab, [(a, b) for *_, a, b in ranked]


def special_pieces(proto: Any) -> dict[str, str]:
    ts = proto.trainer_spec
    out = {}
    for role, pid in (
        ("unk_token", ts.unk_id),
        ("bos_token", ts.bos_id),
        ("eos_token", ts.eos_id),
        ("pad_token", ts.pad_id),
    ):
        if 0 <= pid < len(proto.pieces):
            out[role] = proto.pieces[pid].piece
    return out


def tie_disagreement(proto: Any, fast: Any, texts: list[str]) -> float:
    """Share of texts on which SentencePiece and the fast tokenizer give different ids."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    if not texts:
        return 0.0
    bad = sum(sp.encode(t) != fast.encode(t, add_special_tokens=False) for t in texts)
    return bad / len(texts)
