"""Which checkpoint a run resumes from (``--resume_from_checkpoint``), after cleaning up a killed save.

* ``true``/``latest``: the newest complete ``checkpoint-N`` in --output_dir (an error when there is none);
* ``auto``: the same, or a fresh start when there is none (for jobs restarted after preemption);
* a path: that checkpoint, checked to be complete; later checkpoints of the abandoned run are named.

A checkpoint is complete when its ``trainer_state.json`` is there: :class:`zhtune.train.trainer.CheckpointMixin`
writes a checkpoint to ``.tmp-checkpoint-N`` and renames it only once everything is on disk.
"""

from __future__ import annotations

import logging
from pathlib import Path

from zhtune.atomic import clean_stale_tmp
from zhtune.config.args import TrainArgs
from zhtune.errors import ConfigError
from zhtune.train.guard import checkpoints

log = logging.getLogger(__name__)
TRAINER_STATE = "trainer_state.json"
NO = ("false", "no", "none")
LATEST = ("true", "yes", "1", "latest", "auto")


def resolve_resume(t: TrainArgs) -> str | None:
    """The checkpoint to resume from, or None. Removes leftovers of an interrupted save first."""
    out = Path(t.output_dir)
    for r in clean_stale_tmp(out):
        log.warning("removed incomplete checkpoint %s left by an interrupted run", r.name)
    value = t.resume_from_checkpoint
    if value is None or str(value).lower() in NO:
        return None
    complete = [(s, p) for s, p in checkpoints(out) if (p / TRAINER_STATE).is_file()]
    if str(value).lower() in LATEST:
        if complete:
            return str(complete[-1][1])
        if str(value).lower() == "auto":
            log.info("no checkpoint in %s: starting from the beginning", out)
            return None
        raise ConfigError(
            f"--resume_from_checkpoint {value}, but {out} holds no complete checkpoint-N directory "
            "(--resume_from_checkpoint auto starts from the beginning when there is none)"
        )
    return _named(Path(value), complete)


def _named(path: Path, complete: list[tuple[int, Path]]) -> str:
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
