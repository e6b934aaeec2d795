"""--load_in_8bit / --load_in_4bit reach the loader from chat; without CUDA the error says so plainly."""

from __future__ import annotations

import pytest
import torch

from zhtune.cli import main as zhtune


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("flag", ["--load_in_8bit", "--load_in_4bit"])
def test_chat_quantized_needs_cuda(tiny_llama_sp, capsys, flag):
    rc = zhtune(
        [
            "chat",
            "--model_name_or_path",
            str(tiny_llama_sp),
            flag,
            "--prompt",
            "你好",
            "--max_new_tokens",
            "2",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{flag} needs a CUDA GPU" in err and "bitsandbytes" in err


def test_chat_passes_quantization_to_the_loader(tiny_llama_sp, monkeypatch):
    """The chat engine builds its model through load_model with the ModelArgs that carry the flags."""
    import zhtune.model.loader as loader
    from zhtune.errors import ConfigError

    seen = {}

    def fake_quant(args, dtype):
        seen["8bit"], seen["4bit"] = args.load_in_8bit, args.load_in_4bit
        raise ConfigError("stop here")

    monkeypatch.setattr(loader, "quantization_config", fake_quant)
    rc = zhtune(["chat", "--model_name_or_path", str(tiny_llama_sp), "--load_in_4bit", "--prompt", "x"])
    assert rc == 2 and seen == {"8bit": False, "4bit": True}


def test_merge_refuses_quantized_loading(tmp_path, tiny_llama_sp, capsys):
    rc = zhtune(
        [
            "merge",
            "--base_model",
            str(tiny_llama_sp),
            "--lora_model",
            str(tmp_path),
            "--output_dir",
            str(tmp_path / "o"),
        ]
        + ["--load_in_8bit"]
    )
    assert rc == 2 and "--output_type gguf --quant" in capsys.readouterr().err


def test_4bit_preparation_freezes_the_base_in_its_own_dtype(tiny_llama_sp):
    """QLoRA's set-up (the model need not be 4-bit to check it): the base frozen, norms, embeddings and lm_head
    left in bf16 (peft's kbit preparation would make them fp32), only the adapters trainable (fp32), and a
    checkpointed step gives gradients to every adapter."""
    from transformers import AutoModelForCausalLM

    from zhtune.config.args import LoraArgs, ModelArgs, TrainArgs
    from zhtune.train.setup import prepare_for_training

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_sp), dtype=torch.bfloat16)
    margs = ModelArgs(model_name_or_path=str(tiny_llama_sp), load_in_4bit=True)
    targs = TrainArgs(output_dir="unused", gradient_checkpointing=True)
    model = prepare_for_training(model, margs, LoraArgs(lora_rank=4, lora_dropout=0.0), targs)
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and dt == torch.float32 for n, dt in trainable.items())
    assert set(frozen.values()) == {torch.bfloat16}
    assert any("norm" in n for n in frozen) and any("lm_head" in n or "embed_tokens" in n for n in frozen)
    model.train()
    ids = torch.randint(3, 100, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)
