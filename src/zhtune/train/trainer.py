"""Hugging Face Trainer with crash-safe checkpoints, a loss-curve PNG and a clear resume story.

* A checkpoint is written to ``.tmp-checkpoint-N`` and renamed to ``checkpoint-N`` once complete, so a kill
  never leaves a half-written ``checkpoint-N`` for a resume to trip over; leftovers are cleaned up.
* ``--resume_from_checkpoint true`` picks the newest complete checkpoint; a named one is checked first.
* Rotation (``--save_total_limit``) runs only after the new checkpoint is in place and sorts by step, so the
  checkpoint a resume needs is never the one deleted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from zhtune.atomic import TMP_PREFIX, clean_stale_tmp, fsync_tree
from zhtune.config.args import TrainArgs
from zhtune.config.parse import Config, ConfigError, save_config

log = logging.getLogger(__name__)
TRAINER_STATE = "trainer_state.json"
CONFIG_NAME = "zhtune_config.yaml"


def training_arguments_fields() -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(TrainingArguments)}


def _passthrough(sections: dict[str, type]) -> dict[str, set[str]]:
    own = {f for cls in sections.values() for f in cls.__dataclass_fields__}
    return {"train": training_arguments_fields() - own}


def training_config(cfg: Config | dict[str, Any], sections: dict[str, type]) -> Config:
    """A training command's config from a Config or a dict; other TrainingArguments fields pass through."""
    if isinstance(cfg, Config):
        return cfg
    from zhtune.config.parse import build

    return build(sections, cfg, passthrough=_passthrough(sections))


def parse_training_cli(
    argv: list[str] | None, sections: dict[str, type], prog: str, description: str
) -> Config:
    from zhtune.config.parse import parse_cli

    return parse_cli(argv, sections, prog=prog, description=description, passthrough=_passthrough(sections))


def build_training_arguments(t: TrainArgs, *, has_eval: bool, device: str) -> TrainingArguments:
    bf16 = t.bf16
    if bf16 is None:
        bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported() and not t.fp16
    if (bf16 or t.fp16) and device == "cpu" and t.fp16:
        raise ConfigError("--fp16 needs a GPU; on CPU train in float32 (the default) or --bf16")
    check_deepspeed(t.deepspeed)
    eval_steps = t.eval_steps or t.save_steps
    kw: dict[str, Any] = dict(
        output_dir=t.output_dir,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size or t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps if t.warmup_steps > 0 else t.warmup_ratio,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        bf16=bool(bf16),
        fp16=t.fp16,
        seed=t.seed,
        data_seed=t.seed,
        optim=resolve_optim(t.optim, device),
        dataloader_num_workers=t.dataloader_num_workers,
        report_to=t.report_to or "none",
        deepspeed=t.deepspeed,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        remove_unused_columns=False,
        # the NaN filter reads the loss every step, a GPU sync that stalls the queue; NonFiniteLossCallback
        # stops the run at the first logged NaN/inf instead
        logging_nan_inf_filter=False,
        disable_tqdm=False,
        use_cpu=(device == "cpu"),
    )
    unknown = set(t.extra) - training_arguments_fields()
    if unknown:
        raise ConfigError(f"unknown training options: {', '.join(sorted(unknown))}")
    kw.update(t.extra)
    try:
        return TrainingArguments(**kw)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid training options: {e}") from None


def check_deepspeed(path: str | None) -> None:
    """--deepspeed: the JSON must exist and parse, and deepspeed must be installed (it is not a dependency)."""
    if not path:
        return
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"--deepspeed {path}: no such file (configs/deepspeed/ in the zhtune repository has "
            "ds_zero2_no_offload.json, ds_zero3.json and ds_zero3_offload.json)"
        )
    try:
        json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed {path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    from zhtune.deps import require

    require("deepspeed", "--deepspeed")


def resolve_optim(optim: str, device: str) -> str:
    """auto: fused AdamW on a GPU (one kernel for all parameters), the plain one elsewhere."""
    if optim != "auto":
        return optim
    return "adamw_torch_fused" if device.startswith("cuda") else "adamw_torch"


def resolve_resume(t: TrainArgs) -> str | None:
    """The checkpoint to resume from, or None. Cleans leftovers of a killed save first."""
    out = Path(t.output_dir)
    removed = clean_stale_tmp(out)
    for r in removed:
        log.warning("removed incomplete checkpoint %s left by an interrupted run", r.name)
    value = t.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", "no", "none"):
        return None
    if str(value).lower() in ("true", "yes", "1", "latest"):
        last = get_last_checkpoint(str(out)) if out.is_dir() else None
        if last is None:
            raise ConfigError(
                f"--resume_from_checkpoint true, but {out} holds no complete checkpoint-N directory"
            )
        return last
    path = Path(value)
    if not path.is_dir() or not (path / TRAINER_STATE).is_file():
        raise ConfigError(f"--resume_from_checkpoint {path}: not a complete checkpoint (no {TRAINER_STATE})")
    return str(path)


class ZhTrainer(Trainer):
    """Trainer whose checkpoints appear atomically and carry the resolved zhtune config, with the speed
    settings of train.speed applied (Liger kernels, chunked loss, bf16 adapter inputs, compiled layers)."""

    def __init__(self, *args: Any, zh_config: Config | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.zh_config = zh_config
        from zhtune.train import speed

        t = getattr(zh_config, "train", None) if zh_config is not None else None
        attn = getattr(getattr(zh_config, "model", None), "attn_implementation", None)
        self.speed = speed.plan(self.model, self.args, t, attn_requested=attn)
        if self.args.should_log:
            log.info("speed: %s", self.speed.summary())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        if self.speed.loss != "chunked" or "labels" not in inputs or not torch.is_grad_enabled():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from zhtune.train.loss import capture_final_hidden, head_weight, linear_cross_entropy

        inputs = dict(inputs)
        labels = inputs.pop("labels")
        unwrapped = self.accelerator.unwrap_model(model)
        with capture_final_hidden(unwrapped) as box:
            outputs = model(**inputs, logits_to_keep=1)
        loss = linear_cross_entropy(box["hidden"], head_weight(unwrapped), labels, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        final = os.path.join(run_dir, folder)
        tmp = os.path.join(run_dir, TMP_PREFIX + folder)
        if self.args.should_save and os.path.isdir(tmp):
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        self.save_model(tmp, _internal_call=True)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(tmp)
            self._save_scaler(tmp)
            self._save_rng_state(tmp)
        if self.args.should_save:
            Path(tmp, "training_args.bin").unlink(
                missing_ok=True
            )  # a pickle; zhtune_config.yaml says the same
            self.state.save_to_json(os.path.join(tmp, TRAINER_STATE))
            if self.zh_config is not None:
                save_config(self.zh_config, Path(tmp) / CONFIG_NAME)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            fsync_tree(Path(tmp))
            if os.path.isdir(final):  # an earlier run's checkpoint of the same step
                shutil.rmtree(final)
            os.replace(tmp, final)
            if self.state.best_global_step:
                best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
                if os.path.exists(best):
                    self.state.best_model_checkpoint = best
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()


class LossCurveCallback(TrainerCallback):
    """Writes loss_curve.png (train and eval loss against step) at every log and at the end."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.is_world_process_zero:
            plot_loss(state.log_history, self.path)

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.is_world_process_zero:
            plot_loss(state.log_history, self.path)


class PeakMemoryCallback(TrainerCallback):
    """Adds the peak GPU memory of training so far (GiB, weights included) to every log line on CUDA. The
    peak of loading (a quantized base passes through half precision shard by shard) is logged once as
    load_peak_mem_gib, then the counter restarts so the training peak is what a step needs."""

    def __init__(self) -> None:
        self.load_peak: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        if torch.cuda.is_available() and self.load_peak is None:
            self.load_peak = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if logs is not None and torch.cuda.is_available():
            logs["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if self.load_peak is not None:
                logs["load_peak_mem_gib"] = self.load_peak


class NonFiniteLossCallback(TrainerCallback):
    """Stops the run when the logged loss is NaN or inf, naming the step; the last checkpoint stays intact."""

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {loss} at step {state.global_step}; the newest complete checkpoint in "
                f"{args.output_dir} is intact. Lower --learning_rate, check the data, or use --bf16 instead of --fp16"
            )


def plot_loss(log_history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from zhtune.atomic import atomic_write_bytes

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train and not evals:
        return
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), "-" if len(train) > 20 else ".-", label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_json(path: Path, data: Any) -> None:
    from zhtune.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=2))
