"""Shipped merge/export recipes load against their commands' config sections."""

from __future__ import annotations

from pathlib import Path

import pytest

from zhtune.config.parse import build

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").rglob("merge*.yaml")), ids=lambda p: p.name)
def test_merge_recipes_load(recipe):
    from zhtune.merge.merge import SECTIONS

    cfg = build(SECTIONS, recipe=recipe)
    assert cfg.merge.lora_models and cfg.merge.output_dir
    assert cfg.model.model_name_or_path != "default"
    if recipe.name == "merge_plus.yaml":
        assert [Path(p).name for p in cfg.merge.lora_models] == [
            "chinese-llama-plus-lora-7b",
            "chinese-alpaca-plus-lora-7b",
        ]
