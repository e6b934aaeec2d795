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
