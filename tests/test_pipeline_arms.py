"""zhtune pipeline --compare: a recipe's arms run side by side on the same data and eval, one report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from zhtune.cli import main as zhtune
from zhtune.config.parse import build
from zhtune.errors import ConfigError
from zhtune.pipeline import recipe as recipe_mod
from zhtune.pipeline.compare import arm_summary, combined

pytest.importorskip("snownlp")

TRAIN = {"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1, "save_steps": 2}


def arms_recipe(tmp_path: Path, model: Path) -> dict:
    """data -> vocab -> tokenizer -> pt -> sft -> merged -> eval; arms: plain (no vocab, no pt), pt (no vocab),
    full (everything)."""
    return {
        "run_dir": str(tmp_path / "run"),
        "model_name_or_path": str(model),
        "stages": [
            {"name": "data", "command": "demo_data", "with": {"sentiment_train": 16, "sentiment_eval": 6,
                                                               "ner_train": 0, "ner_eval": 0}},
            {"name": "vocab", "command": "vocab_train",
             "with": {"input": ["${data.news_train}"], "vocab_size": 900, "max_lines": 2000}},
            {"name": "tokenizer", "command": "vocab_merge", "with": {"max_new_tokens": 100}},
            {"name": "pt", "command": "pt",
             "with": {"stage": "lora", "modules_to_save": ["embed_tokens", "lm_head"], "block_size": 32,
                      "train_files": ["${data.news_heldout}"], "max_train_samples": 8, **TRAIN}},
            {"name": "sft", "command": "sft",
             "with": {"train_files": ["${data.sft_train}"], "max_seq_length": 96, "lora_rank": 4, **TRAIN}},
            {"name": "merged", "command": "merge"},
            {"name": "eval", "command": "eval",
             "with": {"models": ["pt", "merged"], "max_seq_length": 128,
                      "tasks": [{"name": "news", "text_files": ["${data.news_heldout}"], "max_documents": 3},
                                {"name": "sentiment", "task_file": "${data.sentiment_heldout}"}]}},
        ],
        "arms": {
            "plain": {"skip": ["vocab", "tokenizer", "pt"], "about": "SFT on the base",
                      "stages": {"sft": {"max_steps": 1}}},
            "pt": {"skip": ["vocab", "tokenizer"]},
            "full": {"about": "vocabulary + PT + SFT"},
        },
    }  # fmt: skip


def test_arms_are_checked_before_anything_runs(tmp_path, tiny_llama_bpe):
    cfg = arms_recipe(tmp_path, tiny_llama_bpe)
    a = build(recipe_mod.SECTIONS, {**cfg, "compare": ["all"]}).pipeline
    assert [(n, s) for n, s, _ in a.arm_runs] == [("plain", None), ("pt", None), ("full", None)]
    plain = {n: arm for n, _, arm in a.arm_runs}["plain"]
    assert [s.name for s in plain.specs] == ["data", "sft", "merged", "eval"]
    assert plain.run_dir == str(tmp_path / "run" / "arms" / "plain")
    eval_opts = plain.specs[-1].options
    assert eval_opts["models"] == ["merged"]  # the skipped pt left eval's models
    assert (
        plain.specs[1].options["max_steps"] == 1
        and {n: arm for n, _, arm in a.arm_runs}["full"].specs[4].options["max_steps"] == 2
    )
    for bad, msg in [
        ({"compare": ["nope"]}, "no such arm"),
        ({"compare": ["plain"], "arms": {"plain": {"skip": ["ptt"]}}}, "arms.plain.skip"),
        ({"compare": ["plain"], "arms": {"plain": {"stages": {"sft": {"max_stepz": 3}}}}}, "max_stepz"),
        ({"compare": ["plain"], "arms": {"plain": {"skipp": []}}}, "unknown keys"),
        ({"compare": ["all"], "arms": {}}, "no arms"),
        ({"compare": ["all"], "rerun": ["nope"]}, "--rerun nope"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            build(recipe_mod.SECTIONS, {**cfg, **bad})


def test_a_variant_that_skips_a_stage_leaves_arms_that_name_it_valid(tmp_path, tiny_llama_bpe):
    cfg = arms_recipe(tmp_path, tiny_llama_bpe)
    cfg["variants"] = {"short": {"skip": ["pt"], "stages": {"sft": {"max_steps": 4}}}}
    cfg["arms"]["pt"]["stages"] = {"pt": {"max_steps": 5}}
    a = build(recipe_mod.SECTIONS, {**cfg, "compare": ["all"], "variant": "short"}).pipeline
    arms = {n: arm for n, _, arm in a.arm_runs}
    assert [s.name for s in arms["pt"].specs] == ["data", "sft", "merged", "eval"]
    assert arms["full"].specs[3].options["max_steps"] == 4  # the variant's options stay under the arm's
    assert arms["plain"].specs[1].options["max_steps"] == 1


@pytest.mark.slow
def test_compare_runs_every_arm_and_writes_one_report(tmp_path, tiny_llama_bpe):
    cfg = arms_recipe(tmp_path, tiny_llama_bpe)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    assert zhtune(["pipeline", str(recipe), "--compare", "all"]) == 0
    run = tmp_path / "run"
    tail = ["sft", "merged", "eval"]
    for arm, stages in [("plain", ["data", *tail]), ("pt", ["data", "pt", *tail]),
                        ("full", ["data", "vocab", "tokenizer", "pt", *tail])]:  # fmt: skip
        state = json.loads((run / "arms" / arm / "pipeline_state.json").read_text(encoding="utf-8"))
        assert state["arm"] == arm and all(r["status"] == "done" for r in state["stages"].values())
        assert [n for n in state["stages"] if not n.endswith("-input")] == stages
        assert (run / "arms" / arm / "report" / "report.md").is_file()
    report = (run / "compare" / "report.md").read_text(encoding="utf-8")
    data = json.loads((run / "compare" / "arms.json").read_text(encoding="utf-8"))
    arms = {a["arm"]: a for a in data["arms"]}
    assert list(arms) == ["plain", "pt", "full"] and all(a["done"] for a in arms.values())
    # the same data in every arm, and the report says so
    assert len({json.dumps(a["data"], sort_keys=True) for a in arms.values()}) == 1
    assert "Every arm read the same data files" in report
    # training tokens counted (plain: sft only, 1 step; pt and full: pt + sft) and the budgets compared
    assert all(a["train_tokens"] > 0 for a in arms.values())
    assert arms["full"]["train_tokens"] > arms["plain"]["train_tokens"]
    assert "unequal token counts" in report
    # one column per arm's merged model beside the base, a best column, a plot
    cols = list(data["compared"]["news / bits/char"])
    assert cols == ["base", "plain (merged)", "pt (merged)", "full (merged)"]
    assert "| news | bits/char |" in report and "| sentiment | accuracy |" in report
    accuracy = next(line for line in report.splitlines() if line.startswith("| sentiment | accuracy |"))
    acc = [float(c.strip().rstrip("%")) for c in accuracy.split("|")[4:7]]
    want = "tie" if acc.count(max(acc)) > 1 else ("plain", "pt", "full")[acc.index(max(acc))]
    assert accuracy.split("|")[7].strip() == want
    row = next(line for line in report.splitlines() if line.startswith("| news | bits/char |"))
    values = [float(c) for c in row.split("|")[3:7]]
    per_arm = [arms[a]["results"]["news"]["bpc"] for a in ("plain", "pt", "full")]
    assert values[1:] == pytest.approx(per_arm, abs=1e-4)
    best = row.split("|")[7].strip()
    assert best == ("plain", "pt", "full")[per_arm.index(min(per_arm))] or per_arm.count(min(per_arm)) > 1
    assert (run / "compare" / "arms.png").stat().st_size > 1000
    # a second run skips every finished stage of every arm
    from zhtune.pipeline.run import main

    again = main({**cfg, "compare": ["plain", "full"]})
    assert set(again["arms"]) == {"plain", "full"}
    assert again["arms"]["full"]["stages"]["sft"]["seconds"] == arms_seconds(run, "full", "sft")


def arms_seconds(run: Path, arm: str, stage: str) -> float:
    state = json.loads((run / "arms" / arm / "pipeline_state.json").read_text(encoding="utf-8"))
    return state["stages"][stage]["seconds"]


def test_the_comparison_of_arms_that_read_different_data_says_so(tmp_path):
    a_data, b_data = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a_data.write_text('{"text": "一"}\n', encoding="utf-8")
    b_data.write_text('{"text": "二"}\n', encoding="utf-8")
    from zhtune.pipeline.compare import write_comparison

    for arm, f, tokens in (("a", a_data, 100), ("b", b_data, 300)):
        d = tmp_path / "run" / "arms" / arm
        d.mkdir(parents=True)
        state = {
            "stages": {
                "data": {"command": "demo_data", "status": "done", "state_after": {"data": {"x": str(f)}}},
                "sft": {
                    "command": "sft",
                    "status": "done",
                    "seconds": 2.0,
                    "result": {"train_tokens": tokens},
                },
            }
        }
        (d / "pipeline_state.json").write_text(json.dumps(state), encoding="utf-8")
    text = write_comparison(tmp_path / "run", [("a", None), ("b", None)]).read_text(encoding="utf-8")
    assert "data files differ" in text and "unequal token counts" in text
    summaries = [arm_summary(n, {}, None) for n in ("x", "y")]
    assert combined(summaries) is None and summaries[0]["train_tokens"] is None


def test_seeds_run_each_arm_once_per_training_seed(tmp_path, tiny_llama_bpe):
    cfg = arms_recipe(tmp_path, tiny_llama_bpe)
    a = build(recipe_mod.SECTIONS, {**cfg, "compare": ["plain", "full"], "seeds": [3, 4]}).pipeline
    assert [(n, s) for n, s, _ in a.arm_runs] == [("plain", 3), ("plain", 4), ("full", 3), ("full", 4)]
    full4 = a.arm_runs[-1][2]
    assert full4.run_dir == str(tmp_path / "run" / "arms" / "full" / "seed-4")
    seeds = {s.name: s.options.get("seed") for s in full4.specs}
    assert seeds == {
        "data": None,
        "vocab": None,
        "tokenizer": None,
        "pt": 4,
        "sft": 4,
        "merged": None,
        "eval": None,
    }
    for bad in ({"seeds": [1, 2]}, {"compare": ["all"], "seeds": [1, 1]}, {"compare": ["all"], "seeds": []}):
        with pytest.raises(ConfigError, match="--seeds"):
            build(recipe_mod.SECTIONS, {**cfg, **bad})


def _state(acc: float, bpc: float, tokens: int) -> dict:
    """A finished arm's pipeline_state.json with one eval stage (base and merged) and one training stage."""
    summary = {
        "tasks": {"news": {"kind": "text"}, "sentiment": {"kind": "task", "metric": "labels"}},
        "results": {
            "base": {"news": {"bpc": 8.0}, "sentiment": {"accuracy": 0.5}},
            "merged": {"news": {"bpc": bpc}, "sentiment": {"accuracy": acc}},
        },
    }
    return {
        "stages": {
            "sft": {"command": "sft", "status": "done", "seconds": 10.0, "result": {"train_tokens": tokens}},
            "eval": {"command": "eval", "status": "done", "seconds": 1.0, "result": summary},
        }
    }


def test_the_report_gives_mean_and_spread_over_seeds(tmp_path):
    from zhtune.pipeline.compare import write_comparison

    runs = {
        ("plain", 1): (0.70, 6.0),
        ("plain", 2): (0.80, 6.2),
        ("full", 1): (0.76, 5.0),
        ("full", 2): (0.78, 5.4),
    }
    for (arm, seed), (acc, bpc) in runs.items():
        d = tmp_path / "run" / "arms" / arm / f"seed-{seed}"
        d.mkdir(parents=True)
        (d / "pipeline_state.json").write_text(json.dumps(_state(acc, bpc, 1000)), encoding="utf-8")
    text = write_comparison(tmp_path / "run", list(runs)).read_text(encoding="utf-8")
    assert "once per training seed (1, 2)" in text and "2 of 2 done" in text
    acc = next(x for x in text.splitlines() if x.startswith("| sentiment | accuracy |")).split("|")
    # plain: 75.0% ± 7.1 (sample std of 70, 80); full: 77.0% ± 1.4; the base is the same in every seed
    assert [c.strip() for c in acc[3:7]] == ["50.0% ± 0.0", "75.0% ± 7.1", "77.0% ± 1.4", "full"]
    bpc = next(x for x in text.splitlines() if x.startswith("| news | bits/char |")).split("|")
    assert [c.strip() for c in bpc[4:7]] == ["6.1000 ± 0.1414", "5.2000 ± 0.2828", "full"]
    data = json.loads((tmp_path / "run" / "compare" / "arms.json").read_text(encoding="utf-8"))
    assert data["seeds"] == [1, 2] and data["compared"]["sentiment / accuracy"]["plain (merged)"] == [
        0.7,
        0.8,
    ]
    assert (tmp_path / "run" / "compare" / "arms.png").is_file()


def test_which_way_each_metric_is_better():
    from zhtune.eval.report import direction

    assert direction("{:.4f}", "bits/char") == -1 and direction("{:.4f}", "response bits/char") == -1
    assert direction("pct", "replies with U+FFFD") == -1 and direction("pct", "repetitive replies") == -1
    assert direction("pct", "accuracy") == 1 and direction("pct", "chosen likelier") == 1
    assert direction("pct", "F1") == 1 and direction("pct", "exact match") == 1
    assert direction("{:.2f}", "perplexity") == 0 and direction("{:.1f}", "Han chars/s") == 0
    assert direction("{:.3f}", "tokens/char") == 0
    assert direction("pct", "  正面") == 0 and direction("{:+.3f}", "  mean margin (nats)") == 0
