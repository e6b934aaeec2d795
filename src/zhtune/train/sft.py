"""``zhtune sft``: instruction tuning (LoRA, QLoRA, 8-bit base or full) on Alpaca/ShareGPT/messages data.

Every assistant turn is supervised including its end-of-turn token; prompts and template text get -100.
Outputs in --output_dir: the adapter (or model) as safetensors, the tokenizer with its chat template, the
resolved config with package versions, loss_curve.png, TensorBoard logs under runs/, train_results.json.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from zhtune.config.args import DataArgs, LoraArgs, ModelArgs, TrainArgs
from zhtune.config.parse import Config
from zhtune.errors import ConfigError

log = logging.getLogger(__name__)
SECTIONS = {"model": ModelArgs, "data": DataArgs, "lora": LoraArgs, "train": TrainArgs}
DESCRIPTION = "Instruction-tune a model on Alpaca, ShareGPT or OpenAI-messages data (LoRA, QLoRA or full)."


def say(text: str) -> None:
    """Print on the main process only (a distributed run has one process per GPU)."""
    import os

    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)


def as_config(cfg: Config | dict[str, Any], sections: dict[str, type] = SECTIONS) -> Config:
    from zhtune.train.trainer import training_config

    return training_config(cfg, sections)


def main(cfg: Config | dict[str, Any]) -> dict[str, Any]:
    """Run SFT; returns a summary (metrics, data report, output paths)."""
    import torch
    from transformers import DataCollatorForSeq2Seq, set_seed

    from zhtune.model.embeddings import fit_embeddings
    from zhtune.model.loader import load_model, load_tokenizer, pick_device, pick_dtype, resolve
    from zhtune.text.templates import attach, get_format
    from zhtune.train.launch import main_process_first
    from zhtune.train.outputs import check_output_dir, save_final
    from zhtune.train.packing import PackingCollator, pack_dataset
    from zhtune.train.setup import count_parameters, prepare_for_training
    from zhtune.train.sft_data import build_sft_data
    from zhtune.train.trainer import (
        LossCurveCallback,
        PeakMemoryCallback,
        ZhTrainer,
        build_training_arguments,
        resolve_resume,
    )

    cfg = as_config(cfg)
    m, d, lo, t = cfg.model, cfg.data, cfg.lora, cfg.train
    out = Path(t.output_dir)
    resume = resolve_resume(t)
    check_output_dir(out, overwrite=t.overwrite_output_dir, resuming=resume is not None)
    set_seed(t.seed)
    device = pick_device(m.device)

    src = resolve(m.model_name_or_path, m.gguf_file, m.cache_dir)
    tokenizer = load_tokenizer(m, src)
    tok_dir = m.tokenizer_name_or_path or src.path
    fmt = get_format(tokenizer, d.template, directory=tok_dir if Path(tok_dir).is_dir() else None)
    log.info("chat template: %s", fmt.name)
    with main_process_first():  # one process tokenizes and fills the cache, the others then read it
        train_ds, eval_ds, report = build_sft_data(tokenizer, fmt, d, t.seed)
    say(f"SFT data ({'from cache' if report.cached else 'tokenized'}):\n{report.table()}")

    mixed = t.bf16 or t.fp16 or (t.bf16 is None and device.startswith("cuda"))
    if lo.finetuning_type == "full" and mixed:
        dtype = torch.float32  # fp32 master weights; autocast computes in half precision
    else:
        dtype = pick_dtype(m.dtype, device)
    model = load_model(m, src, dtype=dtype, device=device, place=False)
    fit_embeddings(
        model, tokenizer, model_path=src.path, tokenizer_name=m.tokenizer_name_or_path, init=m.new_token_init
    )
    tokens_per_step = t.per_device_train_batch_size * d.max_seq_length
    model = prepare_for_training(model, m, lo, t, tokens_per_step=tokens_per_step, device=device)
    n_train, n_total = count_parameters(model)
    say(
        f"trainable parameters: {n_train:,} of {n_total:,} ({100 * n_train / max(n_total, 1):.3f}%)",
    )

    args = build_training_arguments(t, has_eval=eval_ds is not None, device=device)
    if t.packing:
        train_ds = pack_dataset(train_ds, d.max_seq_length, seed=t.seed)
        say(f"packing: {report.train_samples:,} samples into {len(train_ds):,} rows")
    if t.padding_free or t.packing:
        collator = PackingCollator(
            d.max_seq_length,
            pad_token_id=tokenizer.pad_token_id,
            pad_to_multiple_of=64 if device.startswith("cuda") else None,
        )
    else:
        collator = DataCollatorForSeq2Seq(
            tokenizer,
            padding=True,
            label_pad_token_id=-100,
            pad_to_multiple_of=8 if device.startswith("cuda") else None,
        )
    peak = PeakMemoryCallback()
    trainer = ZhTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[LossCurveCallback(out / "loss_curve.png"), peak],
        zh_config=cfg,
    )
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(result.metrics)
    if eval_ds is not None:
        metrics.update(trainer.evaluate())
    metrics["wall_seconds"] = round(time.time() - t0, 1)
    if torch.cuda.is_available():
        metrics["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)  # training steps
        metrics["load_peak_mem_gib"] = peak.load_peak
    attach(fmt, tokenizer)
    summary = {
        "output_dir": str(out),
        "metrics": metrics,
        "data": report.__dict__,
        "log_history": trainer.state.log_history,
        "template": fmt.name,
    }
    save_final(trainer, tokenizer, fmt, cfg, out, summary)  # every rank: FSDP gathers the weights
    return summary


def cli(argv: list[str] | None = None) -> int:
    from zhtune.train.trainer import parse_training_cli

    cfg = parse_training_cli(argv, SECTIONS, "zhtune sft", DESCRIPTION)
    summary = main(cfg)
    met = summary["metrics"]
    parts = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in met.items() if "loss" in k]
    say(f"done: {', '.join(parts)}; outputs in {summary['output_dir']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(cli())


__all__ = ["main", "cli", "SECTIONS", "ConfigError"]
