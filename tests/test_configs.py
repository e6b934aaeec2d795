"""Every shipped recipe under configs/ loads against its command's config sections.

The command comes from the file name: ``<command>[_<anything>].yaml`` (``pt_stage2.yaml`` -> zhtune pt),
or ``<command>_<subcommand>`` for commands with subcommands (``vocab_merge.yaml`` -> zhtune vocab merge).
"""

from __future__ import annotations

import dataclasses
import importlib
import typing

import pytest
import yaml
from conftest import REPO

from zhtune.cli import COMMANDS
from zhtune.config.parse import ALIASES, build, coerce

RECIPES = sorted((REPO / "configs").rglob("*.yaml"))


def sections_for(path):
    words = path.stem.split("_")
    if words[0] not in COMMANDS:
        pytest.fail(
            f"{path}: cannot tell its command from the name (start it with one of {', '.join(COMMANDS)})"
        )
    module = importlib.import_module(COMMANDS[words[0]][0])
    subs = getattr(module, "SUBCOMMANDS", None)
    if subs:
        if len(words) < 2 or words[1] not in subs:
            pytest.fail(f"{path}: name it {words[0]}_<{'|'.join(subs)}>[...].yaml")
        module = importlib.import_module(subs[words[1]][0])
    return module


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO)) for p in RECIPES])
def test_recipe_loads(path):
    from zhtune.pipeline.stages import sections

    secs, passthrough = sections(sections_for(path))  # the pipeline's own check of a stage's options
    cfg = build(secs, recipe=path, passthrough=passthrough)
    # every option the recipe sets arrives, with its value, in the section that owns it
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    flat = {}
    for key, value in raw.items():
        grouped = key in secs and isinstance(value, dict)
        flat.update(value if grouped else {key: value})
    assert flat, f"{path} sets no option"
    for key, value in flat.items():
        key = ALIASES.get(key, key)
        owners = [s for s, cls in secs.items() if key in typing.get_type_hints(cls)]
        if owners:
            (sec,) = owners
            section = getattr(cfg, sec)
            given = coerce(value, typing.get_type_hints(type(section))[key], key)
            normalized = getattr(dataclasses.replace(section, **{key: given}), key)  # as __post_init__ has it
            assert getattr(section, key) == normalized, (path, key)
        else:
            assert cfg.train.extra[key] == value, (path, key)  # a Hugging Face TrainingArguments option


def test_chinese_llama_stage2_recipe_is_the_seed():
    from zhtune.train import pt

    cfg = build(pt.SECTIONS, recipe=REPO / "configs" / "chinese-llama" / "pt_stage2.yaml")
    assert (cfg.train.learning_rate, cfg.lora.lora_rank, cfg.lora.lora_alpha, cfg.lora.lora_dropout) == (
        2e-4,
        8,
        32,
        0.05,
    )
    assert cfg.lora.trainable == "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj".split(",")
    assert cfg.lora.modules_to_save == ["embed_tokens", "lm_head"] and cfg.data.block_size == 512
    assert cfg.stage.stage == "lora"


PIPELINES = [p for p in RECIPES if p.stem.split("_")[0] == "pipeline"]
VARIANTS = [
    (p, v) for p in PIPELINES for v in yaml.safe_load(p.read_text(encoding="utf-8")).get("variants") or {}
]


@pytest.mark.parametrize("path,variant", VARIANTS, ids=[f"{p.relative_to(REPO)}:{v}" for p, v in VARIANTS])
def test_pipeline_variant_loads(path, variant):
    """Each variant of a pipeline recipe is checked stage by stage against the stages' commands."""
    from zhtune.pipeline.recipe import SECTIONS

    cfg = build(SECTIONS, recipe=path, overrides={"variant": variant})
    assert cfg.pipeline.variant == variant and cfg.pipeline.specs


def test_demo_pipeline_runs_the_whole_path():
    from zhtune.pipeline.recipe import SECTIONS

    a = build(
        SECTIONS, recipe=REPO / "configs" / "demo-zh" / "pipeline.yaml", overrides={"quick": True}
    ).pipeline
    assert [(s.name, s.command) for s in a.specs] == [
        ("data", "demo_data"),
        ("vocab", "vocab_train"),
        ("tokenizer", "vocab_merge"),
        ("pt2", "pt"),
        ("sft", "sft"),
        ("merged", "merge"),
        ("gguf", "export"),
        ("eval", "eval"),
    ]
    opts = {s.name: s.options for s in a.specs}
    assert opts["pt2"]["stage"] == "lora" and opts["data"]["continuation_train"] > 0
    assert opts["gguf"]["quant"] == "q8_0" and a.run_dir == "runs/demo-zh-quick"
    assert {t["name"] for t in opts["eval"]["tasks"]} == {"news", "sentiment", "prompts"}
    full = build(SECTIONS, recipe=REPO / "configs" / "demo-zh" / "pipeline.yaml").pipeline  # stage 1 and NER
    assert [s.name for s in full.specs][3:5] == ["pt1", "pt2"]
    assert full.specs[3].options["stage"] == "embeddings"
    assert {t["name"] for t in full.specs[-1].options["tasks"]} == {"news", "sentiment", "ner", "prompts"}
    arms = {
        name: arm
        for name, _, arm in build(
            SECTIONS,
            recipe=REPO / "configs" / "demo-zh" / "pipeline.yaml",
            overrides={"quick": True, "compare": ["all"]},
        ).pipeline.arm_runs
    }
    assert [s.name for s in arms["plain"].specs] == ["data", "sft", "merged", "gguf", "eval"]
    # plain LoRA, as other toolkits train it
    assert arms["plain"].specs[1].options.get("modules_to_save") is None
    assert [s.name for s in arms["pt"].specs] == ["data", "pt2", "sft", "merged", "gguf", "eval"]
    assert [s.name for s in arms["full"].specs] == [s.name for s in a.specs]


def _sft(rel):
    from zhtune.train.sft import SftConfig

    cfg = build(
        SftConfig.section_types(),
        recipe=REPO / "configs" / rel,
        passthrough=SftConfig.passthrough(),
        into=SftConfig,
    )
    assert isinstance(cfg, SftConfig) and SftConfig.of(cfg) is cfg
    return cfg


def test_seed_sft_recipes():
    seven = "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj".split(",")
    c = _sft("chinese-llama/sft.yaml")  # Chinese-LLaMA-Alpaca scripts/training/run_sft.sh
    assert (c.train.learning_rate, c.lora.lora_rank, c.lora.lora_alpha, c.lora.lora_dropout) == (
        1e-4,
        8,
        32,
        0.05,
    )
    assert c.lora.trainable == seven and c.lora.modules_to_save == ["embed_tokens", "lm_head"]
    assert (c.data.max_seq_length, c.data.template, c.train.gradient_accumulation_steps) == (512, "alpaca", 8)

    v = _sft("chinese-vicuna/sft.yaml")  # Chinese-Vicuna finetune.py
    assert v.model.load_in_8bit and v.data.max_seq_length == 256 and v.lora.trainable == ["q_proj", "v_proj"]
    assert (v.lora.lora_rank, v.lora.lora_alpha, v.train.learning_rate) == (8, 16, 3e-4)
    assert v.train.per_device_train_batch_size * v.train.gradient_accumulation_steps == 128

    f = _sft("vicuna/sft_sharegpt_16gb.yaml")  # FastChat train_lora.py, QLoRA on a 16 GB card
    assert f.model.load_in_4bit and f.train.gradient_checkpointing and f.data.template == "vicuna"
    assert (f.lora.lora_rank, f.lora.lora_alpha) == (8, 16) and 512 <= f.data.max_seq_length <= 1024

    b = _sft("baichuan/sft_multiturn_qlora.yaml")
    assert b.model.load_in_4bit and b.model.trust_remote_code and b.data.template == "baichuan"
    assert "W_pack" in b.lora.trainable


def test_chinese_llama_pipeline_keeps_the_seed_settings():
    from zhtune.pipeline.recipe import SECTIONS

    a = build(SECTIONS, recipe=REPO / "configs" / "chinese-llama" / "pipeline.yaml").pipeline
    o = {s.name: s.options for s in a.specs}
    assert (
        o["pt"]["learning_rate"],
        o["pt"]["block_size"],
        o["sft"]["learning_rate"],
        o["sft"]["max_seq_length"],
    ) == (
        2e-4,
        512,
        1e-4,
        512,
    )
    for st in ("pt", "sft"):
        assert (o[st]["lora_rank"], o[st]["lora_alpha"], o[st]["lora_dropout"]) == (8, 32, 0.05)
        assert o[st]["modules_to_save"] == "embed_tokens,lm_head"
