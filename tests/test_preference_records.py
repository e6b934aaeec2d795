"""Preference record readers: every layout people ship, multi-turn prompts, file:line errors, counted skips,
the real LLaMA-Factory DPO demo, and the deterministic held-out split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import shared_asset

from zhtune.errors import DataError
from zhtune.text.preference import (
    Pair,
    Unpaired,
    read_preferences,
    split_held_out,
    to_preference,
    write_held_out_split,
)
from zhtune.text.records import ReadStats

U = {"role": "user", "content": "北京在哪里？"}
A = {"role": "assistant", "content": "在华北平原。"}
U2 = {"role": "user", "content": "Say it in English."}
SYS = {"role": "system", "content": "你是助手。"}
GOOD, BAD = "It is on the North China Plain.", "I do not know."

# (record, layout, expected example)
LAYOUTS = [
    (  # LLaMA-Factory, as in dpo_zh_demo.json
        {
            "conversations": [{"from": "human", "value": U["content"]}],
            "chosen": {"from": "gpt", "value": GOOD},
            "rejected": {"from": "gpt", "value": BAD},
        },
        "sharegpt",
        Pair([U], GOOD, BAD),
    ),
    (  # LLaMA-Factory with a system field and a multi-turn prompt
        {
            "conversations": [
                {"from": "human", "value": U["content"]},
                {"from": "gpt", "value": A["content"]},
                {"from": "human", "value": U2["content"]},
            ],
            "system": SYS["content"],
            "chosen": {"from": "gpt", "value": GOOD},
            "rejected": {"from": "gpt", "value": BAD},
        },
        "sharegpt",
        Pair([SYS, U, A, U2], GOOD, BAD),
    ),
    (  # ShareGPT variant: role/content turns, string replies, system as a turn
        {"conversations": [SYS, U], "chosen": GOOD, "rejected": BAD},
        "sharegpt",
        Pair([SYS, U], GOOD, BAD),
    ),
    ({"messages": [U, A, U2], "chosen": GOOD, "rejected": BAD}, "messages", Pair([U, A, U2], GOOD, BAD)),
    (
        {
            "messages": [U],
            "chosen": {"role": "assistant", "content": GOOD},
            "rejected": {"role": "assistant", "content": BAD},
        },
        "messages",
        Pair([U], GOOD, BAD),
    ),
    ({"prompt": U["content"], "chosen": GOOD, "rejected": BAD}, "prompt", Pair([U], GOOD, BAD)),
    (
        {"prompt": U["content"], "system": SYS["content"], "chosen": GOOD, "rejected": BAD},
        "prompt",
        Pair([SYS, U], GOOD, BAD),
    ),
    (  # UltraFeedback: replies repeat the prompt
        {
            "prompt": U["content"],
            "chosen": [U, {"role": "assistant", "content": GOOD}],
            "rejected": [U, {"role": "assistant", "content": BAD}],
        },
        "prompt",
        Pair([U], GOOD, BAD),
    ),
    (  # TRL conversational: prompt messages, replies as one-message lists
        {
            "prompt": [U, A, U2],
            "chosen": [{"role": "assistant", "content": GOOD}],
            "rejected": [{"role": "assistant", "content": BAD}],
        },
        "prompt",
        Pair([U, A, U2], GOOD, BAD),
    ),
    (  # implicit prompt: whole conversations that share it
        {
            "chosen": [SYS, U, A, U2, {"role": "assistant", "content": GOOD}],
            "rejected": [SYS, U, A, U2, {"role": "assistant", "content": BAD}],
        },
        "implicit",
        Pair([SYS, U, A, U2], GOOD, BAD),
    ),
    (  # LLaMA-Factory ranking Alpaca
        {
            "instruction": "翻译",
            "input": "你好",
            "history": [[U["content"], A["content"]]],
            "chosen": GOOD,
            "rejected": BAD,
        },
        "alpaca",
        Pair([U, A, {"role": "user", "content": "翻译\n你好"}], GOOD, BAD),
    ),
    ({"prompt": U["content"], "completion": GOOD, "label": True}, "kto_prompt", Unpaired([U], GOOD, True)),
    (  # LLaMA-Factory KTO: the last message is the reply
        {"messages": [U, A, U2, {"role": "assistant", "content": BAD}], "label": False},
        "kto_messages",
        Unpaired([U, A, U2], BAD, False),
    ),
    (
        {"prompt": [SYS, U], "completion": [{"role": "assistant", "content": GOOD}], "label": True},
        "kto_prompt",
        Unpaired([SYS, U], GOOD, True),
    ),
]


@pytest.mark.parametrize("rec,layout,want", LAYOUTS)
def test_every_layout_is_read(rec, layout, want):
    assert to_preference(rec) == (layout, want)


BAD_RECORDS = [
    ({"conversations": [U], "chosen": GOOD}, "missing field 'rejected'"),
    ({"messages": [U, A], "chosen": GOOD, "rejected": BAD}, "must end with the user turn"),
    ({"messages": [U], "chosen": GOOD, "rejected": GOOD}, "the same reply"),
    ({"messages": [U], "chosen": "  ", "rejected": BAD}, "the chosen reply is empty"),
    ({"messages": [U], "chosen": U, "rejected": BAD}, "'chosen' must be one assistant reply"),
    ({"messages": [{"role": "bot", "content": "x"}], "chosen": GOOD, "rejected": BAD}, "unknown role 'bot'"),
    ({"messages": [U, U2], "chosen": GOOD, "rejected": BAD}, "out-of-order turns"),
    ({"prompt": 3, "chosen": GOOD, "rejected": BAD}, "'prompt' must be a string or a list"),
    ({"chosen": GOOD, "rejected": BAD}, "no prompt"),
    ({"prompt": "x", "completion": GOOD, "label": "yes"}, "must be true or false"),
    ({"prompt": "x", "completion": GOOD}, "needs a 'label'"),
    ({"question": "x", "answer": GOOD}, "not a preference record (fields: answer, question)"),
    (["x"], "must be a JSON object"),
]


@pytest.mark.parametrize("rec,problem", BAD_RECORDS)
def test_bad_records_name_file_line_and_problem(tmp_path, rec, problem):
    good = {"prompt": "hi", "chosen": GOOD, "rejected": BAD}
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in (good, good, rec)) + "\n")
    with pytest.raises(DataError) as e:
        list(read_preferences([p]))
    assert str(e.value).startswith(f"{p}:3: ")
    assert problem in e.value.problem and "--skip_bad_records" in e.value.problem


def test_json_array_lines_are_the_record_start(tmp_path):
    good = {"prompt": "hi", "chosen": GOOD, "rejected": BAD}
    p = tmp_path / "pairs.json"
    p.write_text(json.dumps([good, good, {"prompt": "hi", "chosen": GOOD}], indent=2))
    starts = [i + 1 for i, line in enumerate(p.read_text().splitlines()) if line == "  {"]
    start = starts[2]  # the line of the third record's opening brace
    with pytest.raises(DataError, match=rf"pairs.json:{start}: missing field 'rejected'"):
        list(read_preferences([p]))


def test_skip_bad_records_counts_each_problem(tmp_path):
    good = json.dumps({"messages": [U], "chosen": GOOD, "rejected": BAD}, ensure_ascii=False)
    kto = json.dumps({"prompt": "x", "completion": GOOD, "label": True})
    lines = [good, "{not json", kto, good, json.dumps({"messages": [U], "chosen": GOOD}), "", good]
    p = tmp_path / "mixed.jsonl"
    p.write_text("\n".join(lines) + "\n")
    stats = ReadStats()
    got = list(read_preferences([p], skip_bad_records=True, stats=stats))
    assert [line for _, line, _ in got] == [1, 4, 7]
    assert stats.records == 6 and stats.bad == 3  # the blank line is not a record
    assert stats.formats == {"messages": 3}
    assert set(stats.problems) == {
        "malformed JSON (Expecting property name enclosed in double quotes at column 2)",
        "an unpaired KTO record (a 'label', no 'chosen'/'rejected'); only KTO takes it",
        "missing field 'rejected'",
    }


def test_pairs_unpair_for_kto(tmp_path):
    p = tmp_path / "p.jsonl"
    recs = [
        {"messages": [U], "chosen": GOOD, "rejected": BAD},
        {"prompt": "x", "completion": BAD, "label": False},
    ]
    p.write_text("\n".join(json.dumps(r) for r in recs))
    got = [x for _, _, x in read_preferences([p], kind="unpaired")]
    assert got == [
        Unpaired([U], GOOD, True),
        Unpaired([U], BAD, False),
        Unpaired([{"role": "user", "content": "x"}], BAD, False),
    ]


def test_the_real_llama_factory_dpo_demo_reads_fully():
    path = shared_asset("data/dpo_zh_demo.json")
    stats = ReadStats()
    pairs = [x for _, _, x in read_preferences([path], stats=stats)]
    assert stats.records == len(pairs) == 300 and stats.bad == 0
    assert sum(p.prompt[0]["role"] == "system" for p in pairs) == 64
    raw = json.loads(path.read_text(encoding="utf-8"))
    for rec, pair in zip(raw, pairs):
        assert pair.chosen == rec["chosen"]["value"] and pair.rejected == rec["rejected"]["value"]
        assert pair.prompt[-1] == {"role": "user", "content": rec["conversations"][-1]["value"]}


def _pairs_file(path: Path, n_prompts: int, per_prompt: int) -> Path:
    recs = [
        {"prompt": f"问题 {i}", "chosen": f"好的回答 {i}.{j}", "rejected": f"差的回答 {i}.{j}"}
        for i in range(n_prompts)
        for j in range(per_prompt)
    ]
    path.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    return path


def test_held_out_split_is_deterministic_and_keeps_prompts_apart(tmp_path):
    p = _pairs_file(tmp_path / "pairs.json", n_prompts=30, per_prompt=2)
    a = split_held_out([p], held_out=0.2, seed=1)
    b = split_held_out([p], held_out=0.2, seed=1)
    c = split_held_out([p], held_out=0.2, seed=2)
    assert a.held_out == b.held_out and a.train == b.train
    assert a.held_out != c.held_out
    assert len(a.held_out) == 12 and len(a.train) == 48 and a.prompts == 30
    assert not {r["prompt"] for r in a.train} & {r["prompt"] for r in a.held_out}
    everything = json.loads(p.read_text(encoding="utf-8"))
    assert sorted(a.train + a.held_out, key=everything.index) == everything
    assert a.train == [r for r in everything if r in a.train]  # file order kept
    # a whole number is a count, rounded up to whole prompts
    assert len(split_held_out([p], held_out=5, seed=1).held_out) == 6


def test_held_out_split_writes_files_the_reader_takes(tmp_path):
    p = _pairs_file(tmp_path / "pairs.json", n_prompts=10, per_prompt=1)
    split = write_held_out_split([p], tmp_path / "train.jsonl", tmp_path / "held.jsonl", held_out=0.3, seed=0)
    held = [x.prompt[0]["content"] for _, _, x in read_preferences([tmp_path / "held.jsonl"])]
    train = [x.prompt[0]["content"] for _, _, x in read_preferences([tmp_path / "train.jsonl"])]
    assert held == [r["prompt"] for r in split.held_out] and len(held) == 3 and len(train) == 7


def test_held_out_split_refuses_to_hold_out_everything(tmp_path):
    p = _pairs_file(tmp_path / "pairs.json", n_prompts=1, per_prompt=4)
    with pytest.raises(DataError, match="cannot hold out 1 of 4 records .1 distinct prompts"):
        split_held_out([p], held_out=0.25, seed=0)
    p = _pairs_file(tmp_path / "pairs.json", n_prompts=4, per_prompt=1)
    with pytest.raises(ValueError, match="fraction in"):
        split_held_out([p], held_out=1.5, seed=0)
