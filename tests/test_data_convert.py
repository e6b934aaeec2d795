"""zhtune data convert and merge: round trips between the four formats, ids, bad records, through the CLI."""

from __future__ import annotations

import json

import pytest
from conftest import shared_asset
from hypothesis import given, settings
from hypothesis import strategies as st

from zhtune.cli import main as zhtune
from zhtune.data.jsonl import detect_layout, iter_raw, parse
from zhtune.text.formats import FORMATS, from_messages
from zhtune.text.records import to_messages


def load(path):
    return [parse(p) for _, p, _ in iter_raw(path, detect_layout(path))]


def convert(src, dst, to, *extra):
    return zhtune(["data", "convert", "--in_file", str(src), "--out_file", str(dst), "--to", to, *extra])


@pytest.mark.parametrize(
    "sample", ["data/sharegpt_dummy_conversation.json", "data/chinese_vicuna_chat_sample.jsonl"]
)
def test_round_trip_through_every_format(tmp_path, sample):
    src = shared_asset(sample)
    original = [to_messages(r)[1] for r in load(src)]
    for a in FORMATS:
        assert convert(src, tmp_path / f"{a}.jsonl", a) == 0
        for b in FORMATS:
            out = tmp_path / f"{a}-{b}.json"
            assert convert(tmp_path / f"{a}.jsonl", out, b) == 0
            recs = load(out)
            assert {to_messages(r)[0] for r in recs} == {b}
            assert [to_messages(r)[1] for r in recs] == original, (a, b)


def test_vicuna_chat_round_trip_is_exact(tmp_path):
    src = shared_asset("data/chinese_vicuna_chat_sample.jsonl")
    chain = ["sharegpt", "messages", "alpaca", "vicuna_chat"]
    prev = src
    for i, fmt in enumerate(chain):
        out = tmp_path / f"{i}.jsonl"
        assert convert(prev, out, fmt) == 0
        prev = out
    assert load(prev) == load(src)


def test_ids_and_other_fields_are_carried_over(tmp_path):
    src = shared_asset("data/sharegpt_dummy_conversation.json")
    assert convert(src, tmp_path / "a.jsonl", "alpaca") == 0
    recs = load(tmp_path / "a.jsonl")
    assert [r["id"] for r in recs] == [r["id"] for r in load(src)]
    assert "history" in recs[0] and recs[0]["instruction"] == "Have a nice day!"


def test_system_prompt_cannot_become_vicuna_chat(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(
        json.dumps({"system": "你是助手", "instruction": "你好", "output": "你好！"}, ensure_ascii=False)
        + "\n"
        + json.dumps({"instruction": "1+1=?", "output": "2"})
        + "\n"
    )
    assert convert(src, tmp_path / "out.jsonl", "vicuna_chat") == 0
    out = capsys.readouterr().out
    assert "not representable in vicuna_chat" in out
    assert load(tmp_path / "out.jsonl") == [{"input": ["1+1=?"], "output": ["2"]}]


text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20
).filter(str.strip)


@settings(max_examples=60, deadline=None)
@given(system=st.one_of(st.just(""), text), pairs=st.lists(st.tuples(text, text), min_size=1, max_size=4))
def test_from_messages_inverts_to_messages(system, pairs):
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        m for q, a in pairs for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
    ]
    for fmt in FORMATS:
        if fmt == "vicuna_chat" and system:
            with pytest.raises(ValueError, match="no place"):
                from_messages(msgs, fmt)
            continue
        rec = json.loads(json.dumps(from_messages(msgs, fmt, {"id": "x"})))
        assert to_messages(rec) == (fmt, msgs)


BAD_LINES = [
    '{"instruction": "好", "output": "好的"}',
    '{"instruction": "坏", "output": ',  # malformed JSON
    '["not", "an", "object"]',
    '{"conversations": [{"from": "gpt", "value": "答"}, {"from": "human", "value": "问"}]}',
    '{"instruction": "缺少回答"}',
    '{"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": 3}]}',
    '{"instruction": "好", "output": "好的"}',
]


def test_bad_records_stop_with_file_and_line(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(BAD_LINES) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert convert(src, out, "sharegpt") == 2
    err = capsys.readouterr().err
    assert f"{src}:2: malformed JSON" in err and "--skip_bad_records" in err
    assert not out.exists()  # nothing half-written


def test_bad_records_skipped_and_counted(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(BAD_LINES) + "\n", encoding="utf-8")
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    assert convert(src, out, "sharegpt", "--skip_bad_records", "--report_file", str(report)) == 0
    rep = json.loads(report.read_text())
    assert rep["records_in"] == 7 and rep["records_out"] == 2
    assert sum(rep["bad_records"].values()) == 5
    assert rep["bad_records"]["malformed JSON (Expecting value)"] == 1
    assert any("out-of-order" in k for k in rep["bad_records"])
    assert any("missing field 'output'" in k for k in rep["bad_records"])
    assert len(load(out)) == 2


def test_never_writes_over_an_input(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"instruction": "a", "output": "b"}\n')
    before = src.read_bytes()
    assert convert(src, src, "sharegpt", "--overwrite") == 2
    assert "inputs are never modified in place" in capsys.readouterr().err
    assert src.read_bytes() == before
    other = tmp_path / "out.jsonl"
    other.write_text("keep me\n")
    assert convert(src, other, "sharegpt") == 2
    assert "pass --overwrite" in capsys.readouterr().err and other.read_text() == "keep me\n"
    assert convert(src, other, "sharegpt", "--overwrite") == 0


def test_merge_keeps_ids_unique(tmp_path, capsys):
    sg = shared_asset("data/sharegpt_dummy_conversation.json")
    vc = shared_asset("data/chinese_vicuna_chat_sample.jsonl")
    out = tmp_path / "merged.jsonl"
    rc = zhtune(
        [
            "data",
            "merge",
            "--in_file",
            f"{sg},{sg},{vc}",
            "--out_file",
            str(out),
            "--report_file",
            str(tmp_path / "r.json"),
        ]
    )
    assert rc == 0
    recs = load(out)
    ids = [r["id"] for r in recs]
    assert len(recs) == 1003 and len(set(ids)) == 1003
    assert ids[:2] == ["identity_0", "identity_1"] and ids[500] == "identity_0_1"
    assert ids[-3:] == [f"chinese_vicuna_chat_sample_{i}" for i in (1, 2, 3)]
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["ids_renamed"] == 500 and rep["ids_added"] == 3 and rep["changed"] == 503


def test_merge_suffix_skips_ids_in_use(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.json"
    rec = {"instruction": "q", "output": "a"}
    a.write_text("\n".join(json.dumps({"id": i, **rec}) for i in ["x", "x_1", "x"]) + "\n")
    b.write_text(json.dumps([{"id": "x", **rec}, {"id": "x_2", **rec}]))
    out = tmp_path / "m.json"
    assert zhtune(["data", "merge", "--in_file", f"{a},{b}", "--out_file", str(out)]) == 0
    assert [r["id"] for r in json.loads(out.read_text())] == ["x", "x_1", "x_2", "x_3", "x_2_1"]
