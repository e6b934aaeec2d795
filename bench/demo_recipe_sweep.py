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


# Round 2: the quick variant above needs about 26 minutes of 2-core CPU time; these settings cut its training
# to about 60% of that (fewer stage-1 steps or none, fewer SFT steps) to find what keeps the most quality.
# (Results: bench/results/demo_recipe_sweep2_h100.json. With 120 SFT steps every setting stayed near chance.)
SETTINGS_R2: list[tuple[str, dict]] = [
    ("r2_pt1_10+pt2_30+sft_120", {"pt1": {"max_steps": 10, "save_steps": 10}, "sft": {"max_steps": 120}}),
    ("r2_pt1_0+pt2_40+sft_120", {"drop": ["pt1"], "pt2": {"max_steps": 40}, "sft": {"max_steps": 120}}),
    (
        "r2_pt1_0+pt2_40_lr3e-3+sft_120",
        {"drop": ["pt1"], "pt2": {"max_steps": 40, "learning_rate": 3e-3}, "sft": {"max_steps": 120}},
    ),
    (
        "r2_pt1_0+pt2_40+sft_120_lr5e-4",
        {"drop": ["pt1"], "pt2": {"max_steps": 40}, "sft": {"max_steps": 120, "learning_rate": 5e-4}},
    ),
]


# Round 3: the quick variant as shipped now (sentiment only, 200 SFT steps): is stage 1 worth its time?
SETTINGS_R3: list[tuple[str, dict]] = [
    ("r3_pt1_30+pt2_30", {}),
    ("r3_pt1_0+pt2_40", {"drop": ["pt1"], "pt2": {"max_steps": 40}}),
    ("r3_pt1_0+pt2_30", {"drop": ["pt1"], "pt2": {"max_steps": 30}}),
    ("r3_pt1_15+pt2_30", {"pt1": {"max_steps": 15}}),
    ("r3_pt1_0+pt2_40+sft_160", {"drop": ["pt1"], "pt2": {"max_steps": 40}, "sft": {"max_steps": 160}}),
    (
        "r3_pt1_0+pt2_40+sft_lr2e-3",
        {"drop": ["pt1"], "pt2": {"max_steps": 40}, "sft": {"learning_rate": 2e-3}},
    ),
]
# Round 4: SFT on sentiment alone makes the merged model's news bits per character 2.5x the base's (round 3);
# replaying news during SFT (continuation samples), or the NER task's news sentences, may prevent that.
NO_PT1 = {"drop": ["pt1"], "pt2": {"max_steps": 40}}
SETTINGS_R4: list[tuple[str, dict]] = [
    ("r4_pt1_0+cont300", {**NO_PT1, "data": {"continuation_train": 300}}),
    ("r4_pt1_0+cont600", {**NO_PT1, "data": {"continuation_train": 600}}),
    ("r4_pt1_0+ner300", {**NO_PT1, "data": {"ner_train": 300}}),
    ("r4_pt1_30+cont300", {"data": {"continuation_train": 300}}),
]
# Round 5: 300 continuation samples kept news (merged bits/char 5.92) but sentiment fell to 62.5%: fewer of
# them, or a higher SFT rate.
SETTINGS_R5: list[tuple[str, dict]] = [
    ("r5_pt1_0+cont150", {**NO_PT1, "data": {"continuation_train": 150}}),
    (
        "r5_pt1_0+cont150+sft_lr2e-3",
        {**NO_PT1, "data": {"continuation_train": 150}, "sft": {"learning_rate": 2e-3}},
    ),
    (
        "r5_pt1_0+cont300+sft_lr2e-3",
        {**NO_PT1, "data": {"continuation_train": 300}, "sft": {"learning_rate": 2e-3}},
    ),
    (
        "r5_pt1_0+cont300+sft_r32",
        {**NO_PT1, "data": {"continuation_train": 300}, "sft": {"lora_rank": 32, "lora_alpha": 64}},
    ),
]
ROUNDS = {1: SETTINGS, 2: SETTINGS_R2, 3: SETTINGS_R3, 4: SETTINGS_R4, 5: SETTINGS_R5}


def summarize(state: dict) -> dict:
    ev = state["stages"]["eval"]["result"]["results"]
    return {
        m: {
            "news_bpc": t["news"]["bpc"],
            "sentiment": t["sentiment"]["accuracy"],
            "sentiment_per_label": t["sentiment"]["per_label"],
            "ner_f1": t.get("ner", {}).get("f1"),
        }
        for m, t in ev.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "demo_recipe_sweep.json"))
    ap.add_argument("--only", default=None, help="comma-separated setting names")
    ap.add_argument("--run_dir", default="runs/demo-zh-sweep")
    ap.add_argument("--round", type=int, default=1, choices=tuple(ROUNDS), help="which list of settings")
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
    for name, over in ROUNDS[a.round]:
        if (wanted and name not in wanted) or name in results["settings"]:
            continue
        r = copy.deepcopy(recipe)
        quick = r["variants"]["quick"]
        # one run directory per set of dropped stages, so settings that share stages reuse them
        quick["run_dir"] = a.run_dir + "".join("-no-" + d for d in sorted(over.get("drop", [])))
        st = quick.setdefault("stages", {})
        for s in ("pt1", "pt2", "sft"):
            st[s] = {**st.get(s, {}), **FP32}
        st["eval"] = {**st.get("eval", {}), "dtype": "float32", "models": ["pt2", "merged"]}
        if a.round < 3:  # rounds 1 and 2 ran before the quick variant dropped NER: its earlier tasks
            st["data"] = {**st["data"], "ner_train": 300, "ner_eval": 20}
            st["eval"]["tasks"] = [
                {"name": "news", "text_files": ["${data.news_heldout}"], "max_documents": 100},
                {"name": "sentiment", "task_file": "${data.sentiment_heldout}", "task_metric": "labels"},
                {
                    "name": "ner",
                    "task_file": "${data.ner_heldout}",
                    "task_metric": "f1",
                    "max_new_tokens": 40,
                },
            ]
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
