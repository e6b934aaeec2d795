"""The embedded default model after a short zhtune SFT run: merged, exported as GGUF, and run elsewhere.

transformers reads the GGUF and its logits match the merged model; llama.cpp (through llama-cpp-python,
which builds llama.cpp from source) loads it and continues a Chinese chat prompt greedily with exactly
the tokens zhtune generates.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_alpaca
from gguf_helpers import llama_cpp

from zhtune.cli import main as zhtune

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sft_default(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sft_default")
    data = write_alpaca(d / "train.json", n=16)
    from zhtune.train.sft import main as sft

    sft(
        {
            "model_name_or_path": "default",
            "train_files": [str(data)],
            "output_dir": str(d / "adapter"),
            "max_steps": 3,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-3,
            "max_seq_length": 128,
            "logging_steps": 1,
            "save_steps": 100,
            "report_to": ["none"],
            "data_cache_dir": str(d / "cache"),
        }
    )
    merged = d / "merged"
    rc = zhtune(
        ["merge", "--base_model", "default", "--lora_model", str(d / "adapter"), "--output_dir", str(merged)]
    )
    assert rc == 0
    gguf = d / "gguf"
    for quant in ("f16", "q8_0"):
        rc = zhtune(
            ["export", "--model_name_or_path", str(merged), "--output_dir", str(gguf), "--quant", quant]
        )
        assert rc == 0
    return {"merged": merged, "f16": gguf / "merged-f16.gguf", "q8_0": gguf / "merged-q8_0.gguf"}


def test_transformers_reads_the_sft_export(sft_default):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = sft_default["merged"]
    hf = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(merged))
    ids = torch.tensor(
        [tok("人民日报发表新年讲话，迈向充满希望的新世纪。机器学习让计算机从数据中学习规律。")["input_ids"]]
    )
    with torch.no_grad():
        ref = hf(ids).logits
    for quant, bound in (("f16", 5e-3),):  # q8_0/q4_0 on this model: bench/results/gguf_quality_cpu.json
        path = sft_default[quant]
        gg = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        ).eval()
        with torch.no_grad():
            got = gg(ids).logits
        rel = ((got - ref).abs().max() / ref.abs().max()).item()
        top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        print(f"{quant}: max logit diff / range {rel:.2e}, top-1 agreement {top1:.3f}")
        assert rel < bound and top1 > 0.9


def test_llama_cpp_greedy_matches_zhtune(sft_default):
    llama_cpp()  # a skip without llama.cpp, a failure under CI
    from zhtune.config.args import ModelArgs
    from zhtune.export.verify import verify

    margs = ModelArgs(model_name_or_path=str(sft_default["merged"]), dtype="float32", device="cpu")
    r = verify(margs, [], sft_default["f16"])
    print(r)
    assert r["prompt_tokens_match"]
    assert len(r["zhtune_ids"]) >= 8 and r["match"], (r["zhtune_text"], r["llama_cpp_text"])
