"""The base tokenizer a vocabulary is trained against or merged into, and what kind of tokenizer it is."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.errors import ConfigError


@dataclass
class Base:
    tokenizer: Any | None  # a transformers tokenizer, or None for a bare .model file
    sp_proto: Any | None  # the SentencePiece proto when the base has one
    path: str
    origin: str


def load_base(name: str) -> Base:
    """Load a base tokenizer from a directory, a .model file, a .gguf model, 'default' or a model id."""
    from transformers import AutoTokenizer

    from zhtune.vocab.sp import load_proto

    p = Path(name).expanduser()
    if p.is_file() and p.suffix != ".gguf":  # a GGUF model is resolved (converted once) like 'default'
        if p.suffix != ".model":
            raise ConfigError(
                f"{p}: a base tokenizer file must be a SentencePiece .model; else pass its directory"
            )
        try:
            return Base(None, load_proto(p.read_bytes()), str(p), name)
        except Exception as e:  # noqa: BLE001 - protobuf raises its own types
            raise ConfigError(f"{p} is not a SentencePiece model: {e}") from None
    if p.is_dir():
        path = str(p)
    else:
        from zhtune.model.loader import resolve

        path = resolve(name).path
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise ConfigError(f"cannot load a tokenizer from {path}: {e}") from None
    proto = None
    model_file = Path(path) / "tokenizer.model"
    if model_file.is_file():
        try:
            proto = load_proto(model_file.read_bytes())
        except Exception:  # noqa: BLE001 - e.g. a tiktoken file named tokenizer.model
            proto = None
    return Base(tok, proto, path, name)


def base_kind(tok: Any) -> str:
    """'bytelevel' for a byte-level BPE, 'sentencepiece' for a SentencePiece-style BPE (Metaspace), else 'other'."""
    spec = json.loads(tok.backend_tokenizer.to_str()) if hasattr(tok, "backend_tokenizer") else {}
    text = json.dumps({k: spec.get(k) for k in ("pre_tokenizer", "normalizer", "decoder")})
    model = (spec.get("model") or {}).get("type")
    if (
        model == "BPE"
        and '"ByteLevel"' in text
        and '"type": "ByteLevel"' in json.dumps(spec.get("pre_tokenizer"))
    ):
        return "bytelevel"
    if model == "BPE" and ("Metaspace" in text or "\u2581" in text):
        return "sentencepiece"
    return "other"
