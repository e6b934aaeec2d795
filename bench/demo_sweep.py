"""Choose the CPU demo's LoRA settings: held-out sentiment accuracy of SmolLM2-135M-Instruct after short
``zhtune sft`` runs with different steps / learning rates / ranks, in float32 as on a CPU.

Runs on any device (on a GPU it takes minutes instead of hours); the data files are the demo's own
(``zhtune demo`` writes train.jsonl and heldout.jsonl into its run directory).

    python bench/demo_sweep.py --model path/to/SmolLM2.gguf --data DIR_WITH_train_and_heldout --out OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CONFIGS = [
    # name, steps, lr, rank, alpha, targets (None = all seven projections), finetuning_type
    ("r8_lr2e-4_75", 75, 2e-4, 8, 32, None, "lora"),
    ("r16_lr1e-3_75", 75, 1e-3, 16, 32, None, "lora"),
    ("r16_lr1e-3_150", 150, 1e-3, 16, 32, None, "lora"),
    ("r16_lr2e-3_150", 150, 2e-3, 16, 32, None, "lora"),
    ("r16_lr1e-3_300", 300, 1e-3, 16, 32, None, "lora"),
    ("r64_lr1e-3_150", 150, 1e-3, 64, 128, None, "lora"),
    ("full_lr5e-5_150", 150, 5e-5, 8, 16, None, "full"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default=None, help="comma list of config names")
    a = ap.parse_args()
    import torch

    from zhtune.config.args import ModelArgs
    from zhtune.demo.corpus import LABELS
    from zhtune.infer.engine import Engine, EngineArgs
    from zhtune.model.loader import load
    from zhtune.score.labels import label_accuracy
    from zhtune.text.templates import get_format
    from zhtune.train.sft import main as sft

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(a.data)
    held = [
        json.loads(x) for x in (data / "heldout.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()
    ]
    margs = ModelArgs(model_name_or_path=a.model, dtype="float32")
    model, tok = load(margs)
    base = label_accuracy(model, tok, get_format(tok), held, LABELS)
    del model
    results = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "held_out": len(held),
               "base": {"accuracy": base.accuracy, "per_label": base.per_label}, "runs": []}  # fmt: skip
    print(f"base {base.accuracy:.3f} {base.per_label}", flush=True)
    only = set(a.only.split(",")) if a.only else None
    for name, steps, lr, rank, alpha, targets, ftype in CONFIGS:
        if only and name not in only:
            continue
        t0 = time.time()
        odir = out / name
        s = sft(
            {
                "model_name_or_path": a.model, "dtype": "float32", "bf16": False, "train_files": [str(data / "train.jsonl")],
                "output_dir": str(odir), "overwrite_output_dir": True, "max_steps": steps, "per_device_train_batch_size": 8,
                "learning_rate": lr, "warmup_ratio": 0.05, "lora_rank": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
                "trainable": targets, "finetuning_type": ftype, "max_seq_length": 192, "logging_steps": 10,
                "save_steps": 100000, "report_to": "none", "seed": 0, "data_cache_dir": str(out / "cache"),
            }
        )  # fmt: skip
        train_s = time.time() - t0
        if ftype == "full":
            eng = Engine.load(ModelArgs(model_name_or_path=str(odir), dtype="float32"))
        else:
            eng = Engine.load(margs, EngineArgs(lora_models=[str(odir)]))
        r = label_accuracy(eng.model, eng.tok, eng.fmt, held, LABELS)
        row = {"name": name, "steps": steps, "lr": lr, "rank": rank, "type": ftype, "accuracy": r.accuracy,
               "per_label": r.per_label, "train_s": round(train_s, 1),
               "losses": [h["loss"] for h in s["log_history"] if "loss" in h]}  # fmt: skip
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        del eng
        (out / "demo_sweep.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print(f"{'config':<18} {'acc':>6}  {'train s':>7}")
    for r in results["runs"]:
        print(f"{r['name']:<18} {r['accuracy']:>6.3f}  {r['train_s']:>7.1f}")


if __name__ == "__main__":
    main()
