"""``zhtune sft``: instruction tuning (LoRA, QLoRA, 8-bit base or full) on Alpaca/ShareGPT/messages data.

Every assistant turn is supervised including its end-of-turn token; prompts and template text get -100.
Outputs in --output_dir: the adapter (or model) as safetensors, the tokenizer with its chat template, the
resolved config with package versions, loss_curve.png, TensorBoard logs under runs/, train_results.json.
"""

from __future__ import annotations

import logging
from typing import Any

from zhtune.config.args import DataArgs, LoraArgs, ModelArgs, TrainArgs
from zhtune.config.parse import Config
from zhtune.errors import ConfigError
from zhtune.train.args import TrainingConfig

log = logging.getLogger(__name__)
DESCRIPTION = "Instruction-tune a model on Alpaca, ShareGPT or OpenAI-messages data (LoRA, QLoRA or full)."


class SftConfig(TrainingConfig):
    """zhtune sft's configuration; ``SftConfig.of(dict)`` builds one from a dict or a recipe's mapping."""

    model: ModelArgs
    data: DataArgs
    lora: LoraArgs
    train: TrainArgs


CONFIG = SftConfig
SECTIONS = SftConfig.section_types()


def main(cfg: SftConfig | Config | dict[str, Any]) -> dict[str, Any]:
    """Run SFT; returns a summary (metrics, data report, output paths)."""
    from zhtune.text.templates import attach
    from zhtune.train.launch import main_process_first
    from zhtune.train.run import prologue, report_parameters, say
    from zhtune.train.sft_data import build_sft_data
    from zhtune.train.trainer import ZhTrainer

    cfg = SftConfig.of(cfg)
    d, lo, t = cfg.data, cfg.lora, cfg.train
    ctx = prologue(cfg)
    fmt = ctx.chat_format(d.template)
    log.info("chat template: %s", fmt.name)
    with main_process_first():  # one process tokenizes and fills the cache, the others then read it
        train_ds, eval_ds, report = build_sft_data(ctx.tokenizer, fmt, d, t.seed)
    say(f"SFT data ({'from cache' if report.cached else 'tokenized'}):\n{report.table()}")

    model, _ = ctx.load_model(full=lo.finetuning_type == "full")
    model = ctx.prepare(model, lo, tokens_per_step=t.per_device_train_batch_size * d.max_seq_length)
    report_parameters(model, "trainable parameters:")
    train_ds, collator = batches(cfg, train_ds, ctx.tokenizer, ctx.device, report.train_samples)
    trainer = ctx.trainer(
        ZhTrainer, model=model, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator
    )
    metrics = ctx.fit(trainer, evaluate=eval_ds is not None)
    attach(fmt, ctx.tokenizer)
    summary = {
        "output_dir": str(ctx.out),
        "metrics": metrics,
        "data": report.__dict__,
        "log_history": trainer.state.log_history,
        "train_tokens": trainer.state.num_input_tokens_seen,  # not padding; the whole run, resumes included
        "template": fmt.name,
    }
    ctx.finish(trainer, fmt, summary)
    return summary


def batches(cfg: SftConfig, train_ds: Any, tokenizer: Any, device: str, n_samples: int) -> tuple[Any, Any]:
    """The training rows and the collator: --packing packs samples into rows ahead; --padding_free lays a
    batch's samples back to back; otherwise they are padded to the longest."""
    from transformers import DataCollatorForSeq2Seq

    from zhtune.train.packing import PackingCollator, pack_dataset
    from zhtune.train.run import say

    d, t = cfg.data, cfg.train
    if t.packing:
        train_ds = pack_dataset(train_ds, d.max_seq_length, seed=t.seed)
        say(f"packing: {n_samples:,} samples into {len(train_ds):,} rows")
    cuda = device.startswith("cuda")
    if t.padding_free or t.packing:
        collator = PackingCollator(
            d.max_seq_length, pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=64 if cuda else None
        )
    else:
        collator = DataCollatorForSeq2Seq(
            tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=8 if cuda else None
        )
    return train_ds, collator


def cli(argv: list[str] | None = None) -> int:
    from zhtune.train.run import say

    summary = main(SftConfig.from_cli(argv, "zhtune sft", DESCRIPTION))
    met = summary["metrics"]
    parts = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in met.items() if "loss" in k]
    say(f"done: {', '.join(parts)}; outputs in {summary['output_dir']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(cli())


__all__ = ["main", "cli", "SftConfig", "SECTIONS", "ConfigError"]
