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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zhtune.config.args import LoraArgs, ModelArgs, TrainArgs
from zhtune.config.parse import Config, field
from zhtune.errors import ConfigError
from zhtune.train.pt_data import PtDataArgs

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


SECTIONS = {
    "model": ModelArgs,
    "data": PtDataArgs,
    "stage": StageArgs,
    "lora": PtLoraArgs,
    "train": PtTrainArgs,
}


def as_config(cfg: Config | dict[str, Any]) -> Config:
    from zhtune.train.trainer import training_config

    return training_config(cfg, SECTIONS)


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


def prepare_stage(model: Any, cfg: Config, resize: Any) -> Any:
    from zhtune.train.setup import prepare_for_training

    m, s, lo, t = cfg.model, cfg.stage, cfg.lora, cfg.train
    if s.stage == "embeddings":
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
        freeze_all_but_embeddings(model, rows)
        if t.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        return model
    kind = "full" if s.stage == "full" else "lora"
    from zhtune.model.loader import pick_device

    tokens = t.per_device_train_batch_size * cfg.data.block_size  # unset --gradient_checkpointing: by memory
    lora = dataclasses.replace(lo, finetuning_type=kind)
    return prepare_for_training(model, m, lora, t, tokens_per_step=tokens, device=pick_device(m.device))


def check_stage(cfg: Config) -> None:
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
    cfg: Config | dict[str, Any], data: tuple[Any, Any, Any] | None = None, callbacks: list[Any] | None = None
) -> dict[str, Any]:
    """Run continued pre-training; returns a summary (metrics before/after, data report, output paths).

    ``data`` = (train blocks, validation blocks or None, report) skips reading --dataset_dir: any sequences
    of ``{"input_ids": [...], "n_chars": n}`` (with slicing to dicts of lists, as a ``datasets.Dataset``
    has) built by :func:`zhtune.train.pt_data.encode_documents` and :func:`zhtune.train.pt_data.group_blocks`.
    ``callbacks`` are added to the trainer's.
    """
    import torch
    from transformers import set_seed

    from zhtune.model.embeddings import fit_embeddings
    from zhtune.model.loader import load_model, load_tokenizer, pick_device, pick_dtype, resolve
    from zhtune.text.templates import get_format
    from zhtune.train.lm_eval import evaluate_lm
    from zhtune.train.outputs import check_output_dir, save_final
    from zhtune.train.pt_data import BlockCollator, build_pt_data
    from zhtune.train.setup import count_parameters
    from zhtune.train.trainer import (
        LossCurveCallback,
        ZhTrainer,
        build_training_arguments,
        resolve_resume,
    )

    cfg = as_config(cfg)
    check_stage(cfg)
    m, d, s, t = cfg.model, cfg.data, cfg.stage, cfg.train
    out = Path(t.output_dir)
    resume = resolve_resume(t)
    check_output_dir(out, overwrite=t.overwrite_output_dir, resuming=resume is not None)
    set_seed(t.seed)
    device = pick_device(m.device)
    src = resolve(m.model_name_or_path, m.gguf_file, m.cache_dir)
    tokenizer = load_tokenizer(m, src)
    from zhtune.train.launch import main_process_first

    with main_process_first():  # one process tokenizes and fills the cache, the others then read it
        train_ds, eval_ds, report = data if data is not None else build_pt_data(tokenizer, d, t.seed)
    print(
        f"pre-training data ({report.cached_files} of {report.files} files from cache):\n{report.table()}",
        flush=True,
    )

    mixed = t.bf16 or t.fp16 or (t.bf16 is None and device.startswith("cuda"))
    dtype = torch.float32 if (s.stage != "lora" and mixed) else pick_dtype(m.dtype, device)
    model = load_model(m, src, dtype=dtype, device=device, place=False)
    resize = fit_embeddings(
        model, tokenizer, model_path=src.path, tokenizer_name=m.tokenizer_name_or_path, init=m.new_token_init
    )
    model = prepare_stage(model, cfg, resize)
    n_train, n_total = count_parameters(model)
    print(
        f"stage {s.stage}: trainable parameters {n_train:,} of {n_total:,} ({100 * n_train / max(n_total, 1):.3f}%)"
    )

    args = build_training_arguments(t, has_eval=eval_ds is not None, device=device)
    trainer = ZhTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=BlockCollator(),
        processing_class=tokenizer,
        callbacks=[LossCurveCallback(out / "loss_curve.png"), *(callbacks or [])],
        zh_config=cfg,
    )
    eval_bs = t.per_device_eval_batch_size or t.per_device_train_batch_size
    before = after = None
    if eval_ds is not None and s.eval_before_training and resume is None:
        trainer.model.to(args.device)
        before = evaluate_lm(trainer.model, eval_ds, batch_size=eval_bs, desc="evaluating before training")
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(result.metrics)
    metrics["wall_seconds"] = round(time.time() - t0, 1)
    if eval_ds is not None:
        after = evaluate_lm(trainer.model, eval_ds, batch_size=eval_bs, desc="evaluating")
        metrics.update({f"eval_{k}": v for k, v in after.items()})
    summary = {
        "output_dir": str(out),
        "stage": s.stage,
        "metrics": metrics,
        "eval_before": before,
        "eval_after": after,
        "resize": resize.to_dict() if resize else None,
        "data": dataclasses.asdict(report),
        "log_history": trainer.state.log_history,
    }
    tok_dir = m.tokenizer_name_or_path or src.path
    fmt = get_format(tokenizer, None, directory=tok_dir) if tokenizer.chat_template else None
    save_final(trainer, tokenizer, fmt, cfg, out, summary)  # every rank: FSDP gathers the weights
    return summary


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
    from zhtune.train.trainer import parse_training_cli

    cfg = parse_training_cli(argv, SECTIONS, "zhtune pt", DESCRIPTION)
    summary = main(cfg)
    table = results_table(summary)
    if table:
        print(f"validation ({summary['eval_after']['chars']:,} characters):\n{table}")
    print(f"done: stage {summary['stage']}; outputs in {summary['output_dir']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(cli())
