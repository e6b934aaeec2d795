"""Kill -9 at 20 points of tiny deterministic runs (SFT and PT, LoRA and full; DPO), resume each, and require the
same weights and loss curve as an uninterrupted run, bit for bit on CPU. tests/crash_runner.py does the work
in forked children; this test writes its plan and checks what it reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_model, write_alpaca
from extended_vocab import made_up_chinese
from pref_helpers import write_pairs

HERE = Path(__file__).parent


def sft_cfg(model: Path, data: Path, cache: Path, **kw) -> dict:
    return {
        "model_name_or_path": str(model),
        "train_files": [str(data)],
        "data_cache_dir": str(cache),
        "max_steps": 6,
        "per_device_train_batch_size": 2,
        "logging_steps": 1,
        "save_steps": 2,
        "save_total_limit": 1,
        "learning_rate": 1e-3,
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.1,  # dropout draws random numbers: a resume must restore the RNG states exactly
        "warmup_ratio": 0.0,
        "max_seq_length": 64,
        "report_to": "none",
        "seed": 7,
        "dataloader_num_workers": 0,
        **kw,
    }


def pt_cfg(model: Path, data: Path, cache: Path, **kw) -> dict:
    return {
        "model_name_or_path": str(model),
        "dataset_dir": str(data),
        "block_size": 32,
        "data_cache_dir": str(cache),
        "max_steps": 6,
        "per_device_train_batch_size": 2,
        "logging_steps": 1,
        "save_steps": 2,
        "save_total_limit": 2,
        "learning_rate": 1e-3,
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.1,
        "report_to": "none",
        "seed": 11,
        "eval_before_training": False,
        **kw,
    }


def dpo_cfg(model: Path, data: Path, cache: Path, **kw) -> dict:
    return {**sft_cfg(model, data, cache, **kw), "loss": "dpo", "seed": 5}


# every kind of kill point, spread over the five runs (20 in all)
KILLS = {
    "sft-lora": [
        {"type": "step", "after": 1},
        {"type": "model_saved", "nth": 1},
        {"type": "state_write", "nth": 2},
        {"type": "rotation", "nth": 1},
        {"type": "final_publish"},
    ],
    "sft-full": [
        {"type": "weights_write", "nth": 1},
        {"type": "before_rename", "nth": 2},  # checkpoint-2 published, checkpoint-4 not
        {"type": "resume_load", "nth": 1},  # the resume from checkpoint-2 killed while reading it
        {"type": "time"},
    ],
    "pt-lora": [
        {"type": "trainer_state", "nth": 1},
        {"type": "step", "after": 3},
        {"type": "time"},
    ],
    "pt-full": [
        {"type": "state_write", "nth": 1},
        {"type": "before_rename", "nth": 2},
        {"type": "step", "after": 1},
        {"type": "weights_write", "nth": 2},
    ],
    "dpo-lora": [  # TRL's DPOTrainer behind the same seam
        {"type": "step", "after": 1},
        {"type": "state_write", "nth": 2},
        {"type": "weights_write", "nth": 2},
        {"type": "time"},
    ],
}


@pytest.fixture(scope="module")
def crash_results(tmp_path_factory, bpe_tokenizer_dir) -> list[dict]:
    root = tmp_path_factory.mktemp("crash")
    model = make_tiny_model(bpe_tokenizer_dir, root / "model")
    sft_data = write_alpaca(root / "sft.json", n=16)
    pairs = write_pairs(root / "pairs.jsonl", n=16)
    (root / "pt").mkdir()
    made_up_chinese(root / "pt" / "a.txt", n=60, seed=3)
    cache = root / "cache"
    full = {"finetuning_type": "full"}
    cfgs = {
        "sft-lora": ("sft", sft_cfg(model, sft_data, cache)),
        "sft-full": ("sft", sft_cfg(model, sft_data, cache, **full)),
        "pt-lora": ("pt", pt_cfg(model, root / "pt", cache)),
        "pt-full": ("pt", pt_cfg(model, root / "pt", cache, stage="full")),
        "dpo-lora": ("dpo", dpo_cfg(model, pairs, cache)),
    }
    plan = {
        "root": str(root),
        "seed": 1,
        "scenarios": [{"name": n, "kind": k, "cfg": c, "kills": KILLS[n]} for n, (k, c) in cfgs.items()],
    }
    (root / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)])}
    r = subprocess.run(
        [sys.executable, str(HERE / "crash_runner.py"), str(root / "plan.json"), str(root / "result.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads((root / "result.json").read_text())


def test_at_least_ten_kill_points():
    assert sum(len(k) for k in KILLS.values()) >= 10


@pytest.mark.parametrize("name", list(KILLS))
def test_killed_runs_resume_to_the_same_weights_and_curve(crash_results, name):
    (res,) = [r for r in crash_results if r["name"] == name]
    for k in res["kills"]:
        # an injected kill point must really kill; a timed one may come after the run finished
        assert k["status"] == "killed" or (k["type"] == "time" and k["status"] == "finished"), k
        assert not k["problems"], k  # every checkpoint-N on disk, after every kill, is complete and loads
    assert res["same_curve"], (res["curve"], res["reference_curve"])
    assert res["same_weights"]
    assert len(res["curve"]) == 6 and [c["step"] for c in res["curve"]] == list(range(1, 7))
    assert not res["tmp_leftovers_after_resume"]
    assert not res["pickles"], res["pickles"]
    assert res["final_checkpoints"][-1] == "checkpoint-6"


def test_kill_points_hit_checkpoints_and_resumes(crash_results):
    """The plan is not vacuous: kills left temporary directories behind and later runs resumed past them."""
    kills = [k for r in crash_results for k in r["kills"]]
    assert sum(k["status"] == "killed" for k in kills) >= 14
    assert sum(bool(k["tmp_leftovers"]) for k in kills) >= 8  # killed while writing: only .tmp-* was left
    resume_load = next(k for k in kills if k["type"] == "resume_load")
    assert resume_load["status"] == "killed" and resume_load["checkpoints"] == ["checkpoint-2"]
