"""--fp8_base: the frozen base of LoRA layers in e4m3 with row-wise scales, multiplied by torch._scaled_mm
(which torch implements on the CPU too, so the arithmetic is tested here; the speed is measured on a GPU by
bench/train_speed.py's fp8 variant)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_fused_lora import base_model

from zhtune.errors import ConfigError
from zhtune.train import fp8
from zhtune.train import fused_lora as fl


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_quantized_matmuls_are_close_and_exact_where_the_values_are_e4m3():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * torch.linspace(0.01, 3, 48)[:, None]  # rows of different scale
    x = torch.randn(10, 64, generator=g) * torch.linspace(0.1, 20, 10)[:, None]
    dy = torch.randn(10, 48, generator=g)
    fw = fp8.FP8Weight.of(w)
    assert fw.data.dtype == torch.float8_e4m3fn and fw.scale.shape == (48,)
    assert rel(fw.dense(torch.float32), w) < 0.04  # e4m3: 3 mantissa bits, one scale per row
    assert rel(fw.matmul(x, torch.float32), x @ w.t()) < 0.05
    assert rel(fw.matmul_t(dy, torch.float32), dy @ w) < 0.05
    # the scales are wired right: the same as multiplying the dequantized operands (float32 rounding only)
    qx, sx = fp8.quantize_rows(x)
    want = (qx.float() * sx) @ fw.dense(torch.float32).t()
    assert torch.allclose(fw.matmul(x, torch.float32), want, rtol=1e-5, atol=1e-4)
    qg, sg = fp8.quantize_rows(dy * fw.scale)
    assert torch.allclose(
        fw.matmul_t(dy, torch.float32), (qg.float() * sg) @ fw.data.float(), rtol=1e-5, atol=1e-4
    )


def test_fp8_linear_replaces_only_frozen_lora_bases_and_fuses():
    model = get_peft_model(
        base_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    )
    n = fp8.convert(model)
    assert n == 4  # 2 layers x (q_proj, down_proj)
    bases = [m.base_layer for m in model.modules() if hasattr(m, "lora_A")]
    assert all(isinstance(b, fp8.FP8Linear) for b in bases)
    assert not any(
        "base_layer.weight" in k for k in model.state_dict()
    )  # never saved as if it were the model
    k_proj = model.base_model.model.model.layers[0].self_attn.k_proj
    assert type(k_proj) is torch.nn.Linear and k_proj.weight.dtype == torch.float32  # no adapter: untouched
    # fused LoRA takes the FP8 base: its own check against peft's arithmetic on the same base passes
    assert fl.fuse(model) == 4
    assert fl.self_check(model, None) is None
    assert fl.self_check(model, torch.bfloat16) is None


def test_fused_and_unfused_fp8_give_the_same_outputs_and_gradients():
    torch.manual_seed(1)
    model = get_peft_model(base_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # a fresh B is zero and would hide the adapter path
    ref = get_peft_model(base_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ref.load_state_dict(model.state_dict())
    fp8.convert(model)
    x = torch.randint(1, 300, (2, 12))

    def run(m):  # noqa: ANN001
        m.zero_grad()
        out = m(input_ids=x).logits
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for n, p in m.named_parameters() if p.requires_grad]

    plain_out, plain_grads = run(model)
    assert fl.fuse(model) > 0
    fused_out, fused_grads = run(model)
    assert torch.allclose(fused_out, plain_out, atol=1e-5, rtol=1e-5)
    for a, b in zip(fused_grads, plain_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    # and the FP8 model is close to the unconverted one (what the quantization costs)
    ref_out, ref_grads = run(ref)
    assert rel(fused_out, ref_out) < 0.05
    assert min(rel(a, b) for a, b in zip(fused_grads, ref_grads)) < 0.1


def test_sft_with_fp8_base_trains_and_saves_a_plain_adapter(tiny_llama_sp, alpaca_file, tmp_path):
    from peft import PeftModel
    from test_sft import base_cfg, losses
    from transformers import AutoModelForCausalLM

    from zhtune.train.sft import main as sft

    a = sft(base_cfg(tiny_llama_sp, alpaca_file, tmp_path / "a", tmp_path / "c", max_steps=3))
    b = sft(base_cfg(tiny_llama_sp, alpaca_file, tmp_path / "b", tmp_path / "c", max_steps=3, fp8_base=True))
    c = sft(
        base_cfg(
            tiny_llama_sp,
            alpaca_file,
            tmp_path / "f",
            tmp_path / "c",
            max_steps=3,
            fp8_base=True,
            fused_lora=True,
        )
    )
    la, lb, lc = losses(a), losses(b), losses(c)
    assert lb != la  # the FP8 arithmetic really ran
    assert lb == pytest.approx(la, rel=0.02)
    assert lc == pytest.approx(lb, rel=1e-4)  # fused or peft's forward: the same FP8 arithmetic
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_llama_sp)), str(tmp_path / "b")
    )
    assert isinstance(plain.base_model.model.model.layers[0].self_attn.q_proj.base_layer, torch.nn.Linear)


def test_fp8_base_refuses_what_it_cannot_do(tiny_llama_sp, alpaca_file, tmp_path):
    from test_sft import base_cfg

    from zhtune.train.sft import main as sft

    with pytest.raises(ConfigError, match="LoRA only"):
        sft(
            base_cfg(
                tiny_llama_sp,
                alpaca_file,
                tmp_path / "o",
                tmp_path / "c",
                max_steps=1,
                fp8_base=True,
                finetuning_type="full",
            )
        )
    if torch.cuda.is_available():
        pytest.skip("the capability message needs a GPU without FP8")
    assert fp8.fp8_support("cpu") is None


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or fp8.fp8_support("cuda") is not None,
    reason="needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+)",
)
def test_fp8_on_the_gpu_matches_the_cpu_arithmetic_and_pads_rows():
    """On the GPU, scaled-mm with row-wise scales (rows not a multiple of 16 included) against the dequantized
    operands, and the bf16 result against float32 arithmetic."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g).cuda()
    fw = fp8.FP8Weight.of(w.to(torch.bfloat16))
    for rows in (64, 37):
        x = torch.randn(rows, 512, generator=g).cuda().to(torch.bfloat16)
        qx, sx = fp8.quantize_rows(x)
        want = (qx.float() * sx) @ fw.dense(torch.float32).t()
        got = fw.matmul(x, torch.bfloat16)
        assert got.shape == (rows, 256) and rel(got, want) < 1e-2  # bf16 output rounding only
        assert rel(got, x.float() @ w.t()) < 0.05
        dy = torch.randn(rows, 256, generator=g).cuda().to(torch.bfloat16)
        assert rel(fw.matmul_t(dy, torch.bfloat16), dy.float() @ w) < 0.05
