"""Reading Alpaca, ShareGPT, OpenAI messages and Chinese-Vicuna data; errors name file:line and the problem."""

from __future__ import annotations

import json

import pytest
from conftest import shared_asset

from zhtune.errors import DataError
from zhtune.text.records import ReadStats, iter_json_records, list_data_files, read_conversations, to_messages


def test_alpaca_with_input_system_and_history():
    fmt, msgs = to_messages(
        {"instruction": "翻译", "input": "hello", "output": "你好", "system": "S", "history": [["q1", "a1"]]}
    )
    assert fmt == "alpaca"
    assert msgs == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "翻译\nhello"},
        {"role": "assistant", "content": "你好"},
    ]


def test_sharegpt_and_messages_and_vicuna_chat():
    _, a = to_messages({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
    _, b = to_messages(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    )
    _, c = to_messages({"input": ["q"], "output": ["a"]})
    assert a == b == c == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_prompts_without_a_reply_for_evaluation():
    user = [{"role": "user", "content": "q"}]
    assert to_messages({"instruction": "q"}, reply=False)[1] == user
    assert to_messages({"instruction": "q", "output": ""}, reply=False)[1] == user
    assert to_messages({"conversations": [{"from": "human", "value": "q"}]}, reply=False)[1] == user
    _, msgs = to_messages({"instruction": "q", "output": "a"}, reply=False)
    assert msgs == [*user, {"role": "assistant", "content": "a"}]
    with pytest.raises(ValueError, match="out-of-order turns"):  # the other checks still hold
        to_messages({"messages": [{"role": "assistant", "content": "a"}]}, reply=False)
    with pytest.raises(ValueError, match="empty assistant turn"):  # for training an empty output is an error
        to_messages({"instruction": "q", "output": ""})


@pytest.mark.parametrize(
    "rec, problem",
    [
        ({"instruction": "q"}, "missing field 'output'"),
        ({"instruction": 3, "output": "a"}, "field 'instruction' must be a string, got int"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "unknown role 'robot'"),
        (
            {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
            "out-of-order turns",
        ),
        ({"conversations": [{"from": "human", "value": "q"}]}, "ends with a user turn"),
        (
            {"conversations": [{"from": "human", "value": " "}, {"from": "gpt", "value": "a"}]},
            "empty user turn",
        ),
        ({"conversations": []}, "no user/assistant turns"),
        ({"messages": "hi"}, "'messages' must be a list"),
        ({"input": ["a", "b"], "output": ["c"]}, "'input' has 2 turns but 'output' has 1"),
        ({"prompt": "x", "completion": "y"}, "unknown record format"),
        (["not", "an", "object"], "must be a JSON object"),
    ],
)
def test_bad_records_are_explained(rec, problem):
    with pytest.raises(ValueError, match=problem):
        to_messages(rec)


def test_json_array_errors_name_the_line(tmp_path):
    p = tmp_path / "data.json"
    recs = [{"instruction": "a", "output": "b"}, {"instruction": "c"}]
    p.write_text(json.dumps(recs, indent=2), encoding="utf-8")
    with pytest.raises(DataError) as e:
        list(read_conversations([p]))
    assert str(e.value).startswith(f"{p}:6: missing field 'output'")
    assert "--skip_bad_records" in str(e.value)


def test_malformed_json_names_line_and_column(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": }\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{p}:2: malformed JSON \(Expecting value at column 32\)"):
        list(read_conversations([p]))
    q = tmp_path / "arr.json"
    q.write_text(
        '[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]', encoding="utf-8"
    )
    with pytest.raises(DataError, match=rf"{q}:3: malformed JSON"):
        list(read_conversations([q]))


def test_skip_bad_records_counts_them(tmp_path):
    p = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"instruction": "好", "output": "是"}, ensure_ascii=False),
        "{broken",
        json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
        json.dumps({"instruction": "q"}),
        "",
    ]
    p.write_bytes(("\r\n".join(lines)).encode("utf-8") + b"\xff\xfe bad bytes\n")
    stats = ReadStats()
    got = list(read_conversations([p], skip_bad_records=True, stats=stats))
    assert [line for _, line, _ in got] == [1, 3]
    assert stats.records == 5 and stats.bad == 3
    assert stats.formats == {"alpaca": 1, "sharegpt": 1}


def test_bom_and_crlf_are_fine(tmp_path):
    p = tmp_path / "bom.json"
    p.write_bytes(
        b"\xef\xbb\xbf" + json.dumps([{"instruction": "q", "output": "a"}]).replace(",", ",\r\n").encode()
    )
    assert len(list(read_conversations([p]))) == 1


def test_invalid_utf8_names_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"instruction": "q", "output": "a"}\n{"instruction": "\xff", "output": "a"}\n')
    with pytest.raises(DataError, match=rf"{p}:2: not valid UTF-8"):
        list(iter_json_records(p))


def test_dataset_dir_lists_json_and_jsonl(tmp_path):
    (tmp_path / "a.json").write_text("[]")
    (tmp_path / "b.jsonl").write_text("")
    (tmp_path / "c.txt").write_text("x")
    assert [p.name for p in list_data_files(tmp_path, None)] == ["a.json", "b.jsonl"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no .json or .jsonl"):
        list_data_files(empty, None)
    with pytest.raises(DataError, match="is not a directory"):
        list_data_files(tmp_path / "a.json", None)


def test_shared_samples_read_cleanly():
    for rel in (
        "data/alpaca_zh_demo.json",
        "data/sharegpt_dummy_conversation.json",
        "data/chinese_vicuna_chat_sample.jsonl",
    ):
        p = shared_asset(rel)
        stats = ReadStats()
        n = sum(1 for _ in read_conversations([p], skip_bad_records=True, stats=stats))
        assert n > 0 and n + stats.bad == stats.records
