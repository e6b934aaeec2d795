"""Settings for the CPU demo recipe, tried on a GPU in float32 with the quick variant's step budgets.

The quick variant of ``configs/demo-zh/pipeline.yaml`` must fit in about 15 minutes on 2 CPU cores, which
fixes its step counts; this script tries learning rates and vocabulary sizes within those counts. Each
setting runs the quick pipeline in float32 (as on a CPU: no bf16, same batches and steps) in one run
directory, so stages whose inputs did not change are reused, and evaluates the base model, the stage-2
pre-trained model and the merged SFT model on the quick variant's held-out data (news bits per character,
review sentiment accuracy, NER F1). Figures go to ``--out`` as JSON after every setting.

    python bench/demo_recipe_sweep.py --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf --out results.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FP32 = {"dtype": "float32", "bf16": False}
# name -> per-stage overrides on top of the quick variant; ordered so that later settings reuse stages
SETTINGS: list[tuple[str, dict]] = [
    ("shipped", {}),
    ("sft_lr3e-4", {"sft": {"learning_rate": 3e-4}}),
    ("pt_lr_up", {"pt1": {"learning_rate": 2e-3}, "pt2": {"learning_rate": 1e-3}}),
    (
        "pt_lr_up+sft_lr3e-4",
        {"pt1": {"learning_rate": 2e-3}, "pt2": {"learning_rate": 1e-3}, "sft": {"learning_rate": 3e-4}},
    ),
    (
        "vocab4k+pt_lr_up",
        {
            "tokenizer": {"max_new_tokens": 4000},
            "pt1": {"learning_rate": 2e-3},
            "pt2": {"learning_rate": 1e-3},
        },
    ),
    (
        "vocab4k+pt_lr_up+sft_lr3e-4",
        {
            "tokenizer": {"max_new_tokens": 4000},
            "pt1": {"learning_rate": 2e-3},
            "pt2": {"learning_rate": 1e-3},
            "sft": {"learning_rate": 3e-4},
        },
    ),
    # without the vocabulary: LoRA + embeddings pre-training on the base tokenizer, then SFT; and SFT alone
    ("no_vocab+pt_lr_up", {"drop": ["vocab", "tokenizer", "pt1"], "pt2": {"learning_rate": 1e-3}}),
    ("no_vocab_no_pt", {"drop": ["vocab", "tokenizer", "pt1", "pt2"], "models": ["merged"]}),
    # the extended vocabulary with its embeddings also trained during SFT
    (
        "pt_lr_up+sft_embeddings",
        {
            "pt1": {"learning_rate": 2e-3},
            "pt2": {"learning_rate": 1e-3},
            "sft": {"modules_to_save": ["embed_tokens"]},
        },
    ),
    (
        "pt_lr_up2+sft_embeddings",
        {
            "pt1": {"learning_rate": 5e-3},
            "pt2": {"learning_rate": 2e-3},
            "sft": {"modules_to_save": ["embed_tokens"]},
        },
    ),
    (
        "pt_lr_up+sft_embeddings_lr2e-3",
        {
            "pt1": {"learning_rate": 2e-3},
            "pt2": {"learning_rate": 1e-3},
            "sft": {"modules_to_save": ["embed_tokens"], "learning_rate": 2e-3},
        },
    ),
]


def summarize(state: dict) -> dict:
    ev = state["stages"]["eval"]["result"]["results"]
    return {
        m: {
            "news_bpc": t["news"]["bpc"],
            "sentiment": t["sentiment"]["accuracy"],
            "sentiment_per_label": t["sentiment"]["per_label"],
            "ner_f1": t["ner"].get("f1"),
        }
        for m, t in ev.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "demo_recipe_sweep.json"))
    ap.add_argument("--only", default=None, help="comma-separated setting names")
    ap.add_argument("--run_dir", default="runs/demo-zh-sweep")
    ap.add_argument("--dry_run", action="store_true", help="check every setting's stages, run nothing")
    a = ap.parse_args()

    import torch
    import yaml

    from zhtune.pipeline.run import main as pipeline

    recipe = yaml.safe_load((REPO / "configs" / "demo-zh" / "pipeline.yaml").read_text(encoding="utf-8"))
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU")
    results.setdefault("settings", {})
    wanted = set(a.only.split(",")) if a.only else None
    for name, over in SETTINGS:
        if (wanted and name not in wanted) or name in results["settings"]:
            continue
        r = copy.deepcopy(recipe)
        quick = r["variants"]["quick"]
        quick["run_dir"] = a.run_dir + ("-" + name if "drop" in over else "")
        st = quick.setdefault("stages", {})
        for s in ("pt1", "pt2", "sft"):
            st[s] = {**st.get(s, {}), **FP32}
        st["eval"] = {
            **st.get("eval", {}),
            "dtype": "float32",
            "models": ["pt2", "merged"],
            "tasks": [
                {"name": "news", "text_files": ["${data.news_heldout}"], "max_documents": 100},
                {"name": "sentiment", "task_file": "${data.sentiment_heldout}", "task_metric": "labels"},
                {
                    "name": "ner",
                    "task_file": "${data.ner_heldout}",
                    "task_metric": "f1",
                    "max_new_tokens": 40,
                },
            ],
        }
        over = dict(over)
        drop = set(over.pop("drop", [])) | {"gguf"}  # the export is not needed to compare settings
        st["eval"]["models"] = over.pop("models", st["eval"]["models"])
        r["stages"] = [s for s in r["stages"] if s["name"] not in drop]
        for k in drop:
            st.pop(k, None)
        for sname, o in over.items():
            st[sname] = {**st.get(sname, {}), **o}
        t0 = time.time()
        cfg = {**r, "model_name_or_path": a.model, "variant": "quick", "dry_run": a.dry_run}
        state = pipeline({"pipeline": cfg})
        if a.dry_run:
            continue
        results["settings"][name] = {
            "overrides": over,
            "seconds": round(time.time() - t0, 1),
            "models": summarize(state),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, ensure_ascii=False, indent=2), encoding="utf-8")
        m = results["settings"][name]["models"]
        print(
            f"## {name}: "
            + "  ".join(
                f"{k} bpc {v['news_bpc']:.3f} sent {100 * v['sentiment']:.1f}% ner {100 * (v['ner_f1'] or 0):.1f}%"
                for k, v in m.items()
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
