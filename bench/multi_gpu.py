"""Several GPUs of one host: DDP scaling and loss parity at 7B, FSDP (LoRA and full) with save and resume.

1. scaling  7B LoRA (r8, all seven projections), seq 2048, micro-batch 2 per GPU, zhtune's training path
            (ZhTrainer, DDP through torchrun). One GPU with 2 accumulation steps against two GPUs with one:
            the same global batch of 4 rows, the same rows in the same order, the same initial weights, so the
            losses must agree (bf16 rounding aside). Scaling efficiency = tokens/s on 2 GPUs / (2 x tokens/s
            on 1 GPU). 3 warm-up steps, then 8 steps timed as one window.
2. fsdp     ``zhtune sft --nproc_per_node 2 --fsdp "full_shard auto_wrap"`` on a small random LLaMA saved to
            disk: LoRA for 4 steps with a checkpoint at step 2; then the same run resumed from checkpoint-2
            (its losses for steps 3-4 must match the uninterrupted run); then full fine-tuning for 2 steps,
            whose saved model must load with plain transformers.
3. compiled (optional, one GPU) bench/train_speed.py's zhtune side for the packed real-length SFT case and the
            49,953-vocabulary case with zhtune's defaults, to check regional compilation there.

    python bench/multi_gpu.py --out DIR --sp_model llama2_sp32k.model --data alpaca_zh_demo.json[,more.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WARMUP, ITERS, SEQ, MICRO = 3, 8, 2048, 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# ----------------------------------------------------------------------------------------------- worker


def scaling_worker(a: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

    from zhtune.train.args import build_training_arguments
    from zhtune.train.setup import prepare_for_training
    from zhtune.train.sft import SftConfig
    from zhtune.train.trainer import ZhTrainer

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    dev = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    small = a.small
    cfg = LlamaConfig(
        hidden_size=256 if small else 4096, num_hidden_layers=2 if small else 32, num_attention_heads=4 if small else 32,
        num_key_value_heads=4 if small else 32, intermediate_size=512 if small else 11008, vocab_size=32000,
        max_position_embeddings=4096, use_cache=False, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    steps = WARMUP + ITERS
    rows_needed = steps * MICRO * a.ga * world
    g = torch.Generator().manual_seed(1)
    seq = 64 if small else SEQ
    ids = torch.randint(3, 32000, (rows_needed, seq), generator=g).tolist()
    ds = [{"input_ids": r, "labels": r} for r in ids]
    flat = {
        "output_dir": tempfile.mkdtemp(prefix="zhtune_scaling_"), "per_device_train_batch_size": MICRO,
        "gradient_accumulation_steps": a.ga, "max_steps": steps, "logging_steps": 1, "save_steps": 10**6,
        "learning_rate": 1e-4, "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "weight_decay": 0.0,
        "max_grad_norm": 0.0, "report_to": "none", "bf16": True, "lora_rank": 8, "lora_alpha": 32,
        "lora_dropout": 0.0, "trainable": TARGETS, "seed": 42, "gradient_checkpointing": False,
        "train_sampling_strategy": "sequential", "disable_tqdm": True, "compile_layers": False,
    }  # fmt: skip
    zc = SftConfig.of(flat)
    model = prepare_for_training(model, zc.model, zc.lora, zc.train, device=dev)
    args = build_training_arguments(zc.train, has_eval=False, device=dev)

    class Clock(TrainerCallback):
        t0 = t1 = 0.0

        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            if state.global_step == WARMUP and not self.t0:
                sync()
                self.t0 = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):  # noqa: ANN001
            sync()
            self.t1 = time.perf_counter()

    from zhtune.train.packing import PackingCollator

    clock = Clock()
    trainer = ZhTrainer(model=model, args=args, train_dataset=ds, data_collator=PackingCollator(seq),
                        callbacks=[clock], zh_config=zc)  # fmt: skip
    trainer.train()
    if rank == 0:
        tokens = ITERS * MICRO * a.ga * world * seq
        res = {
            "gpus": world, "grad_accum": a.ga, "micro_batch": MICRO, "global_rows": MICRO * a.ga * world,
            "tokens_per_s": round(tokens / (clock.t1 - clock.t0), 1),
            "ms_per_step": round(1e3 * (clock.t1 - clock.t0) / ITERS, 1),
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else 0,
            "speed": trainer.speed.summary(), "gpu": torch.cuda.get_device_name(local) if cuda else "cpu",
        }  # fmt: skip
        Path(a.result).write_text(json.dumps(res, indent=2))


# ----------------------------------------------------------------------------------------------- driver


def run(cmd: list[str], logf, timeout: float, env: dict | None = None) -> int:
    log("$", " ".join(cmd))
    t0 = time.time()
    try:
        r = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, timeout=timeout, env=env)
        rc = r.returncode
    except subprocess.TimeoutExpired:
        rc = -9
    log(f"rc {rc} in {time.time() - t0:.0f}s")
    return rc


def scaling(a, out: Path, logf) -> dict:
    res = {}
    for n, ga in ((1, 2), (2, 1)):
        path = out / f"scaling_{n}gpu.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
               "--worker", "scaling", "--ga", str(ga), "--result", str(path)] + (["--small"] if a.small else [])  # fmt: skip
        rc = run(cmd, logf, 240, env={**os.environ, "OMP_NUM_THREADS": "1"})  # what torchrun sets for N > 1
        res[f"{n}gpu"] = json.loads(path.read_text()) if path.exists() else {"rc": rc}
    one, two = res["1gpu"], res["2gpu"]
    if "tokens_per_s" in one and "tokens_per_s" in two:
        res["scaling_efficiency"] = round(two["tokens_per_s"] / (2 * one["tokens_per_s"]), 3)
        diffs = [abs(x - y) / abs(y) for x, y in zip(two["losses"], one["losses"])]
        res["max_rel_loss_diff"] = max(diffs) if diffs else None
    return res


def small_model(work: Path, sp_model: str) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = work / "small_llama"
    if (d / "config.json").is_file():
        return d
    tdir = work / "tok"
    tdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(sp_model, tdir / "tokenizer.model")
    (tdir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    tok = AutoTokenizer.from_pretrained(str(tdir))
    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


def losses_of(d: Path) -> list[float]:
    p = d / "log_history.json"
    return [h["loss"] for h in json.loads(p.read_text()) if "loss" in h] if p.exists() else []


def fsdp(a, out: Path, logf) -> dict:
    work = Path(tempfile.mkdtemp(prefix="zhtune_fsdp_"))
    model = small_model(work, a.sp_model)
    base = [sys.executable, "-m", "zhtune", "sft", "--nproc_per_node", "2", "--fsdp", "full_shard auto_wrap",
            "--model_name_or_path", str(model), "--train_files", a.data.split(",")[0], "--template", "alpaca",
            "--max_seq_length", "256", "--per_device_train_batch_size", "4", "--logging_steps", "1",
            "--learning_rate", "1e-4", "--lora_dropout", "0", "--report_to", "none", "--warmup_ratio", "0",
            "--data_cache_dir", str(work / "cache"), "--max_train_samples", "64", "--seed", "3"]  # fmt: skip
    res: dict = {}
    a1 = work / "lora"
    res["lora_rc"] = run(base + ["--output_dir", str(a1), "--max_steps", "4", "--save_steps", "2"], logf, 150)
    res["lora_losses"] = losses_of(a1)
    res["lora_files"] = sorted(p.name for p in a1.iterdir()) if a1.exists() else []
    res["lora_checkpoint2"] = sorted(p.name for p in (a1 / "checkpoint-2").iterdir()) if (a1 / "checkpoint-2").exists() else []  # fmt: skip
    if (a1 / "checkpoint-2").is_dir():
        a2 = work / "lora_resumed"
        a2.mkdir()
        shutil.copytree(a1 / "checkpoint-2", a2 / "checkpoint-2")
        res["resume_rc"] = run(base + ["--output_dir", str(a2), "--max_steps", "4", "--save_steps", "2",
                                       "--resume_from_checkpoint", "true"], logf, 150)  # fmt: skip
        res["resumed_losses"] = losses_of(a2)
        straight, resumed = res["lora_losses"], res["resumed_losses"]
        res["resume_matches"] = bool(straight and resumed) and all(
            abs(x - y) <= 1e-3 * abs(y) for x, y in zip(resumed[2:], straight[2:])
        )
    f1 = work / "full"
    res["full_rc"] = run(base + ["--output_dir", str(f1), "--max_steps", "2", "--save_steps", "2",
                                 "--finetuning_type", "full"], logf, 150)  # fmt: skip
    res["full_losses"] = losses_of(f1)
    try:
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(str(f1))
        res["full_loads"] = sum(p.numel() for p in m.parameters())
    except Exception as e:  # noqa: BLE001 - recorded
        res["full_loads"] = f"{type(e).__name__}: {e}"[:300]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--sp_model")
    ap.add_argument("--data")
    ap.add_argument("--parts", default="scaling,fsdp,compiled")
    ap.add_argument("--small", action="store_true", help="a 2-layer model for the scaling part (logic check)")
    ap.add_argument("--worker", default="")
    ap.add_argument("--ga", type=int, default=1)
    ap.add_argument("--result", default="")
    a = ap.parse_args()
    if a.worker == "scaling":
        scaling_worker(a)
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"started": time.strftime("%F %T")}
    with open(out / "multi_gpu_log.txt", "w") as logf:
        for part in a.parts.split(","):
            t0 = time.time()
            if part == "scaling":
                result["scaling"] = scaling(a, out, logf)
            elif part == "fsdp":
                result["fsdp"] = fsdp(a, out, logf)
            elif part == "compiled":
                cmd = [sys.executable, str(HERE / "train_speed.py"), "--out", str(out / "compiled"), "--side",
                       "zhtune", "--label", "compiled", "--sp_model", a.sp_model, "--data", a.data,
                       "--cases", "7b_sft_real,7b_v49953", "--variants", "[{}]", "--peak", "0"]  # fmt: skip
                env_rc = run(cmd, logf, 200)
                p = out / "compiled" / "compiled.json"
                result["compiled"] = json.loads(p.read_text()) if p.exists() else {"rc": env_rc}
            result[f"{part}_wall_s"] = round(time.time() - t0, 1)
            (out / "multi_gpu.json").write_text(json.dumps(result, indent=2))
            log(part, json.dumps(result[part])[:1500])
    s = result.get("scaling", {})
    if "scaling_efficiency" in s:
        print(f"2-GPU scaling efficiency (7B LoRA, seq 2048): {s['scaling_efficiency']} "
              f"({s['2gpu']['tokens_per_s']} vs 2 x {s['1gpu']['tokens_per_s']} tok/s); "
              f"max relative loss difference {s['max_rel_loss_diff']:.2e}")  # fmt: skip
    f = result.get("fsdp", {})
    if f:
        print(f"FSDP LoRA rc {f.get('lora_rc')}, resume rc {f.get('resume_rc')} matches {f.get('resume_matches')}, "
              f"full rc {f.get('full_rc')} loads {f.get('full_loads')}")  # fmt: skip


if __name__ == "__main__":
    main()
