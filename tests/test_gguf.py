"""GGUF export read back by a consumer zhtune did not write: transformers' GGUF loader (and gguf's reader).

Logit bounds on tiny random models, measured on a 2-core CPU: f16 differs from the HF model by about
4e-4 of the logit range, q8_0 by about 1e-2, q4_0 by about 0.1 (random weights quantize worse than
trained ones; bench/gguf_quality.py measures the embedded default model).
"""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import pytest
import torch
from conftest import CORPUS, ZH, make_tiny_model
from extended_vocab import extend, made_up_chinese
from gguf_helpers import extend_sp, gguf_fields, gguf_model, gguf_tokenizer, llama_cpp, train_sp

from zhtune.cli import main as zhtune
from zhtune.errors import ConfigError

BOUNDS = {"f16": 2e-3, "q8_0": 3e-2, "q4_0": 0.25}  # max |logit difference| / max |logit|
TEXTS = [ZH[0], ZH[4] + " The quick brown fox.", CORPUS[-3], "中文分词 123 def add(a, b):"]


def export(model: Path, out: Path, quant: str, *extra: str) -> Path:
    rc = zhtune(
        ["export", "--model_name_or_path", str(model), "--output_dir", str(out), "--quant", quant, *extra]
    )
    assert rc == 0
    return out / f"{model.name}-{quant}.gguf"


def rel_diff(model_dir: Path, gguf_path: Path, texts=TEXTS) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    gg = gguf_model(gguf_path)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    worst = 0.0
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"]])
        with torch.no_grad():
            a, b = hf(ids).logits, gg(ids).logits
        worst = max(worst, ((a - b).abs().max() / a.abs().max()).item())
    return worst


@pytest.mark.parametrize("kind", ["sp", "bpe"])
def test_quants_load_in_transformers_within_bounds(tmp_path, kind, tiny_llama_sp, tiny_llama_bpe):
    model = tiny_llama_sp if kind == "sp" else tiny_llama_bpe
    diffs = {}
    for quant in ("f16", "q8_0", "q4_0"):
        path = export(model, tmp_path, quant)
        f = gguf_fields(path)
        assert f["general.architecture"] == "llama"
        assert f["tokenizer.ggml.model"] == ("llama" if kind == "sp" else "gpt2")
        types = {t for t, _ in f["_tensors"].values()}
        want = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[quant]
        assert want in types and "F32" in types  # norms stay float32
        diffs[quant] = rel_diff(model, path)
    print(kind, diffs)
    for q, d in diffs.items():
        assert d < BOUNDS[q], (q, d)
    assert diffs["f16"] < diffs["q8_0"] < diffs["q4_0"]


def test_q_k_permutation_is_what_readers_undo(tmp_path, tiny_llama_sp, monkeypatch):
    """transformers un-permutes Q/K on load: our permutation must be exactly what it undoes."""
    from transformers import AutoModelForCausalLM

    import zhtune.export.gguf as g

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama_sp), dtype=torch.float32)
    for permute, out in ((True, tmp_path / "p"), (False, tmp_path / "n")):
        if not permute:
            monkeypatch.setattr(g, "permute_rotary", lambda w, n: w)
        gg = gguf_model(export(tiny_llama_sp, out, "f16"))
        for proj in ("q_proj", "k_proj"):
            a = getattr(hf.model.layers[1].self_attn, proj).weight
            b = getattr(gg.model.layers[1].self_attn, proj).weight
            assert torch.allclose(a, b, atol=1e-3) == permute, (proj, permute)


@pytest.mark.parametrize("kind", ["sp", "bpe"])
def test_tokenizer_round_trips_through_transformers(tmp_path, kind, tiny_llama_sp, tiny_llama_bpe):
    from transformers import AutoTokenizer

    model = tiny_llama_sp if kind == "sp" else tiny_llama_bpe
    path = export(model, tmp_path, "f16")
    ours, theirs = AutoTokenizer.from_pretrained(str(model)), gguf_tokenizer(path)
    for t in CORPUS[::7] + TEXTS:
        assert ours(t)["input_ids"] == theirs(t)["input_ids"], t
    f = gguf_fields(path)
    assert f["tokenizer.ggml.eos_token_id"] == ours.eos_token_id
    assert f["tokenizer.ggml.bos_token_id"] == ours.bos_token_id
    assert f["tokenizer.ggml.add_bos_token"] == (ours("a")["input_ids"][0] == ours.bos_token_id)


def test_chat_template_and_special_tokens(tmp_path, tiny_llama_bpe):
    path = export(tiny_llama_bpe, tmp_path, "q8_0")
    f = gguf_fields(path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_bpe))
    assert f["tokenizer.chat_template"] == tok.chat_template
    assert f["tokenizer.ggml.pre"] == "gpt-2"  # llama.cpp's name for the GPT-2 split
    types = f["tokenizer.ggml.token_type"]
    for s in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert types[tok.convert_tokens_to_ids(s)] == 3  # control
    # the template's end of turn differs from eos here? it is eos (<|im_end|>), so no separate eot
    assert f["tokenizer.ggml.eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    # a built-in template by name replaces the tokenizer's
    path2 = export(tiny_llama_bpe, tmp_path / "alpaca", "f16", "--template", "alpaca")
    assert "### Response" in gguf_fields(path2)["tokenizer.chat_template"]


def test_extended_chinese_sentencepiece_vocabulary(tmp_path, sp_tokenizer_dir):
    """Chinese pieces appended to a LLaMA-style SentencePiece model (as Chinese-LLaMA does) survive the export."""
    from transformers import AutoTokenizer

    zh_sp = train_sp("\n".join(ZH * 30), tmp_path / "zh", vocab_size=600)
    tok_dir = extend_sp(sp_tokenizer_dir / "tokenizer.model", zh_sp, tmp_path / "merged_tok")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert len(tok) > 750
    model = make_tiny_model(tok_dir, tmp_path / "zh_llama")
    (model / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes())  # read when present
    path = export(model, tmp_path, "f16")
    f = gguf_fields(path)
    assert f["tokenizer.ggml.tokens"][: len(tok)] == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    assert f["tokenizer.ggml.scores"][len(tok) - 1] == 0.0  # appended pieces keep their merge-time score
    theirs = gguf_tokenizer(path)
    for t in ZH:
        ids = tok(t)["input_ids"]
        assert any(i >= 700 for i in ids)  # the appended pieces are used
        assert theirs(t)["input_ids"] == ids, t
    assert rel_diff(model, path, ZH[:3]) < BOUNDS["f16"]


def test_extended_bpe_vocabulary_added_words(tmp_path, bpe_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bpe_tokenizer_dir))
    words = ["人民日报", "机器学习", "自然语言处理"]
    tok.add_tokens(words)
    tok.save_pretrained(str(tmp_path / "tok"))
    model = make_tiny_model(tmp_path / "tok", tmp_path / "bpe_zh", tie=True)
    path = export(model, tmp_path, "q4_0")
    f = gguf_fields(path)
    for w in words:
        assert f["tokenizer.ggml.token_type"][tok.convert_tokens_to_ids(w)] == 4  # user-defined
    assert f["_tensors"]["token_embd.weight"][0] == "Q8_0"  # tied: it is also the output layer
    assert "output.weight" not in f["_tensors"]


def test_vocab_padded_to_embedding_rows(tmp_path, sp_tokenizer_dir):
    model = make_tiny_model(sp_tokenizer_dir, tmp_path / "padded", vocab_size=768)
    path = export(model, tmp_path, "f16")
    f = gguf_fields(path)
    assert len(f["tokenizer.ggml.tokens"]) == 768 == f["llama.vocab_size"]
    assert f["tokenizer.ggml.tokens"][767] == "[PAD767]" and f["tokenizer.ggml.token_type"][767] == 5


def test_writer_streams_one_tensor_at_a_time(tmp_path, sp_tokenizer_dir):
    """Traced (numpy) memory while writing stays near the largest tensor, far below the model."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from zhtune.export.gguf import write_gguf
    from zhtune.export.gguf_vocab import build_vocab
    from zhtune.model.tensors import Checkpoint, plain

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=700, hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=4
    )
    d = tmp_path / "m"
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok = AutoTokenizer.from_pretrained(str(sp_tokenizer_dir))
    ck = Checkpoint(d)
    vocab = build_vocab(tok, sp_tokenizer_dir, 700, None)
    largest = max(4 * torch.Size(s).numel() for s in ck.shapes.values())
    total = sum(4 * torch.Size(s).numel() for s in ck.shapes.values())
    for quant in ("f16", "q4_0"):
        tracemalloc.start()
        write_gguf(plain(ck), ck.config, vocab, tmp_path / f"m-{quant}.gguf", quant=quant, progress=False)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(
            f"{quant}: model {total / 1e6:.1f} MB, largest tensor {largest / 1e6:.2f} MB, traced peak {peak / 1e6:.2f} MB"
        )
        assert peak < 4 * largest < total / 3


def test_export_refuses_overwrite_and_other_architectures(tmp_path, tiny_llama_sp):
    export(tiny_llama_sp, tmp_path, "f16")
    with pytest.raises(ConfigError, match="already exists"):
        from zhtune.export.export import main

        main({"model_name_or_path": str(tiny_llama_sp), "output_dir": str(tmp_path), "quant": "f16"})
    assert export(tiny_llama_sp, tmp_path, "f16", "--overwrite_output_dir").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".gguf")) == [
        f"{tiny_llama_sp.name}-f16.gguf"
    ]

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=700)).save_pretrained(gpt)
    for f in tiny_llama_sp.glob("tokenizer*"):
        (gpt / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        main({"model_name_or_path": str(gpt), "output_dir": str(tmp_path / "g")})


def test_merge_straight_to_gguf(tmp_path, tiny_llama_sp):
    from lora_helpers import make_adapter, reference_model

    ad = make_adapter(tiny_llama_sp, tmp_path / "a", seed=1, targets=["q_proj", "k_proj", "v_proj"])
    out = tmp_path / "merged"
    rc = zhtune(
        ["merge", "--base_model", str(tiny_llama_sp), "--lora_model", str(ad), "--output_dir", str(out)]
        + ["--output_type", "gguf", "--quant", "q8_0"]
    )
    assert rc == 0
    path = out / "merged-q8_0.gguf"
    assert path.is_file() and (out / "merged-q8_0.zhtune.yaml").is_file()
    from transformers import AutoTokenizer

    ids = torch.tensor([AutoTokenizer.from_pretrained(str(tiny_llama_sp))(ZH[2])["input_ids"]])
    with torch.no_grad():
        ref = reference_model(tiny_llama_sp, [ad])(ids).logits
        got = gguf_model(path)(ids).logits
    assert ((ref - got).abs().max() / ref.abs().max()) < BOUNDS["q8_0"]
    meta = json.dumps(gguf_fields(path)["general.name"])
    assert "merged" in meta


def sharpen_attention(model_dir: Path, factor: float = 8.0) -> Path:
    """Scale Q and K so attention is far from uniform. At the init's scale a tiny model attends almost evenly,
    so a Q/K layout that a reader undoes wrongly hardly shows: with the rotary permutation left out, llama.cpp's
    f16 logits moved by 1.8e-3 of their range, under the 2e-3 bound; sharpened, by 0.13 (f16 itself: 4e-4)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)
    model.save_pretrained(str(model_dir))
    return model_dir


def llama_cpp_model(kind: str, tmp_path: Path, sp_dir: Path, bpe_dir: Path) -> tuple[Path, list[str]]:
    """A tiny model of one vocabulary kind, and extra texts that use its Chinese tokens.

    sp, bpe: the tiny tokenizers; bpe_zh: whole Chinese words added to the byte-level BPE (user-defined tokens);
    sp_merged, bpe_merged: a Chinese vocabulary trained and merged in by zhtune vocab train/merge (new pieces
    with scores into SentencePiece, new vocab entries and merges into byte-level BPE).
    """
    from transformers import AutoTokenizer

    if kind in ("sp", "bpe"):
        tok_dir, extra = sp_dir if kind == "sp" else bpe_dir, []
    elif kind == "bpe_zh":
        tok = AutoTokenizer.from_pretrained(str(bpe_dir))
        tok.add_tokens(["人民日报", "机器学习", "自然语言处理"])
        tok_dir, extra = tmp_path / "tok", ["人民日报说机器学习和自然语言处理。"]
        tok.save_pretrained(str(tok_dir))
    else:
        (tmp_path / "ext").mkdir()
        tok_dir = extend(sp_dir if kind == "sp_merged" else bpe_dir, tmp_path / "ext")
        extra = (
            made_up_chinese(tmp_path / "zh_texts.txt", n=3, seed=7).read_text(encoding="utf-8").splitlines()
        )
    model = sharpen_attention(make_tiny_model(tok_dir, tmp_path / kind, tie=kind.startswith("bpe")))
    if kind == "sp_merged" and not (model / "tokenizer.model").is_file():
        shutil.copy(
            tok_dir / "tokenizer.model", model / "tokenizer.model"
        )  # the merged pieces, as merge wrote them
    return model, extra


@pytest.mark.parametrize("kind", ["sp", "bpe", "bpe_zh", "sp_merged", "bpe_merged"])
def test_llama_cpp_reads_the_exports(tmp_path, kind, sp_tokenizer_dir, bpe_tokenizer_dir):
    """A real llama.cpp tokenizes like the HF tokenizer and computes the same logits (within the same bounds)."""
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    Llama = llama_cpp().Llama
    model, extra = llama_cpp_model(kind, tmp_path, sp_tokenizer_dir, bpe_tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(str(model))
    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    texts = CORPUS[::7] + TEXTS + extra
    ids = tok(ZH[0] + ZH[5] + "".join(extra[:1]))["input_ids"]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    for quant in ("f16", "q8_0", "q4_0"):
        path = export(model, tmp_path, quant)
        llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, logits_all=True)
        for t in texts:
            want = tok(t)["input_ids"]
            assert (
                llm.tokenize(t.encode("utf-8"), add_bos=want[:1] == [tok.bos_token_id], special=True) == want
            ), t
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)])
        rel = float(np.abs(got - ref).max() / np.abs(ref).max())
        assert rel < BOUNDS[quant], (quant, rel)
        llm.close()


def test_export_verify_with_an_adapter(tmp_path, tiny_llama_bpe, capsys):
    """zhtune export --verify (base + adapter): llama.cpp tokenizes the chat prompt and answers greedily as zhtune.

    Along this model's greedy reply the top two logits are at least 6.6e-3 of the logit range apart and f16 moves
    logits by at most 1e-3 of it, so the replies agree by a margin (a sharpened model has near-ties here)."""
    from lora_helpers import make_adapter

    llama_cpp()
    ad = make_adapter(tiny_llama_bpe, tmp_path / "a", seed=1, targets=["q_proj", "k_proj", "v_proj"])
    export(tiny_llama_bpe, tmp_path / "gguf", "f16", "--lora_model", str(ad), "--verify")  # exit code 0: same
    out = capsys.readouterr().out
    assert (tmp_path / "gguf" / "a-f16.gguf").is_file()  # named after the last adapter
    assert "llama.cpp   same greedy reply (24 tokens agree)" in out, out
