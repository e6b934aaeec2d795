"""Peak GPU memory of LoRA on a 7B-shaped Llama through ``zhtune sft``: bf16 base, 8-bit base, 4-bit QLoRA.

Random-initialised LLaMA-7B shape (hidden 4096, 32 layers, vocab 32000) saved to local disk, the LLaMA-2
SentencePiece tokenizer, Chinese Alpaca samples made long enough that every sample fills --max_seq_length.
Each mode runs the real CLI in its own process (so peak memory is per mode): LoRA r8 on all seven
projections, batch 1, gradient checkpointing, bf16. Peak = torch.cuda.max_memory_allocated(), weights included.

    python bench/qlora_gpu.py --out OUT --sp_model path/to/llama2_sp32k.model --alpaca path/to/alpaca_zh_demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def build_model(d: Path, sp_model: str) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (d / "config.json").is_file():
        return
    tdir = d.parent / "llama_tok"
    tdir.mkdir(parents=True, exist_ok=True)
    import shutil

    shutil.copy(sp_model, tdir / "tokenizer.model")
    (tdir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    tok = AutoTokenizer.from_pretrained(str(tdir))
    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(d), safe_serialization=True, max_shard_size="4GB")
    tok.save_pretrained(str(d))
    del model
    torch.cuda.empty_cache()


def make_data(path: Path, alpaca: str, n: int = 64) -> None:
    recs = json.loads(Path(alpaca).read_text(encoding="utf-8"))
    texts = [r["output"] for r in recs if len(r["output"]) > 50]
    out = []
    for i in range(n):
        body = "".join(texts[(i * 7 + k) % len(texts)] for k in range(8))  # long enough to fill 512 tokens
        out.append({"instruction": recs[i]["instruction"], "input": "", "output": body})
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in out) + "\n", encoding="utf-8")


def run_mode(mode: str, model: Path, data: Path, out: Path, seq: int, steps: int, log) -> dict:
    odir = out / f"run_{mode}"
    cmd = [
        sys.executable, "-m", "zhtune", "sft",
        "--model_name_or_path", str(model), "--train_files", str(data), "--output_dir", str(odir),
        "--overwrite_output_dir", "--template", "alpaca", "--max_seq_length", str(seq),
        "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1", "--max_steps", str(steps),
        "--learning_rate", "1e-4", "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0.05",
        "--trainable", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "--gradient_checkpointing", "--bf16", "--logging_steps", "1", "--save_steps", "100000",
        "--report_to", "none", "--data_cache_dir", str(out / "cache"),
    ]  # fmt: skip
    if mode == "int4":
        cmd.append("--load_in_4bit")
    elif mode == "int8":
        cmd.append("--load_in_8bit")
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    log.write(f"==== {mode}: rc {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}\n")
    log.flush()
    res = {"mode": mode, "rc": r.returncode, "wall_s": round(time.time() - t0, 1)}
    if r.returncode == 0:
        tr = json.loads((odir / "train_results.json").read_text())
        hist = json.loads((odir / "log_history.json").read_text())
        losses = [h["loss"] for h in hist if "loss" in h]
        res.update(
            peak_mem_gib=tr["metrics"].get("peak_mem_gib"),
            train_runtime_s=tr["metrics"].get("train_runtime"),
            losses=losses,
            tokens_per_step=seq,
            samples=tr["data"]["train_samples"],
            truncated=tr["data"]["response_truncated"],
        )
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sp_model", required=True)
    ap.add_argument("--alpaca", required=True)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--modes", default="int4,int8,bf16")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    work = Path(os.environ.get("BENCH_WORK", "/tmp/zhtune_bench"))
    model = work / "llama7b"
    t0 = time.time()
    build_model(model, a.sp_model)
    print(f"7B model ready in {time.time() - t0:.0f}s", flush=True)
    data = work / "long_alpaca.jsonl"
    make_data(data, a.alpaca)
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "seq": a.seq, "runs": []}
    with open(out / "qlora_log.txt", "w") as log:
        for mode in a.modes.split(","):
            res = run_mode(mode, model, data, out, a.seq, a.steps, log)
            print(json.dumps(res), flush=True)
            results["runs"].append(res)
    (out / "qlora.json").write_text(json.dumps(results, indent=2))
    print(f"{'mode':<6} {'peak GiB':>9} {'s/step':>7}  losses")
    for r in results["runs"]:
        if r["rc"] == 0:
            print(
                f"{r['mode']:<6} {r['peak_mem_gib']:>9} {r['train_runtime_s'] / a.steps:>7.2f}  {[round(x, 3) for x in r['losses']]}"
            )
        else:
            print(f"{r['mode']:<6} failed (rc {r['rc']}), see qlora_log.txt")


if __name__ == "__main__":
    main()
