"""Training config flows one way: one typed config per command, the TrainingArguments pass-through declared
once, and every TrainArgs field either copied, derived or kept by zhtune, never silently dropped."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import TrainingArguments

from zhtune.config.args import DataArgs, LoraArgs, ModelArgs, TrainArgs
from zhtune.config.parse import build
from zhtune.errors import ConfigError
from zhtune.train import args, pt, sft
from zhtune.train.pt import PtConfig
from zhtune.train.sft import SftConfig

TA_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}


def test_each_command_has_one_typed_config_in_order():
    assert list(SftConfig.section_types().items()) == [
        ("model", ModelArgs), ("data", DataArgs), ("lora", LoraArgs), ("train", TrainArgs),
    ]  # fmt: skip
    assert list(PtConfig.section_types()) == ["model", "data", "stage", "lora", "train"]
    assert sft.SECTIONS == SftConfig.section_types() and pt.SECTIONS == PtConfig.section_types()
    assert sft.CONFIG is SftConfig and pt.CONFIG is PtConfig


def test_of_takes_a_dict_a_plain_config_or_itself():
    c = SftConfig.of({"lora_rank": 4, "lr": 3e-4, "adam_beta2": 0.95, "train": {"max_steps": 7}})
    assert isinstance(c, SftConfig) and SftConfig.of(c) is c
    assert (c.lora.lora_rank, c.train.learning_rate, c.train.max_steps) == (4, 3e-4, 7)
    assert c.train.extra == {"adam_beta2": 0.95}  # a TrainingArguments field, passed through
    plain = build(sft.SECTIONS, {"lora_rank": 2})
    typed = SftConfig.of(plain)
    assert type(typed) is SftConfig and typed.lora is plain.lora and typed.to_dict() == plain.to_dict()
    with pytest.raises(ConfigError, match="SftConfig has sections model, data, lora, train; this config has"):
        SftConfig.of(build(pt.SECTIONS, {}))  # pt's sections are not sft's
    with pytest.raises(ConfigError, match="unknown option 'adam_beta3'.*did you mean --adam_beta2"):
        SftConfig.of({"adam_beta3": 0.9})


def test_from_cli_returns_the_typed_config():
    c = PtConfig.from_cli(["--stage", "embeddings", "--fsdp", "full_shard"], "zhtune pt", "")
    assert (
        isinstance(c, PtConfig) and c.stage.stage == "embeddings" and c.train.extra == {"fsdp": "full_shard"}
    )
    assert c.train.learning_rate == 2e-4  # pt's own default


def test_passthrough_is_declared_once_and_used_by_the_pipeline():
    from zhtune.pipeline.stages import sections

    p = SftConfig.passthrough()["train"]
    assert {"adam_beta2", "fsdp", "torch_compile", "lr_scheduler_kwargs"} <= p
    assert not p & {
        f.name for cls in sft.SECTIONS.values() for f in dataclasses.fields(cls)
    }  # own fields win
    assert p == TA_FIELDS - {f.name for f in dataclasses.fields(TrainArgs)}
    assert sections(sft) == (sft.SECTIONS, SftConfig.passthrough())
    assert sections(pt) == (pt.SECTIONS, PtConfig.passthrough())
    from zhtune.merge import merge

    assert sections(merge) == (merge.SECTIONS, {})  # not a training command: nothing passes through
    assert args.passthrough({"model": ModelArgs}) == {}


def test_every_train_field_is_copied_derived_or_zhtunes_own():
    names = [f.name for f in dataclasses.fields(TrainArgs)]
    groups = args.COPIED + args.DERIVED + args.ZHTUNE_ONLY
    assert sorted(groups) == sorted(names), (
        "a TrainArgs field must be listed in exactly one group of train.args"
    )
    assert set(args.COPIED) <= TA_FIELDS


def test_training_arguments_copy_derive_and_pass_through(tmp_path):
    t = SftConfig.of(
        {
            "output_dir": str(tmp_path),
            "learning_rate": 3e-4,
            "warmup_steps": 5,
            "save_steps": 7,
            "gradient_checkpointing": True,
            "use_liger_kernel": True,
            "report_to": "none",
            "adam_beta2": 0.9,
            "group_by_length": True,
        }  # fmt: skip
    ).train
    a = args.build_training_arguments(t, has_eval=True, device="cpu")
    assert (a.learning_rate, a.warmup_steps, a.save_steps, a.eval_steps, a.adam_beta2) == (3e-4, 5, 7, 7, 0.9)
    assert a.optim == "adamw_torch" and a.report_to == [] and a.train_sampling_strategy == "group_by_length"
    # zhtune applies these itself (prepare_for_training, the speed plan): the Trainer must not do it again
    assert not a.gradient_checkpointing and not a.use_liger_kernel
    assert not a.remove_unused_columns and a.eval_strategy == "steps" and a.use_cpu
    a = args.build_training_arguments(t, has_eval=False, device="cpu")
    assert a.eval_strategy == "no" and a.eval_steps is None
    with pytest.raises(ConfigError, match="--fp16 needs a GPU"):
        args.build_training_arguments(dataclasses.replace(t, fp16=True), has_eval=False, device="cpu")
    with pytest.raises(ConfigError, match="unknown training options: adam_beta3"):
        args.build_training_arguments(
            dataclasses.replace(t, extra={"adam_beta3": 1}), has_eval=False, device="cpu"
        )


def test_a_command_can_name_a_training_arguments_subclass(tmp_path):
    """A preference-tuning config names TRL's DPOConfig; its own fields then pass through and are built."""

    @dataclasses.dataclass
    class PrefArguments(TrainingArguments):
        beta: float = 0.1

    class PrefConfig(args.TrainingConfig):
        model: ModelArgs
        train: TrainArgs

        @classmethod
        def arguments_class(cls) -> type:
            return PrefArguments

    c = PrefConfig.of({"output_dir": str(tmp_path), "beta": 0.3, "report_to": "none"})
    assert c.train.extra == {"beta": 0.3} and "beta" not in SftConfig.passthrough()["train"]
    a = args.build_training_arguments(c.train, has_eval=False, device="cpu", cls=PrefConfig.arguments_class())
    assert isinstance(a, PrefArguments) and a.beta == 0.3
