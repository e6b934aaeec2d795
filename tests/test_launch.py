"""``zhtune sft --nproc_per_node N``: torchrun re-launch, and DDP giving one process's losses (CPU, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, write_alpaca

from zhtune.train.launch import maybe_relaunch, split_launch_args, torchrun_command


def test_launch_flags_are_split_from_the_command_line():
    launch, rest = split_launch_args(
        ["recipe.yaml", "--nproc_per_node", "2", "--lora_rank", "8", "--master_port=29555", "--nnodes", "1"]
    )
    assert launch == {"nproc_per_node": "2", "master_port": "29555", "nnodes": "1"}
    assert rest == ["recipe.yaml", "--lora_rank", "8"]


def test_torchrun_command_single_and_multi_node():
    one = torchrun_command("sft", {"nproc_per_node": "4"}, ["--max_steps", "3"])
    assert one[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in one
    assert one[-5:] == ["-m", "zhtune", "sft", "--max_steps", "3"]
    two = torchrun_command(
        "pt", {"nproc_per_node": "8", "nnodes": "2", "node_rank": "1", "master_addr": "10.0.0.1"}, []
    )
    assert "--standalone" not in two
    assert {"--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29500"} <= set(two)


def test_under_an_external_launcher_the_flags_are_dropped(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert maybe_relaunch("sft", ["--nproc_per_node", "2", "--max_steps", "1"]) == (
        None,
        ["--max_steps", "1"],
    )
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert maybe_relaunch("sft", ["--nproc_per_node", "1", "--x", "y"]) == (None, ["--x", "y"])


def test_two_process_ddp_through_the_cli_gives_the_single_process_losses(tiny_llama_sp, tmp_path):
    """2 processes x 2 samples against 1 process x 4 samples: the same global batch, the same losses."""
    from zhtune.train.sft import main as sft

    data = write_alpaca(tmp_path / "d.json", 24, seed=4)
    common = {
        "model_name_or_path": str(tiny_llama_sp), "train_files": str(data), "data_cache_dir": str(tmp_path / "c"),
        "max_steps": 3, "logging_steps": 1, "learning_rate": 1e-3, "lora_rank": 4, "lora_dropout": 0.0,
        "warmup_ratio": 0.0, "report_to": "none", "template": "alpaca", "max_seq_length": 256, "seed": 7,
    }  # fmt: skip
    one = sft(
        {**common, "output_dir": str(tmp_path / "one"), "per_device_train_batch_size": 4, "save_steps": 100}
    )
    argv = [sys.executable, "-m", "zhtune", "sft", "--nproc_per_node", "2", "--output_dir", str(tmp_path / "two"),
            "--per_device_train_batch_size", "2", "--save_steps", "2"]  # fmt: skip
    for k, v in common.items():
        argv += [f"--{k}", str(v)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "launching: " in r.stdout and "torch.distributed.run" in r.stdout
    out = tmp_path / "two"
    hist = json.loads((out / "log_history.json").read_text())
    two = [h["loss"] for h in hist if "loss" in h]
    assert two == pytest.approx([h["loss"] for h in one["log_history"] if "loss" in h], abs=1e-5)
    assert (out / "adapter_model.safetensors").is_file() and (
        out / "checkpoint-2" / "trainer_state.json"
    ).is_file()
    assert not list(out.parent.glob(".tmp-*")) and not list(out.glob(".tmp-*"))
    assert r.stdout.count("done: ") == 1  # one process reports


def test_deepspeed_configs_are_shipped_and_checked(tmp_path):
    from zhtune.deps import available
    from zhtune.errors import ConfigError, MissingDependency
    from zhtune.train.args import check_deepspeed

    shipped = sorted((REPO / "configs" / "deepspeed").glob("*.json"))
    assert {p.name for p in shipped} >= {"ds_zero2_no_offload.json", "ds_zero3.json"}
    stages = {json.loads(p.read_text())["zero_optimization"]["stage"] for p in shipped}
    assert stages == {2, 3}
    with pytest.raises(ConfigError, match="no such file"):
        check_deepspeed(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{'stage': 2}")
    with pytest.raises(ConfigError, match="malformed JSON"):
        check_deepspeed(str(bad))
    if not available("deepspeed"):
        with pytest.raises(MissingDependency, match="pip install deepspeed"):
            check_deepspeed(str(shipped[0]))
