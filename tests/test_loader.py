"""Model loading: sources, dtype/device choice, safe defaults, family LoRA targets, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from zhtune.config.args import ModelArgs
from zhtune.errors import ConfigError
from zhtune.model import loader
from zhtune.model.families import lora_targets


def test_resolve_kinds(tiny_llama_sp, tmp_path):
    assert loader.resolve(str(tiny_llama_sp)).kind == "local"
    assert loader.resolve("meta-llama/Llama-2-7b-hf").kind == "hub"
    with pytest.raises(ConfigError, match="not found: no such file or directory"):
        loader.resolve(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="not found"):
        loader.resolve("./relative/missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="is not a model directory: it has no config.json"):
        loader.resolve(str(empty))
    (empty / "a.gguf").write_bytes(b"x")
    (empty / "b.gguf").write_bytes(b"x")
    with pytest.raises(ConfigError, match="several .gguf files .*--gguf_file"):
        loader.resolve(str(empty))


def test_hub_id_without_network_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ConfigError, match="could not load 'zhtune-test/does-not-exist' from the Hugging Face hub"
    ):
        loader.load_tokenizer(ModelArgs(model_name_or_path="zhtune-test/does-not-exist"))


def test_dtype_and_device_choice():
    assert loader.pick_dtype("auto", "cpu") == torch.float32
    assert loader.pick_dtype("bfloat16", "cpu") == torch.bfloat16
    if not torch.cuda.is_available():
        assert loader.pick_device("auto") in ("cpu", "mps")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            loader.pick_device("cuda")


@pytest.mark.parametrize("flag", ["load_in_4bit", "load_in_8bit"])
def test_quantization_needs_cuda(tiny_llama_sp, flag):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ConfigError, match=f"--{flag} needs a CUDA GPU"):
        loader.load_model(ModelArgs(model_name_or_path=str(tiny_llama_sp), **{flag: True}))


def test_load_model_and_tokenizer_agree(tiny_llama_bpe):
    model, tok = loader.load(ModelArgs(model_name_or_path=str(tiny_llama_bpe), device="cpu"))
    assert model.dtype == torch.float32 and tok.pad_token is not None
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)


def test_tokenizer_longer_than_model_is_explained(
    tiny_llama_sp, bpe_tokenizer_dir, sp_tokenizer_dir, tmp_path
):
    from conftest import make_tiny_model

    small = make_tiny_model(sp_tokenizer_dir, tmp_path / "small", vocab_size=100)
    with pytest.raises(ConfigError, match=r"has 700 tokens but the model .* has only 100 embedding rows"):
        loader.load(ModelArgs(model_name_or_path=str(small), device="cpu"))


def test_pickle_weights_are_refused_unless_allowed(tiny_llama_sp, tmp_path):
    import shutil

    from safetensors.torch import load_file

    d = tmp_path / "bin_only"
    shutil.copytree(tiny_llama_sp, d)
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="only pickle .* --allow_pickle"):
        loader.load_model(ModelArgs(model_name_or_path=str(d), device="cpu"))
    model = loader.load_model(ModelArgs(model_name_or_path=str(d), device="cpu", allow_pickle=True))
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], sd["model.embed_tokens.weight"])


def test_remote_code_is_off_unless_asked(tmp_path):
    d = tmp_path / "remote"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps({"model_type": "zz_custom", "auto_map": {"AutoConfig": "configuration_zz.ZZConfig"}})
    )
    (d / "configuration_zz.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ConfigError, match="--trust_remote_code"):
        loader.load_model(ModelArgs(model_name_or_path=str(d), device="cpu"))


class _Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.W_pack = torch.nn.Linear(8, 24)
        self.o_proj = torch.nn.Linear(8, 8)


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (
            torch.nn.Linear(8, 16),
            torch.nn.Linear(8, 16),
            torch.nn.Linear(16, 8),
        )


class _Baichuanish(torch.nn.Module):
    def __init__(self, model_type):
        super().__init__()
        self.config = type("C", (), {"model_type": model_type})()
        self.self_attn, self.mlp, self.lm_head = _Attn(), _MLP(), torch.nn.Linear(8, 50)


def test_family_targets_llama_and_baichuan(tiny_llama_sp):
    from transformers import AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_pretrained(str(tiny_llama_sp))
    assert lora_targets(llama, None) == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    for mt in ("baichuan", "some_remote_type"):  # by model type, or recognised by the fused W_pack
        assert lora_targets(_Baichuanish(mt), None) == [
            "W_pack",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    assert lora_targets(llama, ["all-linear"]) == "all-linear"
    with pytest.raises(
        ConfigError, match="--trainable names W_pack, which this model does not have; its linear layers"
    ):
        lora_targets(llama, ["q_proj", "W_pack"])


def test_peft_wraps_baichuan_w_pack():
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(
        _Baichuanish("baichuan"), LoraConfig(r=2, target_modules=lora_targets(_Baichuanish("baichuan"), None))
    )
    names = [n for n, _ in m.named_parameters() if "lora_A" in n]
    assert any("W_pack" in n for n in names) and not any("lm_head" in n for n in names)


@pytest.mark.parametrize("arch", ["rwkv7", "not-a-model"])
def test_gguf_of_unsupported_architecture_fails_before_loading(tmp_path, arch):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "other.gguf"
    w = GGUFWriter(str(path), arch)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    args = ModelArgs(model_name_or_path=str(path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(
        ConfigError, match=rf"other\.gguf: GGUF architecture '{arch}' is not one transformers"
    ):
        loader.load(args)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("config.json"))


def test_a_file_that_is_not_gguf_is_named(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ConfigError, match=r"broken\.gguf is not a readable GGUF file"):
        loader.load(ModelArgs(model_name_or_path=str(path), cache_dir=str(tmp_path / "cache")))
