"""dpo and grpo as pipeline stages: after a LoRA SFT stage they continue its adapter, the merge after them folds
the aligned adapter in, and the shipped alignment recipe plans SFT -> DPO -> merge -> export -> eval."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

pytest.importorskip("trl")

from zhtune.cli import main as zhtune  # noqa: E402
from zhtune.errors import ConfigError  # noqa: E402
from zhtune.pipeline.stages import COMMANDS, State  # noqa: E402

RECIPE = REPO / "configs" / "demo-zh-align" / "pipeline.yaml"


def test_align_stages_continue_the_sft_adapter_and_feed_the_merge(tmp_path):
    st = State(model="base")
    sft = tmp_path / "sft"
    COMMANDS["sft"].advance(st, sft, {}, {}, True)
    o = COMMANDS["dpo"].wire({"train_files": ["p.json"]}, st, tmp_path / "dpo")
    assert (o["model_name_or_path"], o["peft_path"], o["output_dir"]) == (
        "base",
        str(sft),
        str(tmp_path / "dpo"),
    )
    COMMANDS["dpo"].advance(st, tmp_path / "dpo", o, {}, True)
    assert st.adapters == [str(tmp_path / "dpo")] and set(st.snapshots) == {"sft", "dpo"}
    m = COMMANDS["merge"].wire({}, st, tmp_path / "merged")
    assert m["lora_models"] == [str(tmp_path / "dpo")]  # the DPO adapter carries the SFT one it continued
    COMMANDS["merge"].advance(st, tmp_path / "merged", m, {}, True)
    g = COMMANDS["grpo"].wire({}, st, tmp_path / "grpo")
    assert "peft_path" not in g and g["model_name_or_path"] == str(tmp_path / "merged")  # a fresh adapter
    st.adapters = ["a", "b"]
    with pytest.raises(ConfigError, match="2 adapter.s. not merged yet; put a merge stage before it"):
        COMMANDS["dpo"].wire({}, st, tmp_path / "dpo2")
    st.adapters = ["a"]
    with pytest.raises(ConfigError, match="full needs a merged model"):
        COMMANDS["dpo"].wire({"finetuning_type": "full"}, st, tmp_path / "dpo2")


def test_shipped_alignment_recipe_plans_every_stage(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the quick variant's run_dir is relative
    run = Path("runs/demo-zh-align-quick")
    assert zhtune(["pipeline", str(RECIPE), "--quick", "--dry_run"]) == 0
    out = capsys.readouterr().out
    names = [ln.split()[1] for ln in out.splitlines() if ln.startswith("== ")]
    assert names == ["data", "sft", "dpo", "merged", "gguf", "eval"]
    dpo = out.split("== dpo (dpo)")[1].split("== merged")[0]
    assert f"peft_path: {run / 'sft'}" in dpo and "held_out_pairs: 60" in dpo and "max_steps: 20" in dpo
    merged = out.split("== merged (merge)")[1].split("== gguf")[0]
    assert f"lora_models: ['{run / 'dpo'}']" in merged
    assert f"{run / 'dpo'}/heldout_pairs.jsonl" in out.split("== eval (eval)")[1]
    assert not (tmp_path / run / "dpo").exists()  # a dry run runs nothing
