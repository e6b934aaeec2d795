"""The fast training path computes what the plain one does: chunked loss, bf16 adapter inputs, defaults."""

from __future__ import annotations

import pytest
import torch
from conftest import write_alpaca
from transformers import LlamaConfig, LlamaForCausalLM

from zhtune.score.loss import capture_final_hidden, head_weight, linear_cross_entropy
from zhtune.train.args import resolve_optim
from zhtune.train.speed import estimate_step_bytes, keep_adapter_inputs


def tiny(vocab: int = 500) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_cache=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def batch(vocab: int = 500):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 40), generator=g)
    labels = ids.clone()
    labels[:, :9] = -100
    labels[2, 30:] = -100
    return ids, labels


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def plain_and_chunked(model, ids, labels, autocast: bool, num_items=None):
    out = []
    for chunked in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if chunked:
                with capture_final_hidden(model) as box:
                    model(input_ids=ids, logits_to_keep=1)
                loss = linear_cross_entropy(box["hidden"], head_weight(model), labels, num_items, chunk=64)
            else:
                kw = {"num_items_in_batch": num_items} if num_items is not None else {}
                loss = model(input_ids=ids, labels=labels, **kw).loss
        loss.backward()
        out.append((loss.item(), grads(model)))
    return out


@pytest.mark.parametrize("num_items", [None, 200])
def test_chunked_loss_matches_the_plain_loss_and_gradients_fp32(num_items):
    model = tiny()
    ids, labels = batch()
    (l0, g0), (l1, g1) = plain_and_chunked(model, ids, labels, autocast=False, num_items=num_items)
    assert l1 == pytest.approx(l0, rel=1e-6)
    assert g0.keys() == g1.keys() and "lm_head.weight" in g1
    assert max(rel(g1[k], g0[k]) for k in g0) < 1e-5


def test_chunked_loss_under_bf16_autocast_is_within_bf16_rounding():
    model = tiny()
    ids, labels = batch()
    (l0, g0), (l1, g1) = plain_and_chunked(model, ids, labels, autocast=True)
    assert l1 == pytest.approx(l0, rel=1e-3)
    assert max(rel(g1[k], g0[k]) for k in g0) < 2e-2  # bf16 has 8 bits of mantissa: ~4e-3 per rounding


def test_chunked_loss_trains_the_modules_to_save_copy_of_the_head():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    )
    w = head_weight(model)
    assert w.requires_grad and w is model.base_model.model.lm_head.modules_to_save["default"].weight
    ids, labels = batch()
    (l0, g0), (l1, g1) = plain_and_chunked(model, ids, labels, autocast=False)
    assert l1 == pytest.approx(l0, rel=1e-6)
    head = [k for k in g1 if "lm_head.modules_to_save" in k]
    assert head and rel(g1[head[0]], g0[head[0]]) < 1e-5


def test_head_weight_refuses_heads_the_chunked_loss_cannot_reproduce():
    m = tiny()
    m.config.final_logit_softcapping = 30.0
    assert head_weight(m) is None


def test_adapter_inputs_kept_bf16_give_identical_losses_and_gradients():
    """peft's fp32 cast of LoRA inputs is undone by autocast: removing it changes no number."""
    from peft import LoraConfig, get_peft_model

    ids, labels = batch()
    results = []
    for keep in (False, True):
        base = tiny().to(torch.bfloat16)
        model = get_peft_model(
            base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        )
        if keep:
            assert keep_adapter_inputs(model) == 14  # 7 projections x 2 layers
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        results.append((loss.item(), grads(model)))
    (l0, g0), (l1, g1) = results
    assert l0 == l1
    assert all(torch.equal(g0[k], g1[k]) for k in g0)


def test_memory_estimate_matches_the_measured_7b_step():
    """39.4 GiB was measured on an H100 for LoRA on the 7B shape, seq 2048, batch 2, no checkpointing."""
    cfg = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    gib = estimate_step_bytes(model, 4096, checkpointing=False) / 2**30
    assert 34 < gib < 45, gib
    with_gc = estimate_step_bytes(model, 4096, checkpointing=True) / 2**30
    assert 13 < with_gc < 17, with_gc  # measured: 15.6 GiB


def test_optimizer_default_is_fused_adamw_on_a_gpu():
    assert resolve_optim("auto", "cuda:0") == "adamw_torch_fused"
    assert resolve_optim("auto", "cpu") == "adamw_torch"
    assert resolve_optim("adafactor", "cuda:0") == "adafactor"


def test_sft_fast_path_gives_the_plain_paths_losses(tiny_llama_sp, tmp_path):
    """Padding-free rows + chunked loss against padded batches + the usual loss, same data and seed."""
    from zhtune.train.sft import main as sft

    data = write_alpaca(tmp_path / "d.json", 16, seed=2)
    base = {
        "model_name_or_path": str(tiny_llama_sp), "train_files": [str(data)], "data_cache_dir": str(tmp_path / "c"),
        "max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 100,
        "learning_rate": 1e-3, "lora_rank": 4, "lora_dropout": 0.0, "warmup_ratio": 0.0, "report_to": "none",
        "template": "alpaca", "max_seq_length": 256,
    }  # fmt: skip
    fast = sft({**base, "output_dir": str(tmp_path / "fast")})
    plain = sft({**base, "output_dir": str(tmp_path / "plain"), "padding_free": False, "chunked_loss": False})
    lf = [h["loss"] for h in fast["log_history"] if "loss" in h]
    lp = [h["loss"] for h in plain["log_history"] if "loss" in h]
    assert len(lf) == 2 and lf == pytest.approx(lp, abs=1e-5)
    packed = sft(
        {
            **base,
            "output_dir": str(tmp_path / "packed"),
            "packing": True,
            "max_steps": -1,
            "max_seq_length": 1024,
        }
    )
    assert packed["data"]["train_samples"] == 16
    steps = [h["step"] for h in packed["log_history"] if "loss" in h]
    assert steps and steps[-1] < 4  # 16 samples in fewer than 16 rows: packing put several in a row


def _plan_args(**kw):
    from types import SimpleNamespace

    return SimpleNamespace(**{"bf16": False, "fp16": False, "fsdp": None, "deepspeed": None, **kw})


def _lora_tiny():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


def test_fused_lora_is_default_only_on_a_gpu_and_follows_the_flag():
    from types import SimpleNamespace

    from zhtune.errors import ConfigError
    from zhtune.train import fused_lora
    from zhtune.train.speed import plan

    t = SimpleNamespace(use_liger_kernel=False, chunked_loss=False)
    model = _lora_tiny()
    assert plan(model, _plan_args(), t).fused_lora == 0  # default, on a CPU: off
    assert not fused_lora.fused_layers(model)
    p = plan(model, _plan_args(), SimpleNamespace(**vars(t), fused_lora=True))
    assert p.fused_lora == 14 and "fused LoRA (14 layers)" in p.summary()
    assert len(fused_lora.fused_layers(model)) == 14
    with pytest.raises(ConfigError, match="--fused_lora true cannot be combined with --fsdp/--deepspeed"):
        plan(_lora_tiny(), _plan_args(fsdp="full_shard"), SimpleNamespace(**vars(t), fused_lora=True))
    off = _lora_tiny()
    assert plan(off, _plan_args(), SimpleNamespace(**vars(t), fused_lora=False)).fused_lora == 0
    assert not fused_lora.fused_layers(off)


def test_fused_lora_whose_self_check_fails_is_refused(monkeypatch):
    from types import SimpleNamespace

    from zhtune.errors import ConfigError
    from zhtune.train import fused_lora
    from zhtune.train.speed import plan

    monkeypatch.setattr(fused_lora, "check_layer", lambda layer, dtype: "dx differs from peft's by 1.00e+00")
    model = _lora_tiny()
    t = SimpleNamespace(use_liger_kernel=False, chunked_loss=False, fused_lora=True)
    with pytest.raises(ConfigError, match="self-check failed: dense LoRA layer: dx differs"):
        plan(model, _plan_args(), t)
    assert not fused_lora.fused_layers(model)  # left as peft made it


def test_sft_with_fused_lora_gives_the_plain_losses(tiny_llama_sp, tmp_path, caplog):
    """The real training path with --fused_lora true against false: the same loss curve and adapter (float32,
    dropout on)."""
    import logging

    from safetensors.torch import load_file

    from zhtune.train.sft import main as sft

    caplog.set_level(logging.INFO, logger="zhtune.train.trainer")

    data = write_alpaca(tmp_path / "d.json", 16, seed=3)
    base = {
        "model_name_or_path": str(tiny_llama_sp), "train_files": [str(data)], "data_cache_dir": str(tmp_path / "c"),
        "max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 100,
        "learning_rate": 1e-2, "lora_rank": 4, "lora_dropout": 0.1, "warmup_ratio": 0.0, "report_to": "none",
        "template": "alpaca", "max_seq_length": 256, "trainable": ["all-linear"],
    }  # fmt: skip
    fused = sft({**base, "output_dir": str(tmp_path / "fused"), "fused_lora": True})
    plain = sft({**base, "output_dir": str(tmp_path / "plain"), "fused_lora": False})
    lf = [h["loss"] for h in fused["log_history"] if "loss" in h]
    lp = [h["loss"] for h in plain["log_history"] if "loss" in h]
    assert len(lf) == 3 and lf == pytest.approx(lp, rel=1e-5)
    speeds = [r.getMessage() for r in caplog.records if r.getMessage().startswith("speed:")]
    assert len(speeds) == 2 and "fused LoRA (14 layers)" in speeds[0] and "fused LoRA" not in speeds[1]
    wf = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    wp = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert wf.keys() == wp.keys() and len(wf) == 28
    b = [k for k in wf if "lora_B" in k]
    assert all(wf[k].abs().max() > 0 for k in b)  # trained away from peft's zero initialisation
    assert max(rel(wf[k], wp[k]) for k in wf) < 1e-4


def test_compiled_kernels_are_cached_where_a_reboot_keeps_them(monkeypatch, tmp_path):
    from zhtune.train.speed import compile_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache_dir() == str(tmp_path / "zhtune" / "torchinductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    assert compile_cache_dir() == "/somewhere/else"  # the user's choice stays
