"""Trainer callbacks every training command adds: the loss-curve PNG and the peak GPU memory in the logs."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from zhtune.atomic import atomic_write_bytes


class LossCurveCallback(TrainerCallback):
    """Writes loss_curve.png (train and eval loss against step) at the end of training, after every
    evaluation, and at a training log at most every ``every_s`` seconds: drawing it takes a good part of a
    second, which at ``--logging_steps 1`` on a small model would cost more than the steps."""

    def __init__(self, path: str | Path, every_s: float = 60.0):
        self.path = Path(path)
        self.every_s = every_s
        self.last = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self.last = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        due = "eval_loss" in (logs or {}) or time.monotonic() - self.last >= self.every_s
        if state.is_world_process_zero and due:
            plot_loss(state.log_history, self.path)
            self.last = time.monotonic()

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
    """Train and eval loss against step as a PNG, written atomically; nothing when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
