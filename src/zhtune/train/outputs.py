"""Final outputs of a training run, published file by file with the loadable markers last."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from zhtune.atomic import TMP_PREFIX, publish_files, tmp_sibling, write_json
from zhtune.config.parse import Config, save_config
from zhtune.errors import ConfigError
from zhtune.text.templates import ChatFormat, save_tokenizer, write_sidecar
from zhtune.train import guard
from zhtune.train.trainer import CONFIG_NAME

MARKERS = ("adapter_config.json", "config.json")


def check_output_dir(out: Path, *, overwrite: bool, resuming: bool) -> None:
    finished = any((out / m).is_file() for m in MARKERS)
    if finished and not (overwrite or resuming):
        raise ConfigError(
            f"{out} already holds a finished run; pass --overwrite_output_dir to replace it, "
            "--resume_from_checkpoint true to continue it, or another --output_dir"
        )


def save_final(
    trainer: Any, tokenizer: Any, fmt: ChatFormat | None, cfg: Config, out: Path, summary: dict[str, Any]
) -> None:
    """Adapter (or full model), tokenizer + chat template, resolved config and results, atomically.

    ``fmt`` None (pre-training with a tokenizer that has no chat template) writes no template record.
    In a distributed run with sharded weights (FSDP, DeepSpeed ZeRO) every rank must call it: saving gathers
    the shards, only the main process writes, and the staging directory has one name all ranks agree on.
    Otherwise calling it on the main process alone is enough.
    """
    main = trainer.args.should_save
    # sharded weights (FSDP, DeepSpeed ZeRO) are gathered by every rank; then the ranks must meet here
    sharded = bool(
        getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
    )
    staging = out.parent / f"{TMP_PREFIX}{out.name}-final" if sharded else tmp_sibling(out / "final")
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    if sharded:
        trainer.accelerator.wait_for_everyone()
    try:
        _write_final(trainer, tokenizer, fmt, cfg, staging, summary, main)
    except OSError as e:  # disk full, quota, permissions: the staged copy goes, the checkpoints stay
        shutil.rmtree(staging, ignore_errors=True)
        ck = guard.checkpoints(out)
        raise guard.save_failure(e, f"the final outputs in {out}", str(ck[-1][1]) if ck else None) from e
    if not main:
        if sharded:
            trainer.accelerator.wait_for_everyone()
        return
    publish_files(staging, out, last=MARKERS)
    if sharded:
        trainer.accelerator.wait_for_everyone()


def _write_final(
    trainer: Any,
    tokenizer: Any,
    fmt: ChatFormat | None,
    cfg: Config,
    staging: Path,
    summary: dict[str, Any],
    main: bool,
) -> None:
    trainer.save_model(str(staging))  # writes on the main process only
    if not main:
        return
    save_tokenizer(tokenizer, staging)
    if fmt is not None:
        write_sidecar(fmt, staging)
    save_config(
        cfg,
        staging / CONFIG_NAME,
        extra={"data_report": summary["data"], "template": fmt.name if fmt else None},
    )
    write_json(staging / "train_results.json", {k: v for k, v in summary.items() if k != "log_history"})
    write_json(staging / "log_history.json", summary["log_history"])
    (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; the YAML config says the same
