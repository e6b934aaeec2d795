"""zhtune recipes list/copy over the shipped configs/."""

from __future__ import annotations

import pytest
from conftest import REPO

from zhtune.cli import main as zhtune
from zhtune.errors import ConfigError
from zhtune.recipes import copy, recipes


def test_list_shows_every_recipe_with_its_command(capsys):
    assert zhtune(["recipes", "list"]) == 0
    out = capsys.readouterr().out
    shipped = sorted(
        p.relative_to(REPO / "configs").with_suffix("") for p in (REPO / "configs").rglob("*.yaml")
    )
    assert shipped and all(str(s) in out for s in shipped)
    line = next(ln for ln in out.splitlines() if ln.startswith("demo-zh/pipeline "))
    assert line.split()[1] == "pipeline" and "CPU demo" in line


def test_copy_one_or_a_folder(tmp_path, capsys):
    assert zhtune(["recipes", "copy", "demo-zh/pipeline", str(tmp_path)]) == 0
    assert (tmp_path / "pipeline.yaml").read_bytes() == (REPO / "configs/demo-zh/pipeline.yaml").read_bytes()
    assert f"zhtune pipeline {tmp_path / 'pipeline.yaml'}" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="already exist.*--force"):
        copy("demo-zh/pipeline", tmp_path)
    assert copy("demo-zh/pipeline", tmp_path, force=True) == [tmp_path / "pipeline.yaml"]
    folder = copy("demo-zh", tmp_path / "f")
    assert folder and all(p.parent == tmp_path / "f" / "demo-zh" for p in folder)
    assert set(p.name for p in folder) == {p.name for p in (REPO / "configs/demo-zh").glob("*.yaml")}


def test_copy_unknown_suggests(tmp_path, capsys):
    assert zhtune(["recipes", "copy", "demo-zh/pipelin", str(tmp_path)]) == 2
    assert "no recipe 'demo-zh/pipelin' (did you mean demo-zh/pipeline?)" in capsys.readouterr().err
    assert set(recipes()) >= {"demo-zh/pipeline"}
