"""``zhtune pt``: continued pre-training on plain text, the second half of the Chinese-LLaMA method.

Stages (``--stage``):

* ``embeddings``: only embed_tokens and lm_head train (``--new_rows_only`` keeps the base's rows fixed);
  the transformer is frozen. Saves the whole model, resized, for the next stage.
* ``lora`` (default): LoRA on the chosen projections plus ``--modules_to_save embed_tokens,lm_head`` trained
  in full, as Chinese-LLaMA's run_clm_pt_with_peft.py (lr 2e-4, r 8, alpha 32, dropout 0.05). The adapter
  holds the resized embeddings: load it with plain peft onto the base after
  ``model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)``.
* ``full``: every weight trains.

A tokenizer longer than the model's (``--tokenizer_name_or_path`` from ``zhtune vocab merge``) resizes the
model first. Validation text gets perplexity and bits per character before and after training.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from zhtune.config.args import LoraArgs, ModelArgs, TrainArgs
from zhtune.config.parse import Config, field
from zhtune.errors import ConfigError
from zhtune.train.args import TrainingConfig
from zhtune.train.pt_data import PtDataArgs

if TYPE_CHECKING:
    from zhtune.train.run import RunContext

log = logging.getLogger(__name__)
DESCRIPTION = "Continue pre-training on plain text: embeddings, LoRA + embeddings (Chinese-LLaMA), or full."


@dataclass
class StageArgs:
    """which stage"""

    stage: Literal["embeddings", "lora", "full"] = field(
        "lora", "embeddings (embed_tokens/lm_head only), lora (LoRA + modules_to_save) or full."
    )
    new_rows_only: bool = field(
        False, "Stage embeddings: train only the rows of the new tokens; the base's rows stay as they are."
    )
    eval_before_training: bool = field(True, "Measure perplexity and bits per character before training too.")


@dataclass
class PtLoraArgs(LoraArgs):
    """what to train (stage lora)"""

    modules_to_save: list[str] | None = field(
        factory=lambda: ["embed_tokens", "lm_head"],
        help="Modules trained in full and saved with the adapter ('none' for none).",
    )


@dataclass
class PtTrainArgs(TrainArgs):
    """how to train (Hugging Face Trainer flags)"""

    learning_rate: float = field(2e-4, "Peak learning rate (Chinese-LLaMA: 2e-4).")


class PtConfig(TrainingConfig):
    """zhtune pt's configuration; ``PtConfig.of(dict)`` builds one from a dict or a recipe's mapping."""

    model: ModelArgs
    data: PtDataArgs
    stage: StageArgs
    lora: PtLoraArgs
    train: PtTrainArgs


CONFIG = PtConfig
SECTIONS = PtConfig.section_types()


def freeze_all_but_embeddings(model: Any, base_rows: int | None) -> list[Any]:
    """Stage 1: train embed_tokens and lm_head only; with ``base_rows``, only rows from there on."""
    model.requires_grad_(False)
    params = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not params[0]:
        params.append(head.weight)
    for p in params:
        p.requires_grad_(True)
        if base_rows is not None:

            def keep_base_rows(grad: Any, n: int = base_rows) -> Any:
                grad = grad.clone()
                grad[:n] = 0
                return grad

            p.register_hook(keep_base_rows)
    return params


def prepare_stage(ctx: RunContext, model: Any, resize: Any) -> Any:
    """What trains in this stage: the embeddings only, LoRA + modules_to_save, or every weight."""
    cfg: PtConfig = ctx.cfg
    m, s, t = cfg.model, cfg.stage, cfg.train
    if s.stage != "embeddings":
        lora = dataclasses.replace(cfg.lora, finetuning_type="full" if s.stage == "full" else "lora")
        # unset --gradient_checkpointing: decided by the memory of a step
        return ctx.prepare(model, lora, tokens_per_step=t.per_device_train_batch_size * cfg.data.block_size)
    if m.load_in_4bit or m.load_in_8bit:
        raise ConfigError("--stage embeddings trains full embedding rows; do not load the base quantized")
    rows = None
    if s.new_rows_only:
        if resize is None:
            raise ConfigError(
                "--new_rows_only: this model has no new rows; pass --tokenizer_name_or_path with a tokenizer "
                "that extends the model's own"
            )
        if t.weight_decay:
            raise ConfigError(
                "--new_rows_only needs --weight_decay 0 (decay would also shrink the base rows)"
            )
        rows = resize.base_vocab
    from zhtune.train.setup import enable_checkpointing

    freeze_all_but_embeddings(model, rows)
    if t.gradient_checkpointing:
        enable_checkpointing(model, t)
    return model


def check_stage(cfg: PtConfig) -> None:
    s, lo = cfg.stage, cfg.lora
    if lo.finetuning_type == "full" and s.stage != "full":
        raise ConfigError(
            "zhtune pt chooses what trains with --stage; use --stage full instead of --finetuning_type"
        )
    if lo.modules_to_save == ["none"]:
        lo.modules_to_save = None
    if s.new_rows_only and s.stage != "embeddings":
        raise ConfigError("--new_rows_only applies to --stage embeddings")
    if s.stage != "lora" and lo.peft_path:
        raise ConfigError("--peft_path continues a LoRA adapter: it needs --stage lora")


def main(
    cfg: PtConfig | Config | dict[str, Any],
    data: tuple[Any, Any, Any] | None = None,
    callbacks: list[Any] | None = None,
) -> dict[str, Any]:
    """Run continued pre-training; returns a summary (metrics before/after, data report, output paths).

    ``data`` = (train blocks, validation blocks or None, report) skips reading --dataset_dir: any sequences
    of ``{"input_ids": [...], "n_chars": n}`` (with slicing to dicts of lists, as a ``datasets.Dataset``
    has) built by :func:`zhtune.train.pt_data.encode_documents` and :func:`zhtune.train.pt_data.group_blocks`.
    ``callbacks`` are added to the trainer's.
    """
    from zhtune.train.launch import main_process_first
    from zhtune.train.pt_data import BlockCollator, build_pt_data
    from zhtune.train.run import prologue, report_parameters, say
    from zhtune.train.trainer import ZhTrainer

    cfg = PtConfig.of(cfg)
    check_stage(cfg)
    s = cfg.stage
    ctx = prologue(cfg)
    with main_process_first():  # one process tokenizes and fills the cache, the others then read it
        train_ds, eval_ds, report = data or build_pt_data(ctx.tokenizer, cfg.data, cfg.train.seed)
    say(f"pre-training data ({report.cached_files} of {report.files} files from cache):\n{report.table()}")

    model, resize = ctx.load_model(full=s.stage != "lora")
    model = prepare_stage(ctx, model, resize)
    report_parameters(model, f"stage {s.stage}: trainable parameters")
    trainer = ctx.trainer(
        ZhTrainer, model=model, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=BlockCollator(),
        callbacks=callbacks or [],
    )  # fmt: skip
    before = after = None
    if eval_ds is not None and s.eval_before_training and ctx.resume is None:
        trainer.model.to(trainer.args.device)
        before = evaluate(cfg, trainer.model, eval_ds, "evaluating before training")
    metrics = ctx.fit(trainer)
    if eval_ds is not None:
        after = evaluate(cfg, trainer.model, eval_ds, "evaluating")
        metrics.update({f"eval_{k}": v for k, v in after.items()})
    summary = {
        "output_dir": str(ctx.out),
        "stage": s.stage,
        "metrics": metrics,
        "eval_before": before,
        "eval_after": after,
        "resize": resize.to_dict() if resize else None,
        "data": dataclasses.asdict(report),
        "log_history": trainer.state.log_history,
        "train_tokens": trainer.state.num_input_tokens_seen,  # not padding; the whole run, resumes included
    }
    fmt = ctx.chat_format(None) if ctx.tokenizer.chat_template else None
    ctx.finish(trainer, fmt, summary)
    return summary


def evaluate(cfg: PtConfig, model: Any, eval_ds: Any, desc: str) -> dict[str, float]:
    """Loss, perplexity and bits per character on the validation blocks."""
    from zhtune.train.lm_eval import evaluate_lm

    t = cfg.train
    return evaluate_lm(
        model, eval_ds, batch_size=t.per_device_eval_batch_size or t.per_device_train_batch_size, desc=desc
    )


def results_table(summary: dict[str, Any]) -> str:
    rows = []
    for name in ("eval_before", "eval_after"):
        r = summary.get(name)
        if r:
            label = "before training" if name == "eval_before" else "after training"
            rows.append(
                f"  {label:<16} loss {r['loss']:.4f}  perplexity {r['perplexity']:.2f}  bits/char {r['bpc']:.4f}"
            )
    return "\n".join(rows)


def cli(argv: list[str] | None = None) -> int:
    from zhtune.train.run import say

    summary = main(PtConfig.from_cli(argv, "zhtune pt", DESCRIPTION))
    table = results_table(summary)
    if table:
        say(f"validation ({summary['eval_after']['chars']:,} characters):\n{table}")
    say(f"done: stage {summary['stage']}; outputs in {summary['output_dir']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(cli())
