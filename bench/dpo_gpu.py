"""DPO of a 7B-shaped Llama on one GPU, seq 1024: ``zhtune dpo`` against TRL's own DPOTrainer with plain peft.

Both sides in the same run, each case in a process of its own (so peak memory is that case's alone), on the same
random-initialised LLaMA-2-7B shape (hidden 4096, 32 layers, 32 heads, intermediate 11008; vocabulary of a
byte-level BPE trained here on the synthetic text, about 32,000) saved to local disk in bf16, and the same
pairs: a prompt of 300 random Han characters, two replies of 1,200. Every sequence is 1024 tokens on both sides
(zhtune: the prompt keeps its last 256 tokens, replies are cut to the rest; TRL: prompt + reply cut at 1024).

Cases (``--cases``): ``lora`` (bf16 base) and ``qlora`` (4-bit NF4 base with double quantization, bitsandbytes),
each as ``zhtune`` (the real ``zhtune dpo`` code path: train.dpo.build, then the run's fit) and ``trl``
(AutoModelForCausalLM + DPOTrainer(peft_config=LoraConfig), TRL tokenizing the text itself). Both: LoRA r8,
alpha 16, dropout 0, on all seven projections; beta 0.1, sigmoid loss, reference = the adapter disabled;
batch 2 pairs (4 sequences), gradient checkpointing, bf16, constant lr 5e-5, no clipping.

Timing: a callback synchronizes CUDA at each step's start and end; tokens/s = real tokens of the step's batch
(4 x 1024) / the median step time after ``--warmup`` steps. Peak memory: torch.cuda.max_memory_allocated()
over training (weights included), and over loading.

Needs trl, bitsandbytes and datasets (+ dill, multiprocess) besides the GPU image's torch/transformers/peft:

    python3 bench/dpo_gpu.py --out $OUT --steps 8 --warmup 3

Writes $OUT/dpo_gpu.json and prints a table; about 4 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEQ, PROMPT_TOKENS = 1024, 256
LORA = {
    "r": 8,
    "alpha": 16,
    "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def han_text(rng: random.Random, n: int) -> str:
    return "".join(chr(rng.randint(0x4E00, 0x4E00 + 2999)) for _ in range(n))


SHAPE_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32}  # fmt: skip
SHAPE_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 4}  # --tiny: a CPU check of this script, no GPU  # fmt: skip


def make_assets(work: Path, n_pairs: int = 64, tiny: bool = False) -> tuple[Path, Path]:
    """The tokenizer, the 7B-shaped model directory and the pairs file (built once)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    model_dir, pairs = work / "llama7b", work / "pairs.jsonl"
    if (model_dir / "config.json").is_file() and pairs.is_file():
        return model_dir, pairs
    rng = random.Random(0)
    recs = [{"prompt": han_text(rng, 300), "chosen": han_text(rng, 1200), "rejected": han_text(rng, 1200)}
            for _ in range(n_pairs)]  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    pairs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    corpus = [han_text(rng, 2000) for _ in range(100 if tiny else 1500)]
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=32000, special_tokens=specials, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")  # fmt: skip
    cfg = LlamaConfig(
        vocab_size=len(tok), **(SHAPE_TINY if tiny else SHAPE_7B), max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(model_dir), max_shard_size="4GB")
    tok.save_pretrained(str(model_dir))
    return model_dir, pairs


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0.0


def timer_callback():  # noqa: ANN201
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            sync()
            self.times.append(time.perf_counter() - self.t0)

    return StepTimer()


def zhtune_trainer(model_dir: Path, pairs: Path, work: Path, qlora: bool, steps: int):  # noqa: ANN201
    from zhtune.train.dpo import build

    run = build(
        {
            "model_name_or_path": str(model_dir), "train_files": [str(pairs)], "template": "chatml",
            "max_seq_length": SEQ, "max_prompt_length": PROMPT_TOKENS, "output_dir": str(work / "out-zhtune"),
            "overwrite_output_dir": True, "data_cache_dir": str(work / "cache"), "load_in_4bit": qlora,
            "lora_rank": LORA["r"], "lora_alpha": LORA["alpha"], "lora_dropout": 0.0, "trainable": LORA["targets"],
            "per_device_train_batch_size": 2, "gradient_checkpointing": True, "bf16": True, "max_steps": steps,
            "learning_rate": 5e-5, "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "max_grad_norm": 0.0,
            "logging_steps": 1, "save_steps": 10_000, "report_to": "none", "seed": 0,
        }
    )  # fmt: skip
    return run.trainer, lambda: run.ctx.fit(run.trainer)


def trl_trainer(model_dir: Path, pairs: Path, work: Path, qlora: bool, steps: int):  # noqa: ANN201
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    quant = None
    if qlora:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    device = {"": 0} if torch.cuda.is_available() else None
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16, quantization_config=quant,
                                                 device_map=device)  # fmt: skip
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    args = DPOConfig(
        output_dir=str(work / "out-trl"), max_length=SEQ, per_device_train_batch_size=2, gradient_checkpointing=True,
        bf16=True, max_steps=steps, learning_rate=5e-5, lr_scheduler_type="constant", max_grad_norm=0.0,
        logging_steps=1, save_strategy="no", report_to="none", seed=0, beta=0.1, loss_type=["sigmoid"],
        use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=LORA["targets"],
                      task_type="CAUSAL_LM")  # fmt: skip
    ds = load_dataset("json", data_files=str(pairs), split="train")
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)
    return trainer, trainer.train


def child(side: str, mode: str, a: argparse.Namespace) -> dict:
    import torch

    model_dir, pairs = make_assets(a.work, tiny=a.tiny)
    build = zhtune_trainer if side == "zhtune" else trl_trainer
    trainer, fit = build(model_dir, pairs, a.work, mode == "qlora", a.steps)
    load_peak = peak_gib()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    timer = timer_callback()
    trainer.add_callback(timer)
    ds = trainer.train_dataset
    lengths = [min(len(p) + len(c), SEQ) + min(len(p) + len(r), SEQ)
               for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]  # fmt: skip
    fit()
    step_s = statistics.median(timer.times[a.warmup :])
    tokens = 2 * statistics.mean(lengths)  # 2 pairs a step
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "side": side, "mode": mode, "tokens_per_step": tokens, "median_step_s": round(step_s, 4),
        "tokens_per_s": round(tokens / step_s, 1), "peak_gib": peak_gib(), "load_peak_gib": load_peak,
        "step_times": [round(t, 4) for t in timer.times], "losses": losses, "first_loss": losses[0] if losses else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    ap.add_argument("--work", type=Path, default=Path("/tmp/zhtune_dpo_gpu"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cases", default="lora,qlora")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--tiny", action="store_true", help="a 2-layer model on the CPU: checks this script, measures nothing"
    )
    a = ap.parse_args()
    if a.child:
        side, mode = a.child.split(":")
        print("RESULT " + json.dumps(child(side, mode, a)), flush=True)
        return
    t0 = time.time()
    make_assets(a.work, tiny=a.tiny)
    print(f"assets ready in {time.time() - t0:.0f}s", flush=True)
    results: list[dict] = []
    a.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every case, so a run stopped at its time limit keeps what it measured
        out = {"setup": __doc__, "seconds": round(time.time() - t0, 1), "results": results}
        (a.out / "dpo_gpu.json").write_text(json.dumps(out, indent=1), encoding="utf-8")

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    for mode in a.cases.split(","):
        for side in ("trl", "zhtune"):
            cmd = [sys.executable, __file__, "--child", f"{side}:{mode}", "--work", str(a.work),
                   "--steps", str(a.steps), "--warmup", str(a.warmup)] + (["--tiny"] if a.tiny else [])  # fmt: skip
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if r.returncode or line is None:
                results.append({"side": side, "mode": mode, "error": r.stderr[-3000:]})
                print(f"{side}:{mode} failed:\n{r.stderr[-3000:]}", flush=True)
                save()
                continue
            results.append(json.loads(line[len("RESULT ") :]))
            res = results[-1]
            print(f"{mode:6} {side:7} {res['tokens_per_s']:>9,.0f} tok/s  peak {res['peak_gib']:.2f} GiB  "
                  f"(load {res['load_peak_gib']:.2f})  first loss {res['first_loss']}", flush=True)  # fmt: skip
            save()
    save()
    print(f"wrote {a.out / 'dpo_gpu.json'} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
