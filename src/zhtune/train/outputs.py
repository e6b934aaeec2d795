"""Final outputs of a training run, published file by file with the loadable markers last."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zhtune.atomic import publish_files, tmp_sibling
from zhtune.config.parse import Config, ConfigError, save_config
from zhtune.data.templates import ChatFormat, save_tokenizer, write_sidecar

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
    """
    from zhtune.train.trainer import CONFIG_NAME, write_json

    staging = tmp_sibling(out / "final")
    staging.mkdir(parents=True)
    trainer.save_model(str(staging))
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
    publish_files(staging, out, last=MARKERS)
