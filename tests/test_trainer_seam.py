"""The checkpoint seam works on any Trainer subclass, not only ZhTrainer: a Trainer with its own loss (as TRL's
DPOTrainer has) gets atomic pickle-free checkpoints, an exact resume and the NaN guard from CheckpointMixin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer

from zhtune.errors import TrainingStopped
from zhtune.train.args import build_training_arguments
from zhtune.train.resume import resolve_resume
from zhtune.train.sft import SftConfig
from zhtune.train.trainer import CONFIG_NAME, CheckpointMixin, ZhTrainer


class OwnLossTrainer(Trainer):
    """Stands in for TRL's DPOTrainer: a Trainer subclass with a loss of its own (here, the mean of the
    model's loss and a NaN from step ``nan_at`` on)."""

    nan_at: int | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        self.calls = getattr(self, "calls", 0) + 1
        out = model(input_ids=inputs["input_ids"], labels=inputs["labels"])
        loss = out.loss
        if self.nan_at is not None and self.state.global_step + 1 >= self.nan_at:
            loss = loss * float("nan")
        return (loss, out) if return_outputs else loss


class ZhOwnLossTrainer(CheckpointMixin, OwnLossTrainer):
    pass


def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg)


def rows() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (16, 12), generator=g)
    return [{"input_ids": r, "labels": r} for r in ids]


def run(out: Path, *, resume: str | None = None, nan_at: int | None = None, **kw) -> ZhOwnLossTrainer:
    cfg = SftConfig.of(
        {
            "output_dir": str(out),
            "max_steps": 4,
            "save_steps": 2,
            "logging_steps": 1,
            "learning_rate": 1e-2,
            "per_device_train_batch_size": 4,
            "report_to": "none",
            "save_total_limit": None,
            "seed": 3,
            "resume_from_checkpoint": resume,
            **kw,
        }  # fmt: skip
    )
    trainer = ZhOwnLossTrainer(
        model=tiny(),
        args=build_training_arguments(cfg.train, has_eval=False, device="cpu"),
        train_dataset=rows(),
        zh_config=cfg,
    )
    trainer.nan_at = nan_at
    trainer.train(resume_from_checkpoint=resolve_resume(cfg.train))
    return trainer


def curve(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_any_trainer_subclass_gets_the_checkpoint_seam(tmp_path):
    assert ZhTrainer.__mro__[1] is CheckpointMixin
    t = run(tmp_path / "a")
    assert t.calls >= 4  # its own loss trained
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["checkpoint-2", "checkpoint-4"], names  # renamed into place, no .tmp- left
    ck = tmp_path / "a" / "checkpoint-2"
    assert all((ck / f"{name}.json").is_file() for name in ("optimizer", "scheduler", "rng_state"))
    assert (ck / "optimizer.safetensors").is_file()  # the tensors; the JSON holds the rest
    assert not [p.name for p in ck.iterdir() if p.suffix in (".pt", ".pth", ".bin")]  # no pickle
    assert (ck / CONFIG_NAME).is_file() and json.loads((ck / "trainer_state.json").read_text())[
        "global_step"
    ] == 2

    # keep only checkpoint-2 and resume: steps 3-4 repeat the uninterrupted run exactly
    import shutil

    shutil.rmtree(tmp_path / "a" / "checkpoint-4")
    resumed = run(tmp_path / "a", resume="true")
    assert curve(resumed) == pytest.approx(curve(t), abs=1e-6)
    assert curve(t)[-1] < curve(t)[0]


def test_the_nan_guard_comes_with_the_seam(tmp_path):
    with pytest.raises(TrainingStopped, match="the training loss became nan at step 3"):
        run(tmp_path / "n", nan_at=3, save_steps=1)
    # no checkpoint after the last good step was written
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == ["checkpoint-1", "checkpoint-2"]
