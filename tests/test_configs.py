"""Every shipped recipe under configs/ loads against its command's config sections.

The command comes from the file name: ``<command>[_<anything>].yaml`` (``pt_stage2.yaml`` -> zhtune pt),
or ``<command>_<subcommand>`` for commands with subcommands (``vocab_merge.yaml`` -> zhtune vocab merge).
"""

from __future__ import annotations

import importlib

import pytest
from conftest import REPO

from zhtune.cli import COMMANDS
from zhtune.config.parse import build

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
    module = sections_for(path)
    passthrough = {}
    if "train" in module.SECTIONS:
        from zhtune.train.trainer import training_arguments_fields

        passthrough = {"train": training_arguments_fields()}
    cfg = build(module.SECTIONS, recipe=path, passthrough=passthrough)
    assert cfg.to_dict()


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
