"""Quality of zhtune's GGUF quantizations on a real model, measured on a CPU.

Exports a model (default: the embedded SmolLM2-135M-Instruct, optionally with LoRA adapters merged) as
f16, q8_0 and q4_0 GGUF, loads each file back with transformers (``gguf_file=``, which dequantizes), and
scores held-out Chinese text: next-token accuracy, bits per character, and agreement with the float
model (top-1 match, KL divergence, largest logit difference).

    python bench/gguf_quality.py [--model default] [--lora_model DIR] [--samples 48] [--out bench/results/gguf_quality_cpu.json]
"""

from __future__ import annotations

import argparse
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


def held_out_texts(path: Path, n: int) -> list[str]:
    recs = json.loads(path.read_text(encoding="utf-8"))
    recs = recs[-n:]  # the tail: bench/quant_gpu.py trains on the head
    return [
        (r["instruction"] + ("\n" + r["input"] if r.get("input") else "") + "\n" + r["output"]) for r in recs
    ]


@torch.no_grad()
def score(model, tok, texts: list[str], max_len: int, ref_model=None) -> dict:
    """Accuracy and bits per character of ``model``; with ``ref_model``, agreement with it (computed side by side,
    so no logits are kept: memory stays at the two models)."""
    nll_nats = 0.0
    chars = hits = total = 0
    agree = kl = worst = 0.0
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"][:max_len]
        x = torch.tensor([ids])
        logits = model(x).logits[0].float()
        logp = torch.log_softmax(logits[:-1], -1)
        tgt = x[0, 1:]
        nll_nats += -logp.gather(1, tgt[:, None]).sum().item()
        chars += len(tok.decode(ids[1:]))
        hits += (logits[:-1].argmax(-1) == tgt).sum().item()
        total += len(tgt)
        if ref_model is not None:
            r = ref_model(x).logits[0].float()
            agree += (r.argmax(-1) == logits.argmax(-1)).float().sum().item()
            lr = torch.log_softmax(r, -1)
            kl += torch.sum(lr.exp() * (lr - torch.log_softmax(logits, -1))).item()
            worst = max(worst, (r - logits).abs().max().item())
    res = {
        "token_accuracy": hits / total,
        "bits_per_char": nll_nats / math.log(2) / chars,
        "tokens": total,
        "chars": chars,
    }
    if ref_model is not None:
        n = total + len(texts)
        res.update(top1_agreement=agree / n, kl_per_token=kl / n, max_abs_logit_diff=worst)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--lora_model", default=None)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--max_len", type=int, default=256)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "gguf_quality_cpu.json"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zhtune.export.export import main as export
    from zhtune.model.loader import resolve

    if not Path(a.data).is_file():
        sys.exit(f"held-out data {a.data} not found; pass --data with an Alpaca-format JSON file")
    src = resolve(a.model)
    texts = held_out_texts(Path(a.data), a.samples)
    with tempfile.TemporaryDirectory() as tmp:
        tok = AutoTokenizer.from_pretrained(a.lora_model or src.path)
        if a.lora_model:
            from zhtune.merge.merge import main as merge

            merge(
                {
                    "base_model": a.model,
                    "lora_model": a.lora_model,
                    "output_dir": f"{tmp}/hf",
                    "dtype": "float32",
                }
            )
            hf_dir = f"{tmp}/hf"
        else:
            hf_dir = src.path
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        results = {}
        t0 = time.time()
        results["hf_float32"] = score(hf, tok, texts, a.max_len)
        results["hf_float32"]["eval_seconds"] = round(time.time() - t0, 1)
        for quant in ("f16", "q8_0", "q4_0"):
            t0 = time.time()
            info = export(
                {
                    "model_name_or_path": hf_dir,
                    "output_dir": tmp,
                    "quant": quant,
                    "gguf_name": f"m-{quant}.gguf",
                }
            )
            export_s = time.time() - t0
            gm = AutoModelForCausalLM.from_pretrained(
                tmp, gguf_file=f"m-{quant}.gguf", dtype=torch.float32
            ).eval()
            res = score(gm, tok, texts, a.max_len, hf)
            res.update(file_mib=round(info["bytes"] / 2**20, 1), export_seconds=round(export_s, 1))
            results[f"gguf_{quant}"] = res
            del gm
    report = {
        "model": a.model + (f" + {a.lora_model}" if a.lora_model else ""),
        "data": f"{Path(a.data).name}, last {a.samples} records, up to {a.max_len} tokens each",
        "machine": f"{platform.processor() or platform.machine()}, 2 threads (CPU)",
        "note": "GGUF files are read back by transformers (dequantized to float32); the embedded default is itself "
        "a dequantized Q4_1 checkpoint, so hf_float32 is the reference each quantization is compared with.",
        "results": results,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    cols = [
        "token_accuracy",
        "bits_per_char",
        "top1_agreement",
        "kl_per_token",
        "max_abs_logit_diff",
        "file_mib",
    ]
    print(f"{'variant':<12}" + "".join(f"{c:>20}" for c in cols))
    for k, r in results.items():
        print(f"{k:<12}" + "".join(f"{r.get(c, float('nan')):>20.4f}" for c in cols))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
