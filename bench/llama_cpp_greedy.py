"""A real llama.cpp against zhtune: the embedded default model after a short SFT run, exported as GGUF.

Trains a LoRA with zhtune sft (a few steps on Chinese Alpaca data), merges it with zhtune merge,
exports f16, q8_0 and q4_0 with zhtune export --verify, and records, for a Chinese chat prompt, whether
llama.cpp (llama-cpp-python, compiled from source) tokenizes the prompt identically and continues it
greedily with the same tokens as zhtune's chat engine. Runs on a CPU in a few minutes.

    pip install 'zhtune[llamacpp]'   # compiles llama.cpp (about 20 minutes on 2 busy cores)
    python bench/llama_cpp_greedy.py [--out bench/results/llama_cpp_greedy.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "assets" / "data" / "alpaca_zh_demo.json"
PROMPTS = ["请用一句话介绍北京。", "什么是机器学习？", "写一首关于春天的短诗。"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "llama_cpp_greedy.json"))
    a = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install 'zhtune[llamacpp]'")
    import torch

    torch.set_num_threads(2)
    from zhtune.config.args import ModelArgs
    from zhtune.export.export import main as export
    from zhtune.export.verify import verify
    from zhtune.merge.merge import main as merge
    from zhtune.train.sft import main as sft

    if not Path(a.data).is_file():
        sys.exit(f"{a.data} not found: pass --data with an Alpaca-format JSON file")
    t0 = time.time()
    report: dict = {
        "machine": f"{platform.machine()} CPU, 2 threads",
        "llama_cpp_python": llama_cpp.__version__,
        "transformers": version("transformers"),
        "gguf": version("gguf"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        recs = json.loads(Path(a.data).read_text(encoding="utf-8"))[:64]
        train = Path(tmp) / "train.json"
        train.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
        s = sft(
            {
                "model_name_or_path": "default",
                "train_files": [str(train)],
                "output_dir": f"{tmp}/adapter",
                "max_steps": a.steps,
                "per_device_train_batch_size": 4,
                "learning_rate": 5e-4,
                "max_seq_length": 128,
                "logging_steps": 1,
                "save_steps": 1000,
                "report_to": ["none"],
                "data_cache_dir": f"{tmp}/cache",
            }
        )
        report["sft"] = {"steps": a.steps, "train_loss": s["metrics"].get("train_loss")}
        merge(
            {
                "base_model": "default",
                "lora_model": f"{tmp}/adapter",
                "output_dir": f"{tmp}/merged",
                "dtype": "float32",
            }
        )
        margs = ModelArgs(model_name_or_path=f"{tmp}/merged", dtype="float32", device="cpu")
        report["results"] = {}
        for quant in ("f16", "q8_0", "q4_0"):
            info = export(
                {"model_name_or_path": f"{tmp}/merged", "output_dir": f"{tmp}/gguf", "quant": quant}
            )
            runs = [verify(margs, [], info["path"], prompt=p, n=a.new_tokens) for p in PROMPTS]
            report["results"][quant] = {
                "file_mib": round(info["bytes"] / 2**20, 1),
                "prompts_tokenized_identically": sum(r["prompt_tokens_match"] for r in runs),
                "greedy_replies_identical": sum(r["match"] for r in runs),
                "of": len(runs),
                "runs": runs,
            }
            print(quant, {k: v for k, v in report["results"][quant].items() if k != "runs"}, flush=True)
    report["seconds"] = round(time.time() - t0, 1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for quant, r in report["results"].items():
        for run in r["runs"]:
            print(
                f"[{quant}] {run['prompt']}\n  zhtune:    {run['zhtune_text']!r}\n  llama.cpp: {run['llama_cpp_text']!r}"
            )
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
