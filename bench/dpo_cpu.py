"""Preference tuning of the embedded SmolLM2-135M-Instruct on real Chinese pairs, measured on a CPU.

Data: LLaMA-Factory's ``dpo_zh_demo.json`` (300 Chinese preference pairs, from ../shared/assets; not shipped
with zhtune). ``zhtune dpo --held_out_pairs 60 --seed 0`` holds out 60 records (whole prompts, the same split for
every loss) and trains on the rest. The "SFT model" is the embedded default itself: it is already an
instruction-tuned model. For the base model and after each loss (DPO, ORPO, SimPO; LoRA, the same steps), the
held-out preference accuracy of ``zhtune eval --task_metric preference``: the share of held-out pairs whose
chosen reply the model finds likelier, raw and per token, and the mean margin. Also the time per step, and
``uptime`` before and after each phase (the machine is shared: a loaded one is slower).

Pairs are long (median chosen reply 513 tokens for this tokenizer), so on a CPU they are cut to
--max_seq_length tokens by the training rule (the prompt keeps at most half of the window, its last
tokens, replies lose their ends); the held-out comparison cuts them the same way (prompts to half the window).

    python bench/dpo_cpu.py --steps 30 --out bench/results/dpo_cpu.json

A phase already in the output JSON is not run again (a killed run continues where it stopped).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO.parent / "shared" / "assets" / "data" / "dpo_zh_demo.json"
LOSSES = ("dpo", "orpo", "simpo")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def save(path: Path, res: dict) -> None:
    from zhtune.atomic import write_json

    write_json(path, res)


def evaluate(a: argparse.Namespace, name: str, held_out: str, adapter: str | None) -> dict:
    from zhtune.eval.cli import main as eval_main

    spec = "default" + (f"+{adapter}" if adapter else "")
    t0 = time.time()
    summary = eval_main(
        {
            "compare": [f"{name}={spec}"],
            "task_file": held_out,
            "task_metric": "preference",
            "template": "chatml",
            "max_seq_length": a.max_seq_length,
            "per_device_eval_batch_size": 4,
        }
    )
    res = summary["results"][name][Path(held_out).stem]
    return {**res, "seconds": round(time.time() - t0, 1), "uptime": uptime()}


def train(a: argparse.Namespace, loss: str, work: Path) -> dict:
    from zhtune.train.dpo import REFERENCED
    from zhtune.train.dpo import main as dpo_main

    out = work / loss
    t0 = time.time()
    s = dpo_main(
        {
            "model_name_or_path": "default",
            "train_files": [str(a.pairs)],
            "held_out_pairs": 60,
            "seed": 0,
            "loss": loss,
            "template": "chatml",
            "max_seq_length": a.max_seq_length,
            "max_prompt_length": a.max_seq_length // 2,  # as zhtune eval --task_metric preference cuts
            "lora_rank": 16,
            "lora_alpha": 32,
            "learning_rate": a.lr,
            "warmup_ratio": 0.1,
            "max_steps": a.steps,
            "per_device_train_batch_size": 2,
            "logging_steps": 1,
            "save_steps": a.steps,
            "report_to": "none",
            "output_dir": str(out),
            "overwrite_output_dir": True,
            "data_cache_dir": str(work / "cache"),
            **({"precompute_ref_log_probs": True} if a.precompute_ref and loss in REFERENCED else {}),
        }
    )
    logs = [h for h in s["log_history"] if "loss" in h]
    m = s["metrics"]

    def mean(key: str, part: list[dict]) -> float | None:
        vals = [h[key] for h in part if key in h]
        return sum(vals) / len(vals) if vals else None

    half = len(logs) // 2
    return {
        "output_dir": str(out),
        "heldout_pairs": s["heldout_pairs"],
        "data": {
            k: s["data"][k] for k in ("records", "train_samples", "ok", "prompt_cut", "reply_cut", "both_cut")
        },
        "steps": len(logs),
        "seconds_per_step": round(m["train_runtime"] / max(len(logs), 1), 2),
        "wall_seconds": round(time.time() - t0, 1),
        "loss_first_last": [logs[0]["loss"], logs[-1]["loss"]],
        "train_reward_accuracy_first_half": mean("rewards/accuracies", logs[:half]),
        "train_reward_accuracy_second_half": mean("rewards/accuracies", logs[half:]),
        "train_reward_margin_last": logs[-1].get("rewards/margins"),
        "uptime": uptime(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=Path, default=PAIRS)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max_seq_length", type=int, default=256)
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument(
        "--precompute_ref", action="store_true", help="DPO: score the reference once before training"
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_dpo_cpu"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "dpo_cpu.json")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    res = json.loads(a.out.read_text()) if a.out.is_file() else {}
    res["setup"] = {
        "model": "SmolLM2-135M-Instruct (embedded default), LoRA r16 alpha 32, 2 pairs a step",
        "pairs": str(a.pairs.name),
        "held_out": "60 records, seed 0 (zhtune dpo --held_out_pairs 60)",
        "steps": a.steps,
        "learning_rate": a.lr,
        "max_seq_length": a.max_seq_length,
        "max_prompt_length": a.max_seq_length // 2,
        "threads": a.threads,
        "precompute_ref_log_probs": a.precompute_ref,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    a.work.mkdir(parents=True, exist_ok=True)
    for loss in a.losses.split(","):
        if loss not in res.get("train", {}):
            print(f"== training {loss} ({uptime()})", flush=True)
            res.setdefault("train", {})[loss] = train(a, loss, a.work)
            save(a.out, res)
        held = res["train"][loss]["heldout_pairs"]
        if "before" not in res:
            print(f"== held-out pairs, before ({uptime()})", flush=True)
            res["before"] = evaluate(a, "base", held, None)
            save(a.out, res)
        if loss not in res.get("after", {}):
            print(f"== held-out pairs, after {loss} ({uptime()})", flush=True)
            res.setdefault("after", {})[loss] = evaluate(a, loss, held, res["train"][loss]["output_dir"])
            save(a.out, res)
    print(json.dumps({k: res[k] for k in ("before", "after")}, indent=1))


if __name__ == "__main__":
    main()
