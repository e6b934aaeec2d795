"""Hugging Face Trainer with crash-safe, pickle-free checkpoints, a loss-curve PNG and a clear resume story.

* A checkpoint is written to ``.tmp-checkpoint-N`` and renamed to ``checkpoint-N`` once complete and flushed
  to disk, so a kill never leaves a half-written ``checkpoint-N`` for a resume to trip over; leftovers are
  cleaned up. A write that fails (disk full) removes the partial copy and stops with a clear error.
* Optimizer, scheduler, scaler and RNG states are safetensors + JSON (train.state), so resuming is exact and
  reads no pickle; legacy pickles are read only with ``--allow_pickle`` (and then weights_only).
* ``--resume_from_checkpoint true`` picks the newest complete checkpoint; ``auto`` also starts fresh when
  there is none; a named one is checked first.
* Rotation (``--save_total_limit``) runs only after the new checkpoint is in place, sorts by step and never
  deletes the checkpoint just written, so the checkpoint a resume needs is never the one deleted.
* NaN/inf losses and fp16 overflow are handled by train.guard (``--nan_policy stop|skip``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.training_args import ParallelMode

from zhtune.atomic import TMP_PREFIX, clean_stale_tmp, fsync_dir, fsync_tree
from zhtune.config.args import TrainArgs
from zhtune.config.parse import Config, save_config
from zhtune.errors import ConfigError

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
        # the NaN filter reads the loss every step, a GPU sync that stalls the queue; train.guard records the
        # first NaN/inf on the device instead. --nan_policy skip syncs every step anyway, so it filters the log
        logging_nan_inf_filter=t.nan_policy == "skip",
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
    """The checkpoint to resume from, or None. Cleans leftovers of a killed save first.

    ``true``/``latest``: the newest complete checkpoint (an error if there is none); ``auto``: the same, or a
    fresh start when there is none (for jobs that are restarted after preemption); a path: that checkpoint.
    """
    from zhtune.train.guard import checkpoints

    out = Path(t.output_dir)
    removed = clean_stale_tmp(out)
    for r in removed:
        log.warning("removed incomplete checkpoint %s left by an interrupted run", r.name)
    value = t.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", "no", "none"):
        return None
    complete = [(s, p) for s, p in checkpoints(out) if (p / TRAINER_STATE).is_file()]
    if str(value).lower() in ("true", "yes", "1", "latest", "auto"):
        if complete:
            return str(complete[-1][1])
        if str(value).lower() == "auto":
            log.info("no checkpoint in %s: starting from the beginning", out)
            return None
        raise ConfigError(
            f"--resume_from_checkpoint {value}, but {out} holds no complete checkpoint-N directory "
            "(--resume_from_checkpoint auto starts from the beginning when there is none)"
        )
    path = Path(value)
    if not path.is_dir() or not (path / TRAINER_STATE).is_file():
        raise ConfigError(f"--resume_from_checkpoint {path}: not a complete checkpoint (no {TRAINER_STATE})")
    mine = _step(path)
    later = [p.name for s, p in complete if p.parent.resolve() == path.parent.resolve() and s > mine]
    if later:
        log.warning(
            "resuming from %s although %s exist: those belong to the run being rolled back and are deleted when "
            "this run writes its first checkpoint (copy them elsewhere to keep them)",
            path.name,
            ", ".join(later),
        )
    return str(path)


def _step(p: Path) -> int:
    tail = p.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


class ZhTrainer(Trainer):
    """Trainer whose checkpoints appear atomically, hold no pickle and carry the resolved zhtune config, that
    stops cleanly on NaN losses, fp16 overflow and failed writes, with the speed settings of train.speed
    applied (Liger kernels, chunked loss, bf16 adapter inputs, compiled layers).

    Optimizer, scheduler, scaler and RNG states are written as safetensors + JSON (train.state) instead of
    Hugging Face's ``torch.save`` pickles. Under FSDP and DeepSpeed the optimizer (and, under FSDP, model
    shards) are saved by accelerate/DeepSpeed in their own torch formats, which use pickle: see the README.
    """

    def __init__(self, *args: Any, zh_config: Config | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.zh_config = zh_config
        from zhtune.train import speed
        from zhtune.train.guard import LossGuard, LossScaleMonitor

        t = getattr(zh_config, "train", None) if zh_config is not None else None
        attn = getattr(getattr(zh_config, "model", None), "attn_implementation", None)
        self.allow_pickle = bool(getattr(getattr(zh_config, "model", None), "allow_pickle", False))
        self.guard = LossGuard(getattr(t, "nan_policy", "stop"), getattr(t, "max_skipped_steps", 10))
        self.add_callback(self.guard)
        if self.args.fp16:
            self.add_callback(LossScaleMonitor(lambda: getattr(self.accelerator, "scaler", None)))
        self.speed = speed.plan(self.model, self.args, t, attn_requested=attn)
        if self.args.should_log:
            log.info("speed: %s", self.speed.summary())

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # training logs carry the guards' counters (skipped steps, fp16 loss scale)
            for cb in self.callback_handler.callbacks:
                if hasattr(cb, "log_fields"):
                    logs.update(cb.log_fields())
        super().log(logs, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        out = self._loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training and torch.is_grad_enabled():
            self.guard.observe(out[0] if return_outputs else out, self.state.global_step + 1)
        return out

    def _loss(self, model, inputs, return_outputs, num_items_in_batch):  # noqa: ANN001
        if self.speed.loss != "chunked" or "labels" not in inputs or not torch.is_grad_enabled():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from zhtune.score.loss import capture_final_hidden, head_weight, linear_cross_entropy

        inputs = dict(inputs)
        labels = inputs.pop("labels")
        unwrapped = self.accelerator.unwrap_model(model)
        with capture_final_hidden(unwrapped) as box:
            outputs = model(**inputs, logits_to_keep=1)
        loss = linear_cross_entropy(box["hidden"], head_weight(unwrapped), labels, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        # resumed from a checkpoint of the last step (a run killed while writing its final outputs): Trainer
        # would still take one step more before it notices the end, unless the checkpoint ends an epoch
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    # ---- checkpoints: atomic, safetensors + JSON, clear errors ----

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Weights (safetensors) and tokenizer; unlike Trainer._save, no pickled training_args.bin."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        from zhtune.train.guard import checkpoints, remove_dir, rotate, save_failure

        self.guard.check(self.args.output_dir, f"before writing checkpoint-{self.state.global_step}")
        folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        final = os.path.join(run_dir, folder)
        tmp = os.path.join(run_dir, TMP_PREFIX + folder)
        previous = [str(p) for _, p in checkpoints(run_dir) if p.name != folder]
        if self.args.should_save and os.path.isdir(tmp):
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        try:
            self.save_model(tmp, _internal_call=True)
            if not self.args.save_only_model:
                self._save_optimizer_and_scheduler(tmp)
                self._save_scaler(tmp)
                self._save_rng_state(tmp)
            if self.args.should_save:
                Path(tmp, "training_args.bin").unlink(missing_ok=True)  # a pickle (DeepSpeed/FSDP paths)
                self.state.save_to_json(os.path.join(tmp, TRAINER_STATE))
                if self.zh_config is not None:
                    save_config(self.zh_config, Path(tmp) / CONFIG_NAME)
                fsync_tree(Path(tmp))
        except Exception as e:
            # disk full, quota, permissions: remove the partial copy, keep the last good one
            if self.args.should_save:
                shutil.rmtree(tmp, ignore_errors=True)
            raise save_failure(e, f"{folder} in {run_dir}", previous[-1] if previous else None) from e
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if os.path.isdir(final):  # an earlier run's checkpoint of the same step
                remove_dir(Path(final))
            os.replace(tmp, final)
            fsync_dir(Path(run_dir))
            if self.state.best_global_step:
                best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
                if os.path.exists(best):
                    self.state.best_model_checkpoint = best
            rotate(run_dir, Path(final), self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _sharded(self) -> bool:
        return bool(self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self._sharded():  # accelerate/DeepSpeed write their own (torch) formats: see the class docstring
            return super()._save_optimizer_and_scheduler(output_dir)
        from zhtune.train.state import save_state

        if self.args.should_save:
            save_state(self.optimizer.state_dict(), output_dir, "optimizer")
            save_state(self.lr_scheduler.state_dict(), output_dir, "scheduler")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        if self._sharded():
            return super()._load_optimizer_and_scheduler(checkpoint)
        from zhtune.train.state import has_state, legacy_file, load_state

        if has_state(checkpoint, "optimizer"):
            where = self.args.device if self.args.world_size > 1 else "cpu"
            self.optimizer.load_state_dict(load_state(checkpoint, "optimizer", map_location=str(where)))
            self.lr_scheduler.load_state_dict(load_state(checkpoint, "scheduler"))
            return
        old = legacy_file(checkpoint, "optimizer")
        if old is not None:
            if not self.allow_pickle:
                from zhtune.train.state import load_legacy

                load_legacy(old, allow_pickle=False)  # raises, naming the file and the flag
            return super()._load_optimizer_and_scheduler(checkpoint)  # weights_only=True
        if not self.args.save_only_model:
            raise ConfigError(
                f"{checkpoint} has no optimizer state (optimizer.json): it is incomplete. Resume from another "
                "checkpoint, or start again"
            )

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not self.args.should_save:
            return
        from zhtune.train.state import save_state

        save_state(scaler.state_dict(), output_dir, "scaler")

    def _load_scaler(self, checkpoint: str | None) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is None or scaler is None:
            return
        from zhtune.train.state import has_state, legacy_file, load_legacy, load_state

        if has_state(checkpoint, "scaler"):
            scaler.load_state_dict(load_state(checkpoint, "scaler"))
        elif (old := legacy_file(checkpoint, "scaler")) is not None:
            scaler.load_state_dict(load_legacy(old, allow_pickle=self.allow_pickle))

    def _rng_name(self) -> str:
        return "rng_state" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}"

    def _save_rng_state(self, output_dir: str) -> None:
        from zhtune.train.state import rng_states, save_state

        distributed = self.args.parallel_mode == ParallelMode.DISTRIBUTED
        save_state(rng_states(cuda_all=distributed), output_dir, self._rng_name())

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        from zhtune.train.state import has_state, load_legacy, load_state, set_rng_states

        distributed = self.args.parallel_mode == ParallelMode.DISTRIBUTED
        name = self._rng_name()
        if has_state(checkpoint, name):
            set_rng_states(load_state(checkpoint, name), cuda_all=distributed)
            return
        old = Path(checkpoint) / f"{name}.pth"
        if old.is_file():
            set_rng_states(load_legacy(old, allow_pickle=self.allow_pickle), cuda_all=distributed)
            return
        log.warning(
            "%s has no random state for this process (%s.json): the resumed run will not repeat the random "
            "choices (dropout, sampling) of an uninterrupted one",
            checkpoint,
            name,
        )


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
