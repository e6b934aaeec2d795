"""The studio's forms come from the commands' config sections: every option of every command, with the
default and help text ``--help`` prints, and form values build the config the command line builds."""

from __future__ import annotations

import dataclasses
import importlib
import re
import shlex
import typing

import pytest
import yaml

from zhtune.commands import COMMANDS
from zhtune.config.parse import build, format_help, parse_cli
from zhtune.studio import forms
from zhtune.studio.paths import NOT_PATHS, PATH_FIELDS

HELP_LINE = re.compile(r"^  --(\w+)(?: \S+)?\s+(.*) \[default: (.*)\]$")


def help_options(command: str) -> dict[str, tuple[str, str]]:
    """name -> (help, default) as ``zhtune <command> --help`` prints them."""
    secs, _ = forms.sections(command)
    text = format_help(f"zhtune {command}", "", secs)
    out = {}
    for line in text.splitlines():
        m = HELP_LINE.match(line)
        if m:
            out[m.group(1)] = (m.group(2).strip(), m.group(3))
    return out


def test_every_command_with_options_has_a_form():
    expected = []
    for name, (module_name, _, _) in COMMANDS.items():
        if name in forms.NO_FORM:
            continue
        module = importlib.import_module(module_name)
        if hasattr(module, "SECTIONS"):
            expected.append(name)
        for table in forms.SUB_TABLES:
            expected += [f"{name} {sub}" for sub in getattr(module, table, {})]
    assert sorted(forms.form_commands()) == sorted(expected)
    assert {"sft", "pt", "pipeline", "merge", "export", "eval", "vocab train", "data dedup"} <= set(expected)


@pytest.mark.parametrize("command", forms.form_commands())
def test_every_option_appears_with_its_default_and_help(command):
    schema = forms.schema(command)
    fields = {f["name"]: f for sec in schema["sections"] for f in sec["fields"]}
    printed = help_options(command)
    assert printed, f"no options parsed from zhtune {command} --help"
    assert set(printed) == set(fields) - {"extra"}, "the form and --help list different options"
    for name, (help_text, default) in printed.items():
        f = fields[name]
        assert f["help"] == help_text, name
        assert str(f["default"]) == default, name
        assert f["help"], f"--{name} of zhtune {command} has no help text"
    secs, _ = forms.sections(command)
    assert [s["name"] for s in schema["sections"]] == list(secs)


def test_field_kinds_follow_the_types():
    fields = {f["name"]: f for sec in forms.schema("sft")["sections"] for f in sec["fields"]}
    assert fields["lora_rank"]["kind"] == "int" and fields["lora_rank"]["text"] == "8"
    assert fields["finetuning_type"]["kind"] == "choice" and fields["finetuning_type"]["choices"] == [
        "lora",
        "full",
    ]
    assert fields["gradient_checkpointing"]["kind"] == "bool" and fields["gradient_checkpointing"]["optional"]
    assert fields["train_files"]["kind"] == "list" and fields["train_files"]["path"]
    assert fields["report_to"]["text"] == "tensorboard" and fields["extra"]["kind"] == "dict"
    assert not fields["learning_rate"]["path"]
    stages = {f["name"]: f for sec in forms.schema("pipeline")["sections"] for f in sec["fields"]}["stages"]
    assert stages["kind"] == "list" and stages["text"] == ""


def test_form_values_build_what_the_command_line_and_the_yaml_build(tmp_path):
    values = {
        "model": {"model_name_or_path": "models/tiny", "dtype": "auto", "load_in_4bit": "false"},
        "data": {"train_files": "a.json,b.jsonl", "max_seq_length": "256", "template": ""},
        "lora": {"lora_rank": "16", "trainable": "q_proj,v_proj", "use_dora": "true"},
        "train": {
            "learning_rate": "2e-4",
            "report_to": "none",
            "gradient_checkpointing": "",
            "extra": "{seed: 3}",
        },
    }
    given = forms.given_values("sft", values)
    assert given == {
        "model": {"model_name_or_path": "models/tiny"},
        "data": {"train_files": ["a.json", "b.jsonl"], "max_seq_length": 256},
        "lora": {"lora_rank": 16, "trainable": ["q_proj", "v_proj"], "use_dora": True},
        "train": {"learning_rate": 2e-4, "report_to": ["none"], "extra": {"seed": 3}},
    }
    cfg = forms.build_given("sft", given)
    secs, passthrough = forms.sections("sft")
    line = forms.command_line("sft", given)
    assert line.startswith("zhtune sft --model_name_or_path models/tiny --train_files a.json,b.jsonl")
    argv = shlex.split(line)[2:]
    from_cli = parse_cli(argv, secs, prog="zhtune sft", description="", passthrough=passthrough)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(forms.to_yaml(given), encoding="utf-8")
    from_yaml = build(secs, recipe=recipe, passthrough=passthrough)
    assert cfg.to_dict() == from_cli.to_dict() == from_yaml.to_dict()
    assert cfg.train.report_to == [] and cfg.lora.lora_rank == 16


def test_bad_form_values_get_the_cli_messages():
    with pytest.raises(ValueError, match="--lora_rank takes an integer"):
        forms.given_values("sft", {"lora": {"lora_rank": "eight"}})
    with pytest.raises(ValueError, match="--lora_rank must be positive"):
        forms.build_given("sft", forms.given_values("sft", {"lora": {"lora_rank": "-1"}}))
    with pytest.raises(ValueError, match="no option 'lora_rank' in section train"):
        forms.given_values("sft", {"train": {"lora_rank": "8"}})
    with pytest.raises(ValueError, match="unknown command"):
        forms.schema("rm")


def shipped_recipes():
    from zhtune.recipes import command_of, recipes

    return [(name, command_of(name), path) for name, path in recipes().items()]


@pytest.mark.parametrize("name,command,path", shipped_recipes(), ids=lambda x: str(x))
def test_every_shipped_recipe_loads_into_the_form_and_back(name, command, path):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    values = forms.recipe_values(command, raw)
    secs, passthrough = forms.sections(command)
    direct = build(secs, recipe=path, passthrough=passthrough)
    assert forms.build_given(command, forms.given_values(command, values)).to_dict() == direct.to_dict()


def test_every_option_naming_a_file_or_folder_is_checked_as_a_path():
    words = re.compile(r"\b(file|files|folder|directory|directories|dir|path)\b", re.I)
    all_fields = {}
    for command in forms.form_commands():
        secs, _ = forms.sections(command)
        for cls in secs.values():
            for f in dataclasses.fields(cls):
                all_fields.setdefault(f.name, []).append(f.metadata.get("help", ""))
    unclassified = [
        name
        for name, helps in all_fields.items()
        if any(words.search(h) for h in helps) and name not in PATH_FIELDS and name not in NOT_PATHS
    ]
    assert not unclassified, f"classify these options in zhtune/studio/paths.py: {unclassified}"
    stale = sorted((PATH_FIELDS - set(all_fields)) - {"lora_model", "logging_dir"})
    assert not stale, f"no command has these options any more: {stale}"
    assert not set(NOT_PATHS) - set(all_fields), sorted(set(NOT_PATHS) - set(all_fields))


def test_servers_and_chat_are_not_runs_but_training_is():
    assert forms.runnable("sft") and forms.runnable("pipeline") and forms.runnable("data dedup")
    assert not forms.runnable("serve") and not forms.runnable("chat")
    hints = typing.get_type_hints(forms.sections("eval")[0]["eval"])
    assert forms.holds_mappings(hints["tasks"]) and not forms.holds_mappings(hints["labels"])


def test_recipes_load_from_zhtune_recipes_and_save_to_the_workspace(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from zhtune.studio.app import create_app
    from zhtune.studio.server import StudioArgs, make_studio

    c = TestClient(
        create_app(make_studio(StudioArgs(workspace=str(tmp_path)), None)), base_url="http://127.0.0.1"
    )
    h = {"X-Zhtune-Studio": "1"}
    shipped = {r["name"]: r["command"] for r in c.get("/api/recipes").json()["shipped"]}
    assert shipped == {name: command for name, command, _ in shipped_recipes()}
    r = c.post("/api/recipes/load", json={"source": "shipped", "name": "chinese-llama/sft"}, headers=h).json()
    assert (
        r["command"] == "sft"
        and r["values"]["lora"]["lora_rank"] == "8"
        and r["values"]["train"]["fp16"] == "true"
    )
    assert r["values"]["lora"]["trainable"] == "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj"
    r = c.post("/api/recipes/load", json={"source": "shipped", "name": "demo-zh/pipeline"}, headers=h).json()
    assert r["command"] == "pipeline" and "command: vocab_train" in r["values"]["pipeline"]["stages"]
    line = c.post("/api/command", json={**r, "name": "demo"}, headers=h).json()
    assert yaml.safe_load(line["yaml"])["pipeline"]["variants"]["quick"]["run_dir"] == "runs/demo/out"
    assert yaml.safe_load(line["yaml"])["pipeline"]["run_dir"] == "runs/demo/out"
    values = {"model": {"model_name_or_path": "models/x"}, "lora": {"lora_rank": "4"}}
    saved = c.post(
        "/api/recipes/save", json={"name": "mine", "command": "sft", "values": values}, headers=h
    ).json()
    assert saved == {"saved": "recipes/mine.yaml"}
    assert (tmp_path / "recipes" / "mine.yaml").read_text().startswith("# zhtune sft: recipe")
    assert {"name": "mine", "command": "sft", "description": "recipes/mine.yaml"} in c.get(
        "/api/recipes"
    ).json()["saved"]
    again = c.post("/api/recipes/load", json={"source": "saved", "name": "mine"}, headers=h).json()
    assert again == {
        "command": "sft",
        "values": {
            "model": {"model_name_or_path": "models/x"},
            "data": {},
            "lora": {"lora_rank": "4"},
            "train": {},
        },
    }
    r = c.post("/api/recipes/load", json={"source": "shipped", "name": "no/such"}, headers=h)
    assert r.status_code == 400 and "no shipped recipe" in r.json()["error"]
