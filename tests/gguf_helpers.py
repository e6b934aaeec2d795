"""Helpers for GGUF tests: read a GGUF back, extend a SentencePiece vocabulary the Chinese-LLaMA way, and get
llama.cpp (a skip without it, a failure under CI)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch


def llama_cpp():
    """The ``llama_cpp`` module (llama-cpp-python). Without it the calling test skips, except under CI (``CI``
    set, as every CI service and .ci/run set it), where it fails: a GGUF that llama.cpp reads differently from
    transformers must fail CI, so CI cannot skip the tests that compare them."""
    try:
        import llama_cpp
    except ImportError as e:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes", "on"):
            pytest.fail(
                f"CI compares GGUF exports in llama.cpp with transformers, but llama_cpp does not import ({e}); "
                "`make llamacpp` builds and installs it",
                pytrace=False,
            )
        pytest.skip(
            "llama-cpp-python is not installed: `make llamacpp` builds it once (about 20 minutes on 2 cores) "
            "and installs it; bench/llama_cpp_greedy.py runs the greedy check and keeps its output"
        )
    return llama_cpp


def gguf_fields(path: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(str(path))
    out = {}
    for k, f in r.fields.items():
        try:
            out[k] = f.contents()
        except Exception:  # noqa: BLE001 - some fields have no simple value
            continue
    out["_tensors"] = {t.name: (t.tensor_type.name, [int(x) for x in t.shape]) for t in r.tensors}
    return out


def gguf_model(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()


def gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def extend_sp(base_model: Path, extra_model: Path, out: Path) -> Path:
    """Append the pieces of ``extra_model`` missing from ``base_model`` (score 0), as Chinese-LLaMA's merge does.

    Saves an HF tokenizer directory with the merged ``tokenizer.model`` next to its tokenizer.json.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import AutoTokenizer

    base, extra = pb.ModelProto(), pb.ModelProto()
    base.ParseFromString(base_model.read_bytes())
    extra.ParseFromString(extra_model.read_bytes())
    have = {p.piece for p in base.pieces}
    for p in extra.pieces:
        if p.piece not in have and p.type == 1:
            new = pb.ModelProto().SentencePiece()
            new.piece, new.score, new.type = p.piece, 0.0, 1
            base.pieces.append(new)
            have.add(p.piece)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "raw"
    raw.mkdir(exist_ok=True)
    (raw / "tokenizer.model").write_bytes(base.SerializeToString())
    (raw / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
            }
        )
    )
    tok = AutoTokenizer.from_pretrained(str(raw))
    tok.save_pretrained(str(out))
    shutil.copy(raw / "tokenizer.model", out / "tokenizer.model")
    shutil.rmtree(raw)
    return out


def train_sp(text: str, prefix: Path, vocab_size: int) -> Path:
    import sentencepiece as spm

    corpus = prefix.with_suffix(".txt")
    corpus.write_text(text, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
        byte_fallback=True,
    )
    return prefix.with_suffix(".model")
