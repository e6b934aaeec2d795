"""``--print_config`` on every command that takes options: the resolved YAML, recipe and overrides applied."""

from __future__ import annotations

import pytest
import yaml

from zhtune.cli import main
from zhtune.commands import COMMANDS

NOT_ONE_CONFIG = {"recipes", "demo"}  # a table of recipes; a shortcut for a pipeline recipe
# the least each command needs to build its config (files that must exist are made in tmp_path)
ARGS = {
    "data": ["convert", "--in_file", "{d}/a.json", "--out_file", "{d}/b.jsonl", "--to", "messages"],
    "vocab": ["train", "--input", "{d}/a.txt"],
    "export": ["--output_dir", "{d}/out"],
    "merge": ["--lora_model", "{d}/lora", "--output_dir", "{d}/out"],
    "generate": ["--input_file", "{d}/a.jsonl", "--output_file", "{d}/out.jsonl"],
    "pipeline": ["{d}/p.yaml"],
    "sft": ["--learning_rate", "3e-4"],
    "pt": ["--learning_rate", "3e-4"],
}


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - NOT_ONE_CONFIG))
def test_print_config_prints_the_resolved_yaml_and_exits(command, capsys, tmp_path):
    for name in ("a.json", "a.jsonl"):
        (tmp_path / name).write_text(
            '[{"instruction": "a", "output": "b"}]\n' if name == "a.json" else "{}\n"
        )
    (tmp_path / "a.txt").write_text("你好\n")
    (tmp_path / "p.yaml").write_text(
        "run_dir: runs/x\nstages:\n  - {name: m, command: merge, with: {lora_models: [a]}}\n"
    )
    argv = [command] + [a.format(d=tmp_path) for a in ARGS.get(command, [])]
    with pytest.raises(SystemExit) as done:
        main([*argv, "--print_config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert isinstance(printed, dict) and printed, command
    if command in ("sft", "pt"):  # the override is in the printed config, in its section
        assert printed["train"]["learning_rate"] == 3e-4
