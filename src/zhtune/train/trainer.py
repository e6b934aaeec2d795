"""zhtune's Trainer, and the checkpoint seam any Trainer subclass can take.

:class:`CheckpointMixin` gives a transformers Trainer subclass crash-safe, pickle-free checkpoints, a clear
resume and the loss guards: ``class ZhTrainer(CheckpointMixin, Trainer)`` here, and in the same way a
preference trainer, ``class ZhDPOTrainer(CheckpointMixin, DPOTrainer)``.

* A checkpoint is written to ``.tmp-checkpoint-N`` and renamed to ``checkpoint-N`` once complete and flushed
  to disk, so a kill never leaves a half-written ``checkpoint-N`` for a resume to trip over (leftovers are
  cleaned up by :func:`zhtune.train.resume.resolve_resume`). A write that fails (disk full) removes the
  partial copy and stops with a clear error.
* Optimizer, scheduler, scaler and RNG states are safetensors + JSON (train.state), so resuming is exact and
  reads no pickle; legacy pickles are read only with ``--allow_pickle`` (and then weights_only).
* Rotation (``--save_total_limit``) runs only after the new checkpoint is in place, sorts by step and never
  deletes the checkpoint just written, so the checkpoint a resume needs is never the one deleted.
* The loss guards of train.guard (``--nan_policy stop|skip``, fp16 overflow) come with it: no checkpoint is
  written after a NaN/inf loss. Every checkpoint carries the resolved zhtune config.

:class:`ZhTrainer` adds the speed settings of train.speed (Liger kernels, bf16 adapter inputs, compiled
layers) and the chunked loss (hidden states projected a chunk of tokens at a time, never full-vocabulary
fp32 logits). Its TrainingArguments come from :func:`zhtune.train.args.build_training_arguments`.

Under FSDP and DeepSpeed the optimizer (and, under FSDP, model shards) are saved by accelerate/DeepSpeed in
their own torch formats, which use pickle: see the README.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.training_args import ParallelMode

from zhtune.atomic import TMP_PREFIX, fsync_dir, fsync_tree
from zhtune.config.parse import Config, save_config
from zhtune.errors import ConfigError
from zhtune.train import guard as guards  # the module, not its names: the crash tests wrap them
from zhtune.train import speed
from zhtune.train import state as train_state  # the same
from zhtune.train.resume import TRAINER_STATE

log = logging.getLogger(__name__)
CONFIG_NAME = "zhtune_config.yaml"


class CheckpointMixin:
    """Put first among the bases of a transformers Trainer subclass; takes ``zh_config=`` (the resolved
    config, saved into every checkpoint; its ``model.allow_pickle`` and ``train.nan_policy`` are read).
    ``saved_adapters``: of a peft model with several adapters, the ones written (None: all of them)."""

    saved_adapters: tuple[str, ...] | None = None

    def __init__(self, *args: Any, zh_config: Config | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.zh_config = zh_config
        t = getattr(zh_config, "train", None)
        self.allow_pickle = bool(getattr(getattr(zh_config, "model", None), "allow_pickle", False))
        self.guard = guards.LossGuard(getattr(t, "nan_policy", "stop"), getattr(t, "max_skipped_steps", 10))
        self.add_callback(self.guard)
        if self.args.fp16:
            self.add_callback(guards.LossScaleMonitor(lambda: getattr(self.accelerator, "scaler", None)))

    def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: ANN001
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.guard.observe(loss, self.state.global_step + 1)  # on the device: no synchronisation
        self._count_tokens(inputs)
        return loss

    def _count_tokens(self, inputs: Any) -> None:
        """Training tokens (not padding), summed on the device: read only when a log is written, so counting
        costs no synchronisation per step (Trainer's own ``include_num_input_tokens_seen`` syncs every step;
        when a run asks for it, it counts instead)."""
        if self.args.include_num_input_tokens_seen != "no":
            return
        get = inputs.get if hasattr(inputs, "get") else lambda _: None
        mask, ids = get("attention_mask"), get("input_ids")
        pad = getattr(self.processing_class, "pad_token_id", None)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            n = mask.sum()
        elif isinstance(ids, torch.Tensor):  # padding-free and packed rows: as Trainer counts them
            n = (ids != pad).sum() if pad is not None else torch.tensor(ids.numel(), device=ids.device)
        else:
            return
        pending = getattr(self, "_zh_tokens", None)
        self._zh_tokens = n.detach().to(torch.int64) if pending is None else pending + n.detach()

    def _flush_tokens(self) -> None:
        pending = getattr(self, "_zh_tokens", None)
        if pending is None:
            return
        self._zh_tokens = None
        if self.accelerator.num_processes > 1:
            pending = self.accelerator.gather(pending.reshape(1)).sum()
        self.state.num_input_tokens_seen += int(pending.item())

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # training logs carry the guards' counters (skipped steps, fp16 loss scale)
            for cb in self.callback_handler.callbacks:
                if hasattr(cb, "log_fields"):
                    logs.update(cb.log_fields())
        if ("loss" in logs or "train_runtime" in logs) and self.args.include_num_input_tokens_seen == "no":
            self._flush_tokens()  # the loss was just read from the device: no extra wait
            if self.state.num_input_tokens_seen:  # (preference batches have no input_ids to count)
                logs["num_input_tokens_seen"] = self.state.num_input_tokens_seen
        super().log(logs, *args, **kwargs)

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        # resumed from a checkpoint of the last step (a run killed while writing its final outputs): Trainer
        # would still take one step more before it notices the end, unless the checkpoint ends an epoch
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Weights (safetensors) and tokenizer; unlike Trainer._save, no pickled training_args.bin."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        kw = {"selected_adapters": list(self.saved_adapters)} if self._several_adapters(model) else {}
        model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True, **kw)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _several_adapters(self, model: Any) -> bool:
        return self.saved_adapters is not None and len(getattr(model, "peft_config", None) or {}) > 1

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        self.guard.check(self.args.output_dir, f"before writing checkpoint-{self.state.global_step}")
        self._flush_tokens()  # trainer_state.json carries the count, so a resumed run goes on from it
        folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        final = os.path.join(run_dir, folder)
        tmp = os.path.join(run_dir, TMP_PREFIX + folder)
        previous = [str(p) for _, p in guards.checkpoints(run_dir) if p.name != folder]
        if self.args.should_save and os.path.isdir(tmp):
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        try:
            self._write_checkpoint(tmp)
        except Exception as e:
            # disk full, quota, permissions: remove the partial copy, keep the last good one
            if self.args.should_save:
                shutil.rmtree(tmp, ignore_errors=True)
            raise guards.save_failure(e, f"{folder} in {run_dir}", previous[-1] if previous else None) from e
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self._publish_checkpoint(tmp, final, run_dir)
        self.accelerator.wait_for_everyone()

    def _write_checkpoint(self, tmp: str) -> None:
        """Everything a resume reads, into the temporary directory ``tmp``."""
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

    def _publish_checkpoint(self, tmp: str, final: str, run_dir: str) -> None:
        """Rename the complete checkpoint into place, then rotate the old ones (main process)."""
        if os.path.isdir(final):  # an earlier run's checkpoint of the same step
            guards.remove_dir(Path(final))
        os.replace(tmp, final)
        fsync_dir(Path(run_dir))
        if self.state.best_global_step:
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if os.path.exists(best):
                self.state.best_model_checkpoint = best
        guards.rotate(run_dir, Path(final), self.args.save_total_limit, self.state.best_model_checkpoint)

    def _sharded(self) -> bool:
        return bool(self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self._sharded():  # accelerate/DeepSpeed write their own (torch) formats: see the module docstring
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            train_state.save_state(self.optimizer.state_dict(), output_dir, "optimizer")
            train_state.save_state(self.lr_scheduler.state_dict(), output_dir, "scheduler")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        if self._sharded():
            return super()._load_optimizer_and_scheduler(checkpoint)
        if train_state.has_state(checkpoint, "optimizer"):
            where = self.args.device if self.args.world_size > 1 else "cpu"
            self.optimizer.load_state_dict(
                train_state.load_state(checkpoint, "optimizer", map_location=str(where))
            )
            self.lr_scheduler.load_state_dict(train_state.load_state(checkpoint, "scheduler"))
            return
        old = train_state.legacy_file(checkpoint, "optimizer")
        if old is not None:
            if not self.allow_pickle:
                train_state.load_legacy(old, allow_pickle=False)  # raises, naming the file and the flag
            return super()._load_optimizer_and_scheduler(checkpoint)  # weights_only=True
        if not self.args.save_only_model:
            raise ConfigError(
                f"{checkpoint} has no optimizer state (optimizer.json): it is incomplete. Resume from another "
                "checkpoint, or start again"
            )

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            train_state.save_state(scaler.state_dict(), output_dir, "scaler")

    def _load_scaler(self, checkpoint: str | None) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is None or scaler is None:
            return
        if train_state.has_state(checkpoint, "scaler"):
            scaler.load_state_dict(train_state.load_state(checkpoint, "scaler"))
        elif (old := train_state.legacy_file(checkpoint, "scaler")) is not None:
            scaler.load_state_dict(train_state.load_legacy(old, allow_pickle=self.allow_pickle))

    def _rng_name(self) -> str:
        return "rng_state" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}"

    def _save_rng_state(self, output_dir: str) -> None:
        distributed = self.args.parallel_mode == ParallelMode.DISTRIBUTED
        train_state.save_state(train_state.rng_states(cuda_all=distributed), output_dir, self._rng_name())

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        distributed = self.args.parallel_mode == ParallelMode.DISTRIBUTED
        name = self._rng_name()
        if train_state.has_state(checkpoint, name):
            train_state.set_rng_states(train_state.load_state(checkpoint, name), cuda_all=distributed)
            return
        old = Path(checkpoint) / f"{name}.pth"
        if old.is_file():
            train_state.set_rng_states(
                train_state.load_legacy(old, allow_pickle=self.allow_pickle), cuda_all=distributed
            )
            return
        log.warning(
            "%s has no random state for this process (%s.json): the resumed run will not repeat the random "
            "choices (dropout, sampling) of an uninterrupted one",
            checkpoint,
            name,
        )


class ZhTrainer(CheckpointMixin, Trainer):
    """Trainer whose checkpoints appear atomically, hold no pickle and carry the resolved zhtune config, that
    stops cleanly on NaN losses, fp16 overflow and failed writes, with the speed settings of train.speed
    applied (Liger kernels, chunked loss, bf16 adapter inputs, compiled layers)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        t = getattr(self.zh_config, "train", None)
        attn = getattr(getattr(self.zh_config, "model", None), "attn_implementation", None)
        self.speed = speed.plan(self.model, self.args, t, attn_requested=attn)
        if self.args.should_log:
            log.info("speed: %s", self.speed.summary())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
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
