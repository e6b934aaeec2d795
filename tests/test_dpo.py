"""zhtune dpo on tiny random models: every loss from a recipe and flags, TRL's metrics in the log, outputs plain peft
loads, the reference of each setup (adapter disabled, frozen SFT adapter, a copy, precomputed), TRL's defaults
giving way to zhtune's, and the reply spans TRL's collator trains on."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from pref_helpers import write_pairs

pytest.importorskip("trl")

from zhtune.cli import main as cli_main  # noqa: E402
from zhtune.errors import ConfigError  # noqa: E402
from zhtune.text.preference import read_preferences  # noqa: E402
from zhtune.train import dpo  # noqa: E402
from zhtune.train.args import build_training_arguments  # noqa: E402

PAIRED = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, bpe_tokenizer_dir):
    root = tmp_path_factory.mktemp("dpo")
    model = make_tiny_model(bpe_tokenizer_dir, root / "model", tie=True, init_std=0.2)
    return root, model, write_pairs(root / "pairs.jsonl")


def flags(out: Path, cache: Path, **kw) -> list[str]:
    opts = {"output_dir": out, "data_cache_dir": cache, "max_steps": 2, "per_device_train_batch_size": 2,
            "logging_steps": 1, "save_steps": 2, "learning_rate": 1e-3, "lora_rank": 4, "lora_alpha": 8,
            "max_seq_length": 96, "template": "chatml", **kw}  # fmt: skip
    return [x for k, v in opts.items() for x in (f"--{k}", str(v))]


def steps(out: Path) -> list[dict]:
    return [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]


@pytest.mark.parametrize("loss", dpo.LOSSES)
def test_every_loss_trains_from_a_recipe_and_flags(setup, loss):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, model, pairs = setup
    recipe = root / f"dpo_{loss}.yaml"
    recipe.write_text(
        f"model_name_or_path: {model}\ntrain_files: [{pairs}]\nloss: {loss}\n", encoding="utf-8"
    )
    out = root / f"out-{loss}"
    extra = {"report_to": "tensorboard"} if loss == "dpo" else {"report_to": "none"}
    assert cli_main(["dpo", str(recipe), *flags(out, root / "cache", **extra)]) == 0
    logged = steps(out)
    assert [h["step"] for h in logged] == [1, 2]  # every step logged, with TRL's metric names
    want = ("rewards/chosen", "rewards/rejected") if loss == "kto" else PAIRED
    assert all(k in h for h in logged for k in want), logged[0].keys()
    for name in ("adapter_config.json", "adapter_model.safetensors", "loss_curve.png", "zhtune_config.yaml"):
        assert (out / name).is_file(), name
    assert (
        not (out / "ref").exists() and not (out / "checkpoint-2" / "ref").exists()
    )  # only the trained adapter
    if loss == "dpo":
        assert list((out / "runs").rglob("events.out.tfevents.*")), "no TensorBoard log"
    assert f"loss: {loss}" in (out / "zhtune_config.yaml").read_text()
    base = AutoModelForCausalLM.from_pretrained(str(model))
    tuned = PeftModel.from_pretrained(base, str(out))  # plain peft, nothing of zhtune
    assert list(tuned.peft_config) == ["default"]
    b_weights = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in b_weights)  # the adapter trained


def dpo_cfg(root: Path, model: Path, pairs: Path, out: str, **kw) -> dict:
    return {"model_name_or_path": str(model), "train_files": [str(pairs)], "output_dir": str(root / out),
            "data_cache_dir": str(root / "cache"), "max_steps": 2, "per_device_train_batch_size": 2,
            "logging_steps": 1, "save_steps": 10, "learning_rate": 1e-3, "lora_rank": 4, "lora_alpha": 8,
            "max_seq_length": 96, "template": "chatml", "report_to": "none", "overwrite_output_dir": True,
            **kw}  # fmt: skip


def test_lora_reference_is_the_adapter_disabled_or_the_frozen_sft_adapter(setup):
    root, model, pairs = setup
    fresh = dpo.build(dpo_cfg(root, model, pairs, "ref-fresh"))
    m = fresh.trainer.model
    assert fresh.trainer.ref_model is None and list(m.peft_config) == ["default"]  # no copy at all
    assert fresh.trainer.dropped_reference_copy
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)

    sft = dpo.main(dpo_cfg(root, model, pairs, "sft-like", max_steps=2))["output_dir"]  # stands in for SFT
    cont = dpo.build(dpo_cfg(root, model, pairs, "ref-cont", peft_path=sft))
    m = cont.trainer.model
    assert cont.trainer.ref_model is None and set(m.peft_config) == {"default", "ref"}
    params = dict(m.named_parameters())
    pairs_ = [(n, n.replace(".default.", ".ref.")) for n in params if ".default." in n]
    assert pairs_ and all(torch.equal(params[a], params[b]) for a, b in pairs_)  # ref = the SFT adapter
    assert not any(params[b].requires_grad for _, b in pairs_)
    cont.ctx.fit(cont.trainer)
    params = dict(cont.trainer.model.named_parameters())
    assert any(not torch.equal(params[a], params[b]) for a, b in pairs_)  # the policy moved, the ref did not
    cont.trainer.save_model(str(root / "ref-cont-save"))
    assert not (root / "ref-cont-save" / "ref").exists()


def test_full_fine_tuning_reference_copy_equals_precomputed(setup):
    root, model, pairs = setup
    run = dpo.build(dpo_cfg(root, model, pairs, "full-copy", finetuning_type="full"))
    ref = run.trainer.ref_model
    assert ref is not None and not {id(p) for p in ref.parameters()} & {
        id(p) for p in run.trainer.model.parameters()
    }
    assert not any(p.requires_grad for p in ref.parameters())
    run.ctx.fit(run.trainer)
    pre = dpo.main(
        dpo_cfg(root, model, pairs, "full-pre", finetuning_type="full", precompute_ref_log_probs=True)
    )
    got = [h for h in pre["log_history"] if "loss" in h]
    want = [h for h in run.trainer.state.log_history if "loss" in h]
    for a, b in zip(got, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)
    assert (root / "full-pre" / "model.safetensors").is_file()


def test_trls_collator_trains_on_exactly_the_reply_and_its_end_of_turn(setup):
    root, model, pairs = setup
    run = dpo.build(dpo_cfg(root, model, pairs, "spans", max_seq_length=256))
    assert run.report.ok == run.report.records == 8  # nothing cut
    tok, ds = run.ctx.tokenizer, run.trainer.train_dataset
    batch = run.trainer.data_collator([ds[0], ds[1]])
    texts = [tok.decode(ids[m.bool()]) for ids, m in zip(batch["input_ids"], batch["completion_mask"])]
    read = [x for _, _, x in read_preferences([pairs])]
    known = {x.chosen for x in read} | {x.rejected for x in read}
    assert len(texts) == 4 and all(
        t.endswith("<|im_end|>") and t[: -len("<|im_end|>")] in known for t in texts
    )
    prompts = [
        tok.decode(ids[: int(m.argmax())]) for ids, m in zip(batch["input_ids"], batch["completion_mask"])
    ]
    assert all(p.endswith("<|im_start|>assistant\n") for p in prompts)  # the prompt carries no loss


def test_trl_defaults_give_way_to_zhtunes(tmp_path):
    cfg = dpo.DpoConfig.of({"output_dir": str(tmp_path), "loss": "kto", "disable_dropout": False})
    cls, own = cfg.arguments()
    a = build_training_arguments(cfg.train, has_eval=False, device="cpu", cls=cls, own=own)
    assert type(a).__name__ == "KTOConfig" and a.train_sampling_strategy == "sequential"
    assert a.learning_rate == 5e-5 and not a.bf16 and not a.gradient_checkpointing  # TRL: 1e-6, True, True
    assert (
        a.logging_steps == 10 and a.report_to == ["tensorboard"] and a.beta == 0.1 and not a.disable_dropout
    )
    simpo = dpo.DpoConfig.of({"output_dir": str(tmp_path), "loss": "simpo"})
    a = build_training_arguments(simpo.train, has_eval=False, device="cpu", cls=simpo.arguments()[0],
                                 own=simpo.arguments()[1])  # fmt: skip
    assert (a.loss_type, a.beta, a.cpo_alpha, a.simpo_gamma) == ("simpo", 2.0, 0.0, 0.5)
    with pytest.raises(ConfigError, match="unknown option 'loss_type'"):
        dpo.DpoConfig.of({"loss_type": "ipo"})  # --loss says it
    wrong = dpo.DpoConfig.of({"output_dir": str(tmp_path), "max_completion_length": 8})  # ORPO's, not DPO's
    with pytest.raises(ConfigError, match="unknown training options: max_completion_length"):
        build_training_arguments(wrong.train, has_eval=False, device="cpu", cls=wrong.arguments()[0])
    with pytest.raises(ConfigError, match="--precompute_ref_log_probs: --loss orpo uses no reference"):
        dpo.DpoConfig.of({"loss": "orpo", "precompute_ref_log_probs": True})
    assert dataclasses.asdict(dpo.PrefArgs())["loss"] == "dpo"


def test_trl_tokenization_is_passed_over_only_for_zhtunes_columns():
    from datasets import Dataset

    from zhtune.train.pref_trainers import ZhORPOTrainer, check_columns

    raw = Dataset.from_list([{"prompt": "你好", "chosen": "好", "rejected": "不好"}])
    with pytest.raises(ConfigError, match="ZhDPOTrainer takes zhtune's encoded dpo columns; this dataset lacks "
                       "prompt_ids, chosen_ids, rejected_ids"):  # fmt: skip
        check_columns(raw, "dpo", "ZhDPOTrainer")
    with pytest.raises(ConfigError, match="lacks prompt_input_ids"):
        ZhORPOTrainer.tokenize_row(object.__new__(ZhORPOTrainer), raw[0])
