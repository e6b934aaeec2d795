"""zhtune grpo on a tiny random model: prompts are zhtune's token ids, replies stop at the template's end of turn,
every reward kind is scored per record, TRL's reward metrics are logged, and a resumed run matches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_tiny_model

pytest.importorskip("trl")

from zhtune.text.encode import SegmentEncoder  # noqa: E402
from zhtune.train import grpo, rewards  # noqa: E402
from zhtune.train.rewards import KINDS  # noqa: E402

NER = "人名：江泽民；地名：北京；机构名：无"


def write_records(path: Path) -> Path:
    """One record per reward kind: a 'reward' field, a 'task' field (looked up in --task_rewards) or neither."""
    recs = [
        {
            "instruction": "这条评论是正面还是负面？",
            "input": "质量很好",
            "output": "正面",
            "task": "sentiment",
        },
        {"instruction": "找出人名和地名。", "input": "江泽民在北京", "output": NER, "task": "ner"},
        {"instruction": "北京是哪国的首都？", "output": "中国"},  # --reward: exact
        {"instruction": "请回答北京在哪里。", "output": "北京", "reward": "contains"},
        {"instruction": "给出一个数字。", "output": "42", "reward": "regex", "pattern": r"\d"},
        {"instruction": "写一句话。", "output": "今天天气很好。", "reward": "length"},
        {"instruction": "按格式回答人名和地名。", "output": NER, "reward": "format"},
        {"instruction": "简短回答：你好", "output": "你好", "reward": "python"},
    ]
    path.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, bpe_tokenizer_dir):
    root = tmp_path_factory.mktemp("grpo")
    model = make_tiny_model(bpe_tokenizer_dir, root / "model", tie=True)
    fn = root / "my_reward.py"
    fn.write_text(
        "def short(completions, references, **cols):\n    return [1.0 / (1 + len(c)) for c in completions]\n"
    )
    return root, model, write_records(root / "records.json"), fn


def cfg(root: Path, model: Path, data: Path, fn: Path, out: str, **kw) -> dict:
    return {"model_name_or_path": str(model), "train_files": [str(data)], "output_dir": str(root / out),
            "max_steps": 2, "per_device_train_batch_size": 16, "num_generations": 2, "max_completion_length": 8,
            "max_seq_length": 96, "logging_steps": 1, "save_steps": 2, "learning_rate": 1e-3, "lora_rank": 4,
            "lora_alpha": 8, "template": "chatml", "report_to": "none", "overwrite_output_dir": True,
            "reward": "exact", "task_rewards": {"sentiment": "label", "ner": "f1"},
            "extra_rewards": ["length", "format"], "reward_fn": f"{fn}:short", **kw}  # fmt: skip


def test_prompts_are_zhtunes_ids_and_replies_stop_at_the_end_of_turn(setup):
    root, model, data, fn = setup
    run = grpo.build(cfg(root, model, data, fn, "built"))
    tok, ds = run.ctx.tokenizer, run.trainer.train_dataset
    enc = SegmentEncoder(tok)
    for row in ds:
        assert row["prompt"] == enc.prompt_ids(run.fmt, json.loads(row["messages"]))
    assert tok.decode(ds[0]["prompt"]).endswith("<|im_start|>assistant\n")
    assert run.trainer._tokenize_prompts([ds[0]["prompt"]]) == ([ds[0]["prompt"]], None, {})
    assert tok.convert_tokens_to_ids("<|im_end|>") in run.trainer.eos_token_ids
    assert sorted(set(ds["reward"])) == sorted(KINDS)
    assert [f.__name__ for f in run.trainer.reward_funcs] == ["task", "length", "format"]
    assert run.trainer.ref_model is None and list(run.trainer.model.peft_config) == ["default"]


def test_two_steps_score_every_reward_kind(setup, monkeypatch):
    root, model, data, fn = setup
    seen: list[str] = []
    real = rewards.score

    def spy(kind, *a, **kw):
        seen.append(kind)
        return real(kind, *a, **kw)

    monkeypatch.setattr(rewards, "score", spy)
    s = grpo.main(cfg(root, model, data, fn, "two"))
    logged = [h for h in s["log_history"] if "reward" in h]
    assert [h["step"] for h in logged] == [1, 2]
    for h in logged:
        assert {"rewards/task/mean", "rewards/length/mean", "rewards/format/mean", "reward_std"} <= set(h)
        assert 0.0 <= h["rewards/task/mean"] <= 1.0
    assert set(seen) == set(KINDS) - {"python"}  # python: the file's function, not score()
    out = root / "two"
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss_curve.png").is_file()
    assert not (out / "ref").exists()


def test_a_resumed_run_repeats_the_uninterrupted_one(setup):
    """Within an epoch (8 prompts, 2 a step): TRL's prompt sampler draws a new order each epoch from a generator
    of its own, which a checkpoint does not hold, so across an epoch boundary the order differs."""
    root, model, data, fn = setup
    full = grpo.main(cfg(root, model, data, fn, "whole", max_steps=4, per_device_train_batch_size=4))
    part = root / "resumed"
    part.mkdir(exist_ok=True)
    shutil.copytree(root / "whole" / "checkpoint-2", part / "checkpoint-2")
    again = grpo.main(
        cfg(root, model, data, fn, "resumed", max_steps=4, per_device_train_batch_size=4,
            overwrite_output_dir=False, resume_from_checkpoint="true")
    )  # fmt: skip

    def curve(s):
        return [
            (h["step"], h["reward"], h["loss"]) for h in s["log_history"] if "reward" in h and h["step"] > 2
        ]

    assert len(curve(full)) == 2 and curve(again) == curve(full)
