"""zhtune pt: both stages and full through the CLI and YAML, the data cache, bits per character, and the
stage-2 adapter with resized embeddings loading through plain peft."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import make_tiny_model
from extended_vocab import extend, made_up_chinese

from zhtune.cli import main as zhtune


@pytest.fixture(scope="module")
def work(tmp_path_factory, bpe_tokenizer_dir):
    """A tied tiny model, its tokenizer extended with 150 Chinese tokens, and made-up Chinese text."""
    w = tmp_path_factory.mktemp("pt")
    model = make_tiny_model(bpe_tokenizer_dir, w / "model", tie=True)
    ext = extend(bpe_tokenizer_dir, w)
    (w / "data").mkdir()
    made_up_chinese(w / "data" / "a.txt", n=200, seed=1)
    made_up_chinese(w / "val.txt", n=40, seed=2)
    return {"dir": w, "model": model, "tok": ext}


def common(w, out) -> list[str]:
    return ["--dataset_dir", str(w / "data"), "--validation_file", str(w / "val.txt"), "--block_size", "32",
            "--data_cache_dir", str(w / "cache"), "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--max_eval_samples", "8", "--output_dir", str(out), "--report_to", "none", "--save_steps", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def stage1(work):
    w = work["dir"]
    out = w / "stage1"
    rc = zhtune(["pt", "--model_name_or_path", str(work["model"]), "--tokenizer_name_or_path", str(work["tok"]),
                 "--stage", "embeddings", "--new_rows_only", "--learning_rate", "1e-2"] + common(w, out))  # fmt: skip
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def stage2(work, stage1):
    """Stage 2 from a YAML recipe (with one command-line override)."""
    w = work["dir"]
    out = w / "stage2"
    recipe = w / "stage2.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"model_name_or_path": str(stage1)},
                "data": {
                    "dataset_dir": str(w / "data"),
                    "validation_file": str(w / "val.txt"),
                    "block_size": 32,
                    "data_cache_dir": str(w / "cache"),
                    "max_eval_samples": 8,
                },  # fmt: skip
                "stage": {"stage": "lora"},
                "lora": {
                    "lora_rank": 8,
                    "lora_alpha": 32,
                    "lora_dropout": 0.05,
                    "modules_to_save": "embed_tokens,lm_head",
                },
                "train": {
                    "output_dir": str(out),
                    "max_steps": 2,
                    "per_device_train_batch_size": 4,
                    "report_to": "none",
                    "save_steps": 2,
                    "learning_rate": 1e-2,
                },  # fmt: skip
            }
        )
    )
    assert zhtune(["pt", str(recipe), "--lora_rank", "4"]) == 0
    return out


def load_model_and_tok(model_dir, tok_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(model_dir)), AutoTokenizer.from_pretrained(str(tok_dir))


def test_stage1_trains_new_rows_only(work, stage1):
    from safetensors.torch import load_file

    base_n = 600  # the tiny byte-level tokenizer; the extended one has 150 more
    before = load_file(str(work["model"] / "model.safetensors"))["model.embed_tokens.weight"]
    after = load_file(str(stage1 / "model.safetensors"))["model.embed_tokens.weight"]
    assert after.shape[0] == 768 and after.shape[0] % 64 == 0
    assert torch.equal(after[:base_n], before[:base_n])
    res = json.loads((stage1 / "train_results.json").read_text())
    assert res["resize"] == {"old_rows": 600, "new_rows": 768, "base_vocab": 600, "vocab": 750, "initialised": 150,
                             "init": "mean", "tied": True}  # fmt: skip
    from zhtune.model.embeddings import fit_embeddings  # the rows stage 1 started from

    model, tok = load_model_and_tok(work["model"], work["tok"])
    fit_embeddings(model, tok, model_path=str(work["model"]), tokenizer_name=str(work["tok"]))
    start = model.get_input_embeddings().weight.detach()
    assert not torch.allclose(after[600:750], start[600:750], atol=1e-4)  # the new rows trained
    assert res["eval_before"]["bpc"] > 0 and res["eval_after"]["bpc"] < res["eval_before"]["bpc"]
    assert res["data"]["files"] == 1 and res["data"]["train_blocks"] > 0


def test_stage2_from_yaml_and_cache(work, stage2):
    cfg = yaml.safe_load((stage2 / "zhtune_config.yaml").read_text())
    assert cfg["lora"]["lora_rank"] == 4 and cfg["lora"]["modules_to_save"] == ["embed_tokens", "lm_head"]
    assert cfg["train"]["learning_rate"] == 1e-2 and cfg["stage"]["stage"] == "lora"
    res = json.loads((stage2 / "train_results.json").read_text())
    assert res["data"]["cached_files"] == 1  # the stage-1 run tokenized it; this one did not
    assert res["resize"] is None and math.isfinite(res["eval_after"]["perplexity"])
    adapter = json.loads((stage2 / "adapter_config.json").read_text())
    # the model is tied: peft keeps one trained copy for embed_tokens and lm_head (ensure_weight_tying)
    assert (
        "embed_tokens" in adapter["modules_to_save"] and adapter["ensure_weight_tying"] and adapter["r"] == 4
    )


def test_adapter_loads_with_plain_peft_on_resized_base(work, stage2):
    """The documented recipe: base + new tokenizer, resize_token_embeddings(pad_to_multiple_of=64), plain peft."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zhtune.config.args import ModelArgs
    from zhtune.model.adapters import apply_adapters
    from zhtune.model.loader import load

    tok = AutoTokenizer.from_pretrained(str(stage2))
    with safe_open(str(stage2 / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if "lora_" not in k}
    assert shapes and all(s == (768, 32) for s in shapes.values())  # embeddings saved whole, none empty
    base = AutoModelForCausalLM.from_pretrained(str(work["model"]))
    base.resize_token_embeddings(len(tok), pad_to_multiple_of=64)
    plain = PeftModel.from_pretrained(base, str(stage2)).eval()
    ours, _ = load(
        ModelArgs(model_name_or_path=str(work["model"]), tokenizer_name_or_path=str(stage2), device="cpu")
    )
    ids = torch.tensor([tok.encode((work["dir"] / "val.txt").read_text(encoding="utf-8").splitlines()[0])])
    assert max(ids[0]) >= 600  # the text uses new tokens
    with torch.no_grad():
        untrained = ours(ids).logits  # resized base, new rows by mean, no adapter
    ours = apply_adapters(ours, [str(stage2)]).eval()
    with torch.no_grad():
        a, b = plain(ids).logits, ours(ids).logits
    assert a.shape[-1] == 768 and torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, untrained, atol=1e-3)


def test_full_stage_and_adapter_mismatch_error(work, stage2, capsys):
    w = work["dir"]
    assert (
        zhtune(["pt", "--model_name_or_path", str(work["model"]), "--stage", "full"] + common(w, w / "full"))
        == 0
    )
    assert (w / "full" / "model.safetensors").is_file()
    # continuing the stage-2 adapter (768 embedding rows) on the un-resized base (600): a clear error
    rc = zhtune(
        ["pt", "--model_name_or_path", str(work["model"]), "--peft_path", str(stage2)] + common(w, w / "bad")
    )
    err = capsys.readouterr().err
    assert rc == 2 and str(stage2) in err and "vocabulary of 768 rows" in err and "has 600" in err


def test_bits_per_char_known_case():
    """A model that spreads probability evenly over V tokens costs log2(V) bits per predicted token."""
    import datasets

    from zhtune.train.lm_eval import evaluate_lm

    class Uniform(torch.nn.Module):
        def __init__(self, v):
            super().__init__()
            self.v, self.w = v, torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.v) + self.w})

    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 3, "n_chars": [5, 7, 6]})
    r = evaluate_lm(Uniform(256), ds, batch_size=2)
    assert r["tokens"] == 9 and r["chars"] == 18
    assert r["bpc"] == pytest.approx(9 * 8 / 18) and r["perplexity"] == pytest.approx(256)


def test_chars_per_token_cover_the_text(work, sp_tokenizer_dir):
    from transformers import AutoTokenizer

    from zhtune.train.pt_data import encode_documents, group_blocks

    texts = ["人民日报发表新年讲话，迈向充满希望的新世纪。", "Hello 世界 123！", "ａｂｃ１２３"]
    for d in (work["tok"], sp_tokenizer_dir):
        tok = AutoTokenizer.from_pretrained(str(d))
        ids, chars = encode_documents(texts, tok, add_eos=True)
        assert [sum(c) for c in chars] == [len(t) for t in texts]
        assert all(i[-1] == tok.eos_token_id and c[-1] == 0 for i, c in zip(ids, chars))
        g = group_blocks(ids, chars, 8)
        flat = [c for doc in chars for c in doc]
        assert g["n_chars"] == [sum(flat[k * 8 + 1 : k * 8 + 8]) for k in range(len(g["input_ids"]))]
        assert all(len(b) == 8 for b in g["input_ids"])


def test_pt_data_split_cache_and_errors(work, tmp_path):
    from transformers import AutoTokenizer

    from zhtune.errors import DataError
    from zhtune.train.pt_data import PtDataArgs, build_pt_data

    tok = AutoTokenizer.from_pretrained(str(work["tok"]))
    d = PtDataArgs(dataset_dir=str(work["dir"] / "data"), block_size=16, validation_split_percentage=20,
                   data_cache_dir=str(tmp_path / "c"), preprocessing_num_workers=2)  # fmt: skip
    train, val, rep = build_pt_data(tok, d, seed=0)
    assert rep.cached_files == 0 and rep.eval_blocks == round(0.2 * (rep.train_blocks + rep.eval_blocks))
    # each of the 2 worker shards drops its last partial block
    assert rep.tokens // 16 - 2 <= rep.train_blocks + rep.eval_blocks <= rep.tokens // 16
    train2, _, rep2 = build_pt_data(tok, d, seed=0)
    assert rep2.cached_files == 1 and train2["input_ids"] == train["input_ids"]
    with pytest.raises(DataError, match="no full block of 100000 tokens"):
        build_pt_data(tok, PtDataArgs(dataset_dir=str(work["dir"] / "data"), block_size=100000,
                                      data_cache_dir=str(tmp_path / "c")), seed=0)  # fmt: skip
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text('{"text": "好"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"x.jsonl:2: malformed JSON"):
        build_pt_data(tok, PtDataArgs(dataset_dir=str(bad), data_cache_dir=str(tmp_path / "c")), seed=0)


def test_chat_engine_loads_the_stage2_adapter(work, stage2):
    """zhtune chat/serve's engine resizes the base the way pt did and applies the adapter (merged)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from zhtune.config.args import ModelArgs
    from zhtune.infer.engine import Engine, EngineArgs

    eng = Engine.load(
        ModelArgs(model_name_or_path=str(work["model"]), device="cpu"), EngineArgs(lora_models=[str(stage2)])
    )
    base = AutoModelForCausalLM.from_pretrained(str(work["model"]))
    base.resize_token_embeddings(len(eng.tok), pad_to_multiple_of=64)
    plain = PeftModel.from_pretrained(base, str(stage2)).eval()
    ids = torch.tensor(
        [eng.tok.encode((work["dir"] / "val.txt").read_text(encoding="utf-8").splitlines()[1])]
    )
    with torch.no_grad():
        assert torch.allclose(eng.model(ids).logits, plain(ids).logits, atol=1e-5)


def test_bits_per_char_eval_handles_a_bf16_base_with_fp32_trainable_rows(tiny_llama_sp):
    """LoRA + modules_to_save leaves fp32 embeddings on a bf16 base; evaluation must still run."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from zhtune.train.lm_eval import evaluate_lm

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_sp), dtype=torch.bfloat16)
    model = get_peft_model(
        model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    )
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    rows = {"input_ids": [[1, 5, 6, 7, 8, 9]] * 2, "n_chars": [10, 10]}

    class DS:
        def __len__(self):
            return 2

        def __getitem__(self, sl):
            return {k: v[sl] for k, v in rows.items()}

    out = evaluate_lm(model, DS(), batch_size=2)
    assert out["tokens"] == 10 and out["bpc"] > 0
