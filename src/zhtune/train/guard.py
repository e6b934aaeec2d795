"""What stops a run cleanly instead of wasting it: non-finite losses, a collapsing fp16 loss scale, a failed
checkpoint write, and checkpoint rotation that never removes what a resume needs.

* ``--nan_policy stop`` (default): the first NaN/inf loss is recorded on the device as it happens (no
  per-step synchronisation) and checked before every log, every checkpoint and the end of training, so the
  run stops naming the exact step and no checkpoint after it is ever written.
* ``--nan_policy skip``: a step whose gradients are not finite has its update dropped and is counted
  (``skipped_steps`` in the logs); the run stops after ``--max_skipped_steps`` such steps. This checks every
  step (one synchronisation per step).
* fp16: steps the gradient scaler skipped for overflow are counted (``overflow_steps``) and the scale is
  logged (``loss_scale``); the run stops when the scale collapses below :data:`MIN_LOSS_SCALE` or when
  :data:`MAX_OVERFLOWS_IN_A_ROW` steps overflow in a row, since nothing is being learned then.
"""

from __future__ import annotations

import errno
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from zhtune.errors import TrainingStopped

log = logging.getLogger(__name__)
MIN_LOSS_SCALE = 1.0
MAX_OVERFLOWS_IN_A_ROW = 25
CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class LossGuard(TrainerCallback):
    """Watches the training loss (``observe`` from compute_loss) and, with ``skip``, the gradients."""

    def __init__(self, policy: str = "stop", max_skipped: int = 10):
        self.policy, self.max_skipped = policy, max_skipped
        self.first_bad: torch.Tensor | None = None  # step of the first non-finite loss, -1 if none
        self.bad_value: torch.Tensor | None = None
        self.skipped = 0
        self.skipped_at: list[int] = []

    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Record a training loss of optimizer step ``step`` without synchronising with the device."""
        if self.policy != "stop":
            return
        loss = loss.detach().float().reshape(())
        bad = ~torch.isfinite(loss)
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
            self.bad_value = torch.zeros((), device=loss.device)
        new = bad & (self.first_bad < 0)
        self.first_bad = torch.where(new, torch.tensor(step, device=loss.device), self.first_bad)
        self.bad_value = torch.where(new, loss, self.bad_value)

    def check(self, output_dir: str, where: str) -> None:
        """Raise TrainingStopped if a non-finite loss was seen (one synchronisation)."""
        if self.first_bad is None:
            return
        step = int(self.first_bad.item())
        if step < 0:
            return
        value = float(self.bad_value.item())
        raise TrainingStopped(
            f"the training loss became {value} at step {step} (noticed {where}); training stopped and no "
            f"checkpoint after step {step - 1} was written, so the newest complete checkpoint in {output_dir} is "
            "the last good one. Lower --learning_rate, check the data, use --bf16 instead of --fp16, or pass "
            "--nan_policy skip to drop such steps and go on"
        )

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        if self.policy != "skip" or model is None:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            return
        for p in model.parameters():
            p.grad = None  # the optimizer leaves parameters without a gradient untouched
        step = state.global_step + 1
        self.skipped += 1
        self.skipped_at.append(step)
        log.warning(
            "step %d: the loss or its gradients are not finite; the update is skipped (%d of at most %d)",
            step,
            self.skipped,
            self.max_skipped,
        )
        if self.skipped > self.max_skipped:
            raise TrainingStopped(
                f"{self.skipped} steps had a NaN/inf loss or gradients (steps {self.skipped_at[:10]}), more than "
                f"--max_skipped_steps {self.max_skipped}; the newest complete checkpoint in {args.output_dir} is "
                "intact. Lower --learning_rate or check the data"
            )

    def log_fields(self) -> dict[str, Any]:
        """Added to every training log entry (ZhTrainer.log), before it enters the log history."""
        return {"skipped_steps": self.skipped} if self.policy == "skip" else {}

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if self.policy == "stop":
            self.check(args.output_dir, "when logging")

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.check(args.output_dir, "at the end of training")


class LossScaleMonitor(TrainerCallback):
    """fp16: counts the steps the gradient scaler skipped for overflow and stops a run whose scale collapsed."""

    def __init__(self, get_scaler: Any):
        self.get_scaler = get_scaler
        self.before: float | None = None
        self.overflows = 0
        self.in_a_row = 0

    def scale(self) -> float | None:
        scaler = self.get_scaler()
        return None if scaler is None or not scaler.is_enabled() else float(scaler.get_scale())

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001
        self.before = self.scale()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        """After the scaler's update: a lower scale means this step overflowed and was skipped."""
        after = self.scale()
        if after is None or self.before is None:
            return
        self.observe(self.before, after, state.global_step, args.output_dir)

    def observe(self, before: float, after: float, step: int, output_dir: str) -> None:
        if after < before:
            self.overflows += 1
            self.in_a_row += 1
            log.warning(
                "step %d: fp16 gradients overflowed; the step is skipped, loss scale %g -> %g",
                step,
                before,
                after,
            )
        else:
            self.in_a_row = 0
        if after < MIN_LOSS_SCALE or self.in_a_row >= MAX_OVERFLOWS_IN_A_ROW:
            raise TrainingStopped(
                f"the fp16 loss scale collapsed to {after:g} at step {step} after {self.overflows} overflowing steps "
                f"({self.in_a_row} in a row): float16 cannot hold these gradients and nothing is being learned. "
                f"Use --bf16 (on a GPU that has it) or lower --learning_rate; the newest complete checkpoint in "
                f"{output_dir} is intact"
            )

    def log_fields(self) -> dict[str, Any]:
        s = self.scale()
        return {} if s is None else {"loss_scale": s, "overflow_steps": self.overflows}


def save_failure(e: BaseException, target: str, previous: str | None) -> TrainingStopped:
    """A clear error for a checkpoint that could not be written (disk full, quota, permissions, I/O)."""
    text = str(e)
    code = getattr(e, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "StorageFull" in text:
        why = "the disk is full (no space left on device)"
        fix = "free space or lower --save_total_limit"
    elif code == errno.EFBIG or "File too large" in text:
        why = "a file grew past the size this system allows"
        fix = "raise the file size limit (ulimit -f)"
    else:
        why = f"{type(e).__name__}: {text}"
        fix = "fix the cause"
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    return TrainingStopped(
        f"could not write {target}: {why}. The partial copy was removed and {kept}; {fix}, then run again "
        "with --resume_from_checkpoint true"
    )


def checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete ``checkpoint-N`` directories, by step (temporary ``.tmp-*`` ones never count)."""
    d = Path(run_dir)
    out = []
    if d.is_dir():
        for p in d.iterdir():
            m = CHECKPOINT.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def rotate(run_dir: str | Path, newest: Path, limit: int | None, best: str | None = None) -> list[Path]:
    """Delete checkpoints after ``newest`` was published; returns what was deleted.

    Never deletes ``newest`` (what a resume now needs) or ``best``. Checkpoints of a later step than
    ``newest`` belong to a run that was rolled back (resumed from an earlier checkpoint) and are deleted, so
    ``--resume_from_checkpoint true`` finds this run's state. Then the oldest go until ``limit`` remain.
    """
    keep = {newest.resolve()} | ({Path(best).resolve()} if best else set())
    ck = checkpoints(run_dir)
    step_of_newest = next((s for s, p in ck if p.resolve() == newest.resolve()), None)
    doomed = []
    if step_of_newest is not None:
        doomed += [p for s, p in ck if s > step_of_newest and p.resolve() not in keep]
    left = [p for _, p in ck if p not in doomed]  # oldest first
    if limit is not None and limit > 0:
        excess = len(left) - limit
        for p in left:
            if excess <= 0:
                break
            if p.resolve() not in keep:
                doomed.append(p)
                excess -= 1
    for p in doomed:
        log.info("deleting %s (--save_total_limit %s)", p.name, limit)
        remove_dir(p)
    return doomed


def remove_dir(p: Path) -> None:
    """Rename to a temporary name first, so a kill during the deletion leaves a ``.tmp-*`` leftover (cleaned
    up by the next run) and never a half-deleted ``checkpoint-N`` that looks complete."""
    from zhtune.atomic import tmp_sibling

    gone = tmp_sibling(p)
    try:
        p.rename(gone)
    except OSError:
        return
    shutil.rmtree(gone, ignore_errors=True)
