"""YAML recipes, command-line overrides, aliases and actionable errors."""

from __future__ import annotations

import pytest

from zhtune.config.args import DataArgs, LoraArgs, ModelArgs, TrainArgs
from zhtune.config.parse import build, format_help, parse_cli, split_argv
from zhtune.errors import ConfigError

SECTIONS = {"model": ModelArgs, "data": DataArgs, "lora": LoraArgs, "train": TrainArgs}


def test_seed_flags_work_as_written(tmp_path):
    argv = (
        "--model_name_or_path /m --tokenizer_name_or_path /t --dataset_dir /d --validation_file v.json "
        "--max_seq_length 256 --lora_rank 8 --lora_alpha 32 --lora_dropout 0.05 "
        "--trainable q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj --modules_to_save embed_tokens,lm_head "
        "--peft_path /p --per_device_train_batch_size 1 --gradient_accumulation_steps 8 --learning_rate 1e-4 "
        "--lr_scheduler_type cosine --warmup_ratio 0.03 --num_train_epochs 2 --max_steps 10 --logging_steps 5 "
        "--save_steps 50 --save_total_limit 2 --eval_steps 25 --gradient_checkpointing --bf16 --seed 7 "
        "--output_dir out --resume_from_checkpoint true"
    ).split()
    cfg = parse_cli(argv, SECTIONS, prog="t", description="")
    assert cfg.model.model_name_or_path == "/m" and cfg.model.tokenizer_name_or_path == "/t"
    assert cfg.data.max_seq_length == 256 and cfg.data.validation_file == "v.json"
    assert cfg.lora.trainable == ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    assert cfg.lora.modules_to_save == ["embed_tokens", "lm_head"]
    assert cfg.lora.lora_alpha == 32.0 and cfg.lora.lora_dropout == 0.05
    t = cfg.train
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.learning_rate) == (1, 8, 1e-4)
    assert t.gradient_checkpointing is True and t.bf16 is True and t.max_steps == 10
    assert t.resume_from_checkpoint == "true" and t.save_total_limit == 2 and t.eval_steps == 25


def test_yaml_flat_and_sectioned_give_the_same_config(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text(
        "model_name_or_path: /m\nlora_rank: 16\nlearning_rate: 2.0e-4\ntrainable: [q_proj, v_proj]\n"
    )
    sec = tmp_path / "sec.yaml"
    sec.write_text(
        "model:\n  model_name_or_path: /m\nlora:\n  lora_rank: 16\n  trainable: q_proj,v_proj\n"
        "train:\n  learning_rate: 0.0002\n"
    )
    a = build(SECTIONS, recipe=flat)
    b = build(SECTIONS, recipe=sec)
    assert a.to_dict() == b.to_dict()
    assert a.lora.lora_rank == 16 and a.lora.trainable == ["q_proj", "v_proj"]


def test_command_line_overrides_recipe(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("lora_rank: 16\nbf16: true\n")
    cfg = parse_cli(
        [str(y), "--lora_rank", "4", "--bf16", "false", "--lr=3e-4"], SECTIONS, prog="t", description=""
    )
    assert cfg.lora.lora_rank == 4 and cfg.train.bf16 is False and cfg.train.learning_rate == 3e-4


def test_aliases_from_other_tools():
    cfg = build(
        SECTIONS,
        {"base_model": "/b", "lora_r": 4, "cutoff_len": 128, "lora_target": "q_proj", "micro_batch_size": 2},
    )
    assert cfg.model.model_name_or_path == "/b" and cfg.lora.lora_rank == 4
    assert cfg.data.max_seq_length == 128 and cfg.lora.trainable == ["q_proj"]
    assert cfg.train.per_device_train_batch_size == 2


def test_unknown_option_suggests_the_right_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown option 'lora_rnak' \(did you mean --lora_rank\?\)"):
        parse_cli(["--lora_rnak", "8"], SECTIONS, prog="t", description="")
    y = tmp_path / "bad.yaml"
    y.write_text("learnin_rate: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown option 'learnin_rate'.*learning_rate"):
        build(SECTIONS, recipe=y)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lora_rank": "0"}, "--lora_rank must be positive"),
        ({"lora_rank": "eight"}, "--lora_rank takes an integer"),
        ({"lora_dropout": "1.5"}, r"--lora_dropout must be in \[0, 1\)"),
        ({"load_in_8bit": "true", "load_in_4bit": "true"}, "choose one of --load_in_8bit and --load_in_4bit"),
        ({"bf16": "true", "fp16": "true"}, "choose one of --bf16 and --fp16"),
        ({"validation_split_percentage": "150"}, "percentage"),
        ({"finetuning_type": "adapter"}, "--finetuning_type must be one of lora, full"),
        ({"gradient_checkpointing": "maybe"}, "takes true or false"),
        ({"max_seq_length": "4"}, "too short"),
    ],
)
def test_post_init_checks_say_what_to_do(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build(SECTIONS, overrides=overrides)


def test_bad_yaml_names_the_file(tmp_path):
    y = tmp_path / "broken.yaml"
    y.write_text("lora_rank: [8\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        build(SECTIONS, recipe=y)
    with pytest.raises(ConfigError, match="does not exist"):
        build(SECTIONS, recipe=tmp_path / "missing.yaml")


def test_passthrough_training_arguments():
    cfg = build(SECTIONS, {"adam_beta2": 0.95}, passthrough={"train": {"adam_beta2"}})
    assert cfg.train.extra == {"adam_beta2": 0.95}


def test_help_lists_every_field_with_its_help():
    text = format_help("zhtune sft", "desc", SECTIONS)
    for name in (
        "--lora_rank",
        "--modules_to_save",
        "--max_seq_length",
        "--load_in_4bit",
        "--resume_from_checkpoint",
    ):
        assert name in text
    assert "LoRA rank r" in text


def test_bool_flag_without_value_and_with_value():
    _, o = split_argv(
        ["--bf16", "--seed", "3", "--fp16", "false", "--gradient_checkpointing"],
        {"bf16", "fp16", "gradient_checkpointing"},
    )
    assert o == {"bf16": True, "seed": "3", "fp16": "false", "gradient_checkpointing": True}
