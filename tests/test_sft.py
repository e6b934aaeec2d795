"""zhtune sft end to end on tiny random models: outputs, caching, peft interop, resume (the pinned loss curves
are in test_loss_curves.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_alpaca

from zhtune.cli import main as cli_main
from zhtune.errors import DataError
from zhtune.train.sft import main as sft


def base_cfg(model_dir: Path, data: Path, out: Path, cache: Path, **kw):
    cfg = {
        "model_name_or_path": str(model_dir),
        "train_files": [str(data)],
        "output_dir": str(out),
        "data_cache_dir": str(cache),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "save_steps": 100,
        "learning_rate": 1e-3,
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "warmup_ratio": 0.0,
        "max_seq_length": 128,
        "report_to": "none",
        "seed": 123,
    }
    cfg.update(kw)
    return cfg


def losses(summary) -> list[float]:
    return [h["loss"] for h in summary["log_history"] if "loss" in h]


@pytest.mark.parametrize("kind", ["sp", "bpe"])
def test_sft_cli_writes_every_output(kind, tiny_llama_sp, tiny_llama_bpe, alpaca_file, tmp_path):
    model = tiny_llama_sp if kind == "sp" else tiny_llama_bpe
    out = tmp_path / "out"
    rc = cli_main(
        [
            "sft",
            "--model_name_or_path", str(model),
            "--train_files", str(alpaca_file),
            "--output_dir", str(out),
            "--data_cache_dir", str(tmp_path / "cache"),
            "--max_steps", "2",
            "--per_device_train_batch_size", "4",
            "--logging_steps", "1",
            "--save_steps", "1",
            "--save_total_limit", "1",
            "--validation_split_percentage", "20",
            "--eval_steps", "1",
            "--template", "chatml",
        ]
    )  # fmt: skip
    assert rc == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "loss_curve.png",
                 "zhtune_config.yaml", "zhtune_template.json", "train_results.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert not (out / "training_args.bin").exists()
    assert [p.name for p in out.glob("checkpoint-*")] == [
        "checkpoint-2"
    ]  # save_total_limit 1 keeps the newest
    assert not list(out.glob(".tmp-*"))
    assert list((out / "runs").rglob("events.out.tfevents.*")), "no TensorBoard log"
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_start|>assistant" in tc["chat_template"]
    import yaml

    saved = yaml.safe_load((out / "zhtune_config.yaml").read_text())
    assert saved["data"]["template"] == "chatml" and saved["versions"]["torch"]
    assert saved["data_report"]["train_samples"] == 19 and saved["data_report"]["eval_samples"] == 5
    res = json.loads((out / "train_results.json").read_text())
    assert "eval_loss" in res["metrics"]


def test_second_run_reuses_tokenized_cache(tiny_llama_bpe, alpaca_file, tmp_path):
    c = base_cfg(tiny_llama_bpe, alpaca_file, tmp_path / "o1", tmp_path / "cache", max_steps=1)
    first = sft(c)
    assert first["data"]["cached"] is False
    second = sft({**c, "output_dir": str(tmp_path / "o2")})
    assert second["data"]["cached"] is True
    assert losses(first) == losses(second)
    # a changed input is never served a stale cache
    write_alpaca(alpaca_file, 30, seed=9)
    third = sft({**c, "output_dir": str(tmp_path / "o3")})
    assert third["data"]["cached"] is False and third["data"]["records"] == 30


def test_adapter_loads_with_plain_peft_and_matches_zhtune(tiny_llama_bpe, alpaca_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from zhtune.config.args import ModelArgs
    from zhtune.infer.engine import Engine, EngineArgs

    out = tmp_path / "o"
    sft(base_cfg(tiny_llama_bpe, alpaca_file, out, tmp_path / "c", max_steps=3, learning_rate=5e-3))
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_llama_bpe)), str(out)
    ).eval()
    ours = Engine.load(
        ModelArgs(model_name_or_path=str(tiny_llama_bpe), device="cpu"), EngineArgs(lora_models=[str(out)])
    )
    x = torch.tensor([ours.prompt_ids([{"role": "user", "content": "北京是中国的首都吗？"}])])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_bpe)).eval()
    with torch.no_grad():
        a, b, c = plain(x).logits, ours.model(x).logits, base(x).logits
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, c, atol=1e-4), "the adapter changed nothing"


def test_continue_adapter_with_peft_path(tiny_llama_sp, alpaca_file, tmp_path):
    from safetensors.torch import load_file

    first = tmp_path / "a1"
    sft(base_cfg(tiny_llama_sp, alpaca_file, first, tmp_path / "c", max_steps=2))
    second = tmp_path / "a2"
    s = sft(base_cfg(tiny_llama_sp, alpaca_file, second, tmp_path / "c", max_steps=2, peft_path=str(first)))
    w1, w2 = load_file(first / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
    assert w1.keys() == w2.keys()
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)
    # continuing starts from the first adapter: its first loss is below a fresh adapter's
    fresh = sft(base_cfg(tiny_llama_sp, alpaca_file, tmp_path / "f", tmp_path / "c", max_steps=1))
    assert losses(s)[0] < losses(fresh)[0]


def test_resume_from_checkpoint_continues_the_same_run(tiny_llama_sp, alpaca_file, tmp_path):
    full = sft(
        base_cfg(tiny_llama_sp, alpaca_file, tmp_path / "full", tmp_path / "c", max_steps=4, save_steps=2)
    )
    part = base_cfg(tiny_llama_sp, alpaca_file, tmp_path / "part", tmp_path / "c", max_steps=4, save_steps=2)
    # simulate a run that stopped after step 2: keep only checkpoint-2
    sft({**part})
    import shutil

    for p in (tmp_path / "part").iterdir():
        if p.name != "checkpoint-2":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    resumed = sft({**part, "resume_from_checkpoint": "true"})
    # the resumed run's history holds steps 1-2 from the checkpoint and steps 3-4 trained again
    assert losses(resumed) == pytest.approx(losses(full), abs=1e-6)
    # the count of training tokens goes on from the checkpoint's
    assert resumed["train_tokens"] == full["train_tokens"] > 0


@pytest.mark.parametrize("padding_free", [True, False])
def test_training_tokens_are_counted_as_trainer_counts_them(
    padding_free, tiny_llama_bpe, alpaca_file, tmp_path
):
    """zhtune counts non-padding tokens on the device (no wait per step); Trainer's own counter, which waits
    every step, gives the same number, in every training log and at the end (padded or padding-free rows)."""
    c = base_cfg(
        tiny_llama_bpe, alpaca_file, tmp_path / "a", tmp_path / "c", max_steps=4, padding_free=padding_free
    )
    ours = sft(c)
    theirs = sft({**c, "output_dir": str(tmp_path / "b"), "include_num_input_tokens_seen": "non_padding"})

    def seen(summary):
        return [h["num_input_tokens_seen"] for h in summary["log_history"] if "loss" in h]

    assert seen(ours) == seen(theirs) and len(seen(ours)) == 4
    assert ours["train_tokens"] == theirs["train_tokens"] == seen(ours)[-1]
    assert 0 < ours["train_tokens"] < 4 * 4 * 128  # padding not counted (the samples are short)


def test_full_finetuning_changes_all_weights(tiny_llama_sp, alpaca_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    sft(
        base_cfg(
            tiny_llama_sp,
            alpaca_file,
            out,
            tmp_path / "c",
            max_steps=2,
            finetuning_type="full",
            learning_rate=1e-3,
        )
    )
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    a = AutoModelForCausalLM.from_pretrained(str(tiny_llama_sp)).state_dict()
    b = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    assert all(not torch.equal(a[k], b[k]) for k in a if k.endswith("q_proj.weight"))


def test_gradient_checkpointing_gives_the_same_losses(tiny_llama_sp, alpaca_file, tmp_path):
    a = sft(base_cfg(tiny_llama_sp, alpaca_file, tmp_path / "a", tmp_path / "c", max_steps=2))
    b = sft(
        base_cfg(
            tiny_llama_sp,
            alpaca_file,
            tmp_path / "b",
            tmp_path / "c",
            max_steps=2,
            gradient_checkpointing=True,
        )
    )
    assert losses(a) == pytest.approx(losses(b), abs=1e-5)
    # the saved activations in host memory (on a CPU they are there already): checkpointing on, same losses
    c = sft(
        base_cfg(
            tiny_llama_sp,
            alpaca_file,
            tmp_path / "o",
            tmp_path / "c",
            max_steps=2,
            gradient_checkpointing_offload=True,
        )
    )
    import yaml

    saved = yaml.safe_load((tmp_path / "o" / "zhtune_config.yaml").read_text())
    assert saved["train"]["gradient_checkpointing"] is True
    assert losses(a) == pytest.approx(losses(c), abs=1e-5)


def test_dataset_with_no_usable_sample_is_an_error(tiny_llama_sp, tmp_path):
    p = tmp_path / "long.json"
    p.write_text(json.dumps([{"instruction": "很长的问题" * 100, "output": "答"}], ensure_ascii=False))
    with pytest.raises(DataError, match="no usable training sample: 1 records read, 0 bad, 1 too long"):
        sft(base_cfg(tiny_llama_sp, p, tmp_path / "o", tmp_path / "c", max_seq_length=32))


def test_bad_record_stops_with_file_line_or_is_counted(tiny_llama_sp, tmp_path):
    p = tmp_path / "bad.jsonl"
    good = json.dumps({"instruction": "你好", "output": "你好！"}, ensure_ascii=False)
    p.write_text("\n".join([good] * 8 + ['{"instruction": "x"}'] + [good] * 8) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{p}:9: missing field 'output'"):
        sft(base_cfg(tiny_llama_sp, p, tmp_path / "o", tmp_path / "c"))
    s = sft(base_cfg(tiny_llama_sp, p, tmp_path / "o2", tmp_path / "c", skip_bad_records=True, max_steps=1))
    assert s["data"]["bad_records"] == 1 and s["data"]["train_samples"] == 16


def test_existing_output_is_not_overwritten(tiny_llama_sp, alpaca_file, tmp_path, capsys):
    c = base_cfg(tiny_llama_sp, alpaca_file, tmp_path / "o", tmp_path / "c", max_steps=1)
    sft(c)
    args = ["sft", "--model_name_or_path", str(tiny_llama_sp), "--train_files", str(alpaca_file),
            "--output_dir", str(tmp_path / "o"), "--max_steps", "1"]  # fmt: skip
    assert cli_main(args) == 2
    assert "already holds a finished run" in capsys.readouterr().err
