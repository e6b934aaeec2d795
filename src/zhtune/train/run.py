"""What every training command does around its own data and loss: one prologue, one model setup, one ending.

A command (``sft``, ``pt``, and preference tuning the same way) reads::

    cfg = SftConfig.of(cfg)
    ctx = prologue(cfg)                          # output dir, resume, seed, device, model source, tokenizer
    fmt = ctx.chat_format(cfg.data.template)     # the chat template, where the command uses one
    ...                                          # the command's own data
    model, resize = ctx.load_model(full=...)     # the base in its training dtype, embeddings fit the tokenizer
    model = ctx.prepare(model, cfg.lora, tokens_per_step=...)  # LoRA, QLoRA or full; parameters reported
    trainer = ctx.trainer(ZhTrainer, model=model, train_dataset=..., data_collator=...)
    metrics = ctx.fit(trainer)                   # trains (resuming), wall time, peak GPU memory
    ctx.finish(trainer, fmt, summary)            # adapter or model, tokenizer, config, results, atomically

``ctx.trainer`` takes any Trainer subclass built on :class:`zhtune.train.trainer.CheckpointMixin`; it
fills in the TrainingArguments (of the class the config names), the tokenizer, the loss-curve and memory
callbacks and the resolved config.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zhtune.config.args import LoraArgs
from zhtune.model.loader import Source
from zhtune.text.templates import ChatFormat
from zhtune.train.args import TrainingConfig

log = logging.getLogger(__name__)


def say(text: str) -> None:
    """Print on the main process only (a distributed run has one process per GPU)."""
    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)


@dataclass
class RunContext:
    """A training run once its prologue is done. ``resume`` is the checkpoint to resume from, or None."""

    cfg: TrainingConfig
    out: Path
    resume: str | None
    device: str
    source: Source
    tokenizer: Any
    callbacks: list[Any] = field(default_factory=list)  # added to every trainer built by ctx.trainer

    @property
    def tokenizer_dir(self) -> str:
        """Where the tokenizer came from: --tokenizer_name_or_path, or the model's directory."""
        return self.cfg.model.tokenizer_name_or_path or self.source.path

    def chat_format(self, template: str | None) -> ChatFormat:
        """``template`` (a built-in or 'model'), else one recorded next to the tokenizer, else its own."""
        from zhtune.text.templates import get_format

        directory = self.tokenizer_dir if Path(self.tokenizer_dir).is_dir() else None
        return get_format(self.tokenizer, template, directory=directory)

    @property
    def mixed_precision(self) -> bool:
        t = self.cfg.train
        return bool(t.bf16 or t.fp16 or (t.bf16 is None and self.device.startswith("cuda")))

    def load_model(self, *, full: bool) -> tuple[Any, Any]:
        """The base model and its embedding resize (None when the tokenizer fits the model).

        ``full``: every base weight trains, so under mixed precision it loads in float32 (master weights;
        autocast computes in half precision); otherwise in --dtype.
        """
        import torch

        from zhtune.model.embeddings import fit_embeddings
        from zhtune.model.loader import load_model, pick_dtype

        m = self.cfg.model
        dtype = torch.float32 if full and self.mixed_precision else pick_dtype(m.dtype, self.device)
        model = load_model(m, self.source, dtype=dtype, device=self.device, place=False)
        resize = fit_embeddings(
            model, self.tokenizer, model_path=self.source.path, tokenizer_name=m.tokenizer_name_or_path,
            init=m.new_token_init,
        )  # fmt: skip
        return model, resize

    def prepare(self, model: Any, lora: LoraArgs, *, tokens_per_step: int) -> Any:
        """LoRA (fresh or continued), QLoRA or full weights, as ``lora`` says. ``tokens_per_step`` decides an
        unset --gradient_checkpointing by memory."""
        from zhtune.train.setup import prepare_for_training

        m, t = self.cfg.model, self.cfg.train
        return prepare_for_training(model, m, lora, t, tokens_per_step=tokens_per_step, device=self.device)

    def trainer(self, cls: type, *, eval_dataset: Any = None, callbacks: list[Any] = (), **kw: Any) -> Any:
        """A ``cls`` (a CheckpointMixin trainer) for this run; ``kw`` are its other arguments."""
        from zhtune.train.args import build_training_arguments
        from zhtune.train.callbacks import LossCurveCallback, PeakMemoryCallback

        args_cls, own = self.cfg.arguments()
        args = build_training_arguments(
            self.cfg.train, has_eval=eval_dataset is not None, device=self.device, cls=args_cls, own=own
        )
        self.callbacks = [LossCurveCallback(self.out / "loss_curve.png"), PeakMemoryCallback(), *callbacks]
        kw.setdefault("processing_class", self.tokenizer)
        return cls(args=args, eval_dataset=eval_dataset, callbacks=self.callbacks, zh_config=self.cfg, **kw)

    def fit(self, trainer: Any, *, evaluate: bool = False) -> dict[str, Any]:
        """Train (from ``resume``); with ``evaluate``, trainer.evaluate() after. The metrics, with the wall time
        and, on CUDA, the peak memory of the training steps and of loading."""
        import torch

        from zhtune.train.callbacks import PeakMemoryCallback

        t0 = time.time()
        metrics = dict(trainer.train(resume_from_checkpoint=self.resume).metrics)
        if evaluate:
            metrics.update(trainer.evaluate())
        metrics["wall_seconds"] = round(time.time() - t0, 1)
        if torch.cuda.is_available():
            metrics["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            peaks = [cb.load_peak for cb in self.callbacks if isinstance(cb, PeakMemoryCallback)]
            metrics["load_peak_mem_gib"] = peaks[0] if peaks else None
        return metrics

    def finish(self, trainer: Any, fmt: ChatFormat | None, summary: dict[str, Any]) -> None:
        """The final outputs (see train.outputs.save_final). Every rank calls it: FSDP gathers the weights."""
        from zhtune.train.outputs import save_final

        save_final(trainer, self.tokenizer, fmt, self.cfg, self.out, summary)


def prologue(cfg: TrainingConfig) -> RunContext:
    """Resolve the resume checkpoint (cleaning up an interrupted save), refuse to overwrite a finished run,
    seed everything, pick the device, find the model and load the tokenizer."""
    from transformers import set_seed

    from zhtune.model.loader import load_tokenizer, pick_device, resolve
    from zhtune.train.outputs import check_output_dir
    from zhtune.train.resume import resolve_resume

    m, t = cfg.model, cfg.train
    out = Path(t.output_dir)
    resume = resolve_resume(t)
    check_output_dir(out, overwrite=t.overwrite_output_dir, resuming=resume is not None)
    set_seed(t.seed)
    device = pick_device(m.device)
    source = resolve(m.model_name_or_path, m.gguf_file, m.cache_dir)
    return RunContext(cfg, out, resume, device, source, load_tokenizer(m, source))


def report_parameters(model: Any, label: str = "trainable parameters") -> None:
    from zhtune.train.setup import count_parameters

    n_train, n_total = count_parameters(model)
    say(f"{label} {n_train:,} of {n_total:,} ({100 * n_train / max(n_total, 1):.3f}%)")
