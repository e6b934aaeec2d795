"""The verifiable rewards of zhtune grpo, scored from text alone: each kind, the per-record dispatch, your own
Python function loaded from a file, and the reply scoring they share with zhtune eval."""

from __future__ import annotations

import pytest

from zhtune.errors import ConfigError
from zhtune.eval import tasks
from zhtune.score import replies
from zhtune.train.rewards import KINDS, TaskReward, fields, load_function, score

NER = "人名：江泽民；地名：北京、上海；机构名：无"


@pytest.mark.parametrize(
    "kind,reply,reference,want",
    [
        ("label", "正面", "正面", 1.0),
        ("label", "答案：正面。", "正面", 1.0),  # names the label and no other
        ("label", "正面还是负面？", "正面", 0.0),  # names both
        ("label", "负面", "正面", 0.0),
        ("exact", "北京。", "北京", 1.0),
        ("exact", "在北京", "北京", 0.0),
        ("contains", "答案是北京。", "北京", 1.0),
        ("f1", NER, NER, 1.0),
        ("f1", "人名：江泽民；地名：北京；机构名：无", NER, pytest.approx(0.8)),  # 2 of 3 items, no wrong one
        (
            "f1",
            "人名：无；地名：无；机构名：无",
            "人名：无；地名：无；机构名：无",
            1.0,
        ),  # nothing to find, nothing found
        ("f1", "人名：李鹏", "人名：无", 0.0),
        ("length", "一二三四", "一二三四", 1.0),
        ("length", "一二", "一二三四", 0.5),
        ("length", "一二三四五六七八九", "一二三四", 0.0),
        ("format", "人名：甲；地名：乙；机构名：丙", NER, 1.0),
        ("format", "人名：甲；地名：乙", NER, pytest.approx(2 / 3)),
        ("format", "北京", "北京", 1.0),
        ("format", "北京\n上海", "北京", 0.0),
    ],
)
def test_each_kind(kind, reply, reference, want):
    assert score(kind, reply, reference, labels=["正面", "负面"]) == want


def test_regex_and_length_options():
    assert score("regex", "答案：42", "", pattern=r"\d+") == 1.0
    assert score("regex", "答案：无", "", pattern=r"\d+") == 0.0
    with pytest.raises(ConfigError, match="reward regex needs a pattern"):
        score("regex", "x", "")
    assert score("length", "一二三四", "一", target_length=4) == 1.0
    assert fields(NER) == ["人名", "地名", "机构名"] and "python" in KINDS


def test_task_reward_scores_each_record_by_its_kind_and_calls_your_function(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text(
        "CALLS = []\n"
        "def short(completions, references, **cols):\n"
        "    CALLS.append(cols['task'])\n"
        "    return [1.0 if len(c) <= len(r) else None for c, r in zip(completions, references)]\n",
        encoding="utf-8",
    )
    fn = load_function(f"{f}:short")
    r = TaskReward("task", labels=["正面", "负面"], function=fn)
    out = r(
        prompts=[[1], [2], [3], [4]],
        completions=["正面", NER, "很长很长的回答", "短"],
        reference=["正面", NER, "短", "较长的参考"],
        reward=["label", "f1", "python", "python"],
        task=["s", "n", "x", "y"],
        pattern=["", "", "", ""],
        trainer_state=object(),
    )
    assert out == [1.0, 1.0, None, 1.0] and r.__name__ == "task"
    assert fn.__globals__["CALLS"] == [["x", "y"]]  # one call for the batch, with the record columns
    extra = TaskReward("length", kind="length")
    assert extra(None, ["一二"], ["一二三四"], reward=["label"]) == [0.5]


def test_a_bad_reward_function_is_named(tmp_path):
    with pytest.raises(ConfigError, match="write it as path/to/file.py:function"):
        load_function("no_colon.py")
    with pytest.raises(ConfigError, match="does not exist"):
        load_function(f"{tmp_path / 'missing.py'}:f")
    f = tmp_path / "r.py"
    f.write_text("def f(completions, references, **kw):\n    return ['x']\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="has no function 'g'"):
        load_function(f"{f}:g")
    r = TaskReward("task", function=load_function(f"{f}:f"))
    with pytest.raises(ConfigError, match="--reward_fn returned str 'x'"):
        r(None, ["a"], ["b"], reward=["python"])
    with pytest.raises(ConfigError, match="returned 1 rewards for 2 completions"):
        r(None, ["a", "b"], ["b", "c"], reward=["python", "python"])


def test_eval_scores_replies_with_the_same_functions():
    assert (
        tasks.match is replies.match and tasks.items is replies.items and tasks.normalize is replies.normalize
    )
    assert replies.item_counts("人名：甲、乙", "人名：乙、丙") == (1, 1, 1)
    assert replies.f1(1, 1, 1) == (0.5, 0.5, 0.5)
