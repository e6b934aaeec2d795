"""``zhtune demo``: the shipped demo-sentiment recipe run by the pipeline, its old flags, a clean exit."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

from zhtune.cli import expand_shortcut
from zhtune.config.parse import build, parse_cli
from zhtune.pipeline.recipe import SECTIONS

RECIPE = REPO / "configs" / "demo-sentiment" / "pipeline.yaml"


def test_the_recipe_keeps_the_demo_settings():
    """The settings of the hand-written demo it replaced: the same data, LoRA run and measurement."""
    a = build(SECTIONS, recipe=RECIPE).pipeline
    assert [(s.name, s.command) for s in a.specs] == [("data", "demo_data"), ("sft", "sft"), ("eval", "eval")]
    o = {s.name: s.options for s in a.specs}
    d = o["data"]
    assert (d["sentiment_train"], d["sentiment_eval"], d["max_review_chars"], d["seed"]) == (2000, 200, 60, 0)
    assert d["ner_train"] == d["ner_eval"] == 0 and a.model_name_or_path == "default"
    s = o["sft"]
    assert (s["max_steps"], s["per_device_train_batch_size"], s["learning_rate"]) == (75, 8, 1e-3)
    assert (s["lora_rank"], s["lora_alpha"], s["lora_dropout"], s["max_seq_length"], s["seed"]) == (
        16,
        32,
        0,
        192,
        0,
    )
    assert "trainable" not in s  # sft's default: all seven projections
    (task,) = o["eval"]["tasks"]
    assert (task["task_metric"], task["sample_replies"], task["max_new_tokens"]) == ("labels", 1, 16)
    quick = {
        s.name: s.options for s in build(SECTIONS, recipe=RECIPE, overrides={"quick": True}).pipeline.specs
    }
    assert (quick["data"]["sentiment_train"], quick["data"]["sentiment_eval"], quick["sft"]["max_steps"]) == (
        200,
        40,
        10,
    )


def test_old_flags_become_pipeline_options():
    argv = expand_shortcut("demo", ["--quick", "--output_dir=out/d", "--max_steps", "5", "--seed", "3"])
    assert argv[0] == str(RECIPE)
    a = parse_cli(argv, SECTIONS, prog="zhtune pipeline", description="").pipeline
    o = {s.name: s.options for s in a.specs}
    assert a.variant == "quick" and a.run_dir == "out/d"
    assert (o["sft"]["max_steps"], o["sft"]["save_steps"], o["sft"]["seed"], o["data"]["seed"]) == (
        5,
        5,
        3,
        3,
    )
    assert o["data"]["sentiment_train"] == 200  # the variant's, where no flag overrides it
    fresh = parse_cli(expand_shortcut("demo", []), SECTIONS, prog="p", description="").pipeline
    assert fresh.run_dir.startswith("runs/demo-2") and len(fresh.run_dir) == len("runs/demo-20250101-120000")


def test_every_shortcut_runs_its_command_and_a_shipped_recipe():
    from zhtune.commands import COMMANDS, SHORTCUTS
    from zhtune.recipes import recipes

    for name, (command, recipe, _, _) in SHORTCUTS.items():
        assert COMMANDS[name][0] == COMMANDS[command][0] and recipe in recipes(), name


def test_demo_help_names_the_recipe_and_the_old_flags(capsys):
    from zhtune.cli import main

    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert f"zhtune demo runs: zhtune pipeline {RECIPE}" in out and "sft.max_steps, sft.save_steps" in out
    assert "--stage_options" in out  # and then the pipeline's own options


def test_stage_options_name_a_stage(tmp_path):
    from zhtune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--stage_options: no stage named 'stf' \(data, sft, eval\)"):
        build(SECTIONS, recipe=RECIPE, overrides={"stage_options": "{stf: {max_steps: 1}}"})


def test_a_short_demo_exits_0_and_leaves_no_thread(tmp_path, tiny_llama_bpe):
    """The demo printed its results and then died at exit ("terminate called without an active exception",
    status 134): it never closed the engine of its chat reply, whose daemon thread could still be inside
    model.generate when the interpreter shut down (the old demo left 'zhtune-generate' alive). Every engine
    the demo starts is closed now."""
    pytest.importorskip("snownlp")
    run = tmp_path / "run"
    args = ["demo", "--quick", "--model_name_or_path", str(tiny_llama_bpe), "--output_dir", str(run)]
    args += ["--max_steps", "2", "--train_samples", "16", "--eval_samples", "6"]
    code = f"""
        import sys, threading
        from zhtune.cli import main
        rc = main({args!r})
        print("LIVE THREADS", sorted(t.name for t in threading.enumerate() if t is not threading.main_thread()))
        sys.exit(rc)
    """
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "terminate called" not in r.stderr
    live = ast.literal_eval(r.stdout.split("LIVE THREADS ", 1)[1].splitlines()[0])
    assert set(live) <= {"tqdm_monitor"}, live  # tqdm's monitor sleeps in Python; nothing runs torch code
    state = json.loads((run / "pipeline_state.json").read_text(encoding="utf-8"))
    assert [n for n in state["stages"]] == ["data", "sft", "eval"] and state["variant"] == "quick"
    res = state["stages"]["eval"]["result"]["results"]
    assert list(res) == ["base", "sft"] and all(r["sentiment"]["n"] == 6 for r in res.values())
    (sample,) = res["sft"]["sentiment"]["samples"]
    assert sample["reference"] in ("正面", "负面") and "商品评论" in sample["prompt"]
    assert isinstance(sample["reply"], str)
    report = (run / "report" / "report.md").read_text(encoding="utf-8")
    assert "| sentiment | accuracy |" in report and "Greedy replies:" in report
    assert "sentiment: 判断下面这条商品评论" in r.stdout  # the reply on the terminal, after the table
