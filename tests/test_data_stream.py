"""Streaming readers and the atomic writer of the data tools, against the foundation's whole-file reader."""

from __future__ import annotations

import json

import pytest
from conftest import shared_asset

from zhtune.data import jsonl as stream
from zhtune.data.jsonl import RecordWriter, detect_layout, iter_raw, parse
from zhtune.errors import DataError
from zhtune.text.records import iter_json_records


def records(path, layout=None):
    layout = layout or detect_layout(path)
    return [(line, parse(p)) for line, p, _ in iter_raw(path, layout)]


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_array_reader_matches_whole_file_reader(monkeypatch, chunk):
    path = shared_asset("data/sharegpt_dummy_conversation.json")
    monkeypatch.setattr(stream, "CHUNK", chunk)
    got = records(path)
    want = list(iter_json_records(path))
    assert len(got) == 500
    assert got == want  # same records, same starting lines


def test_jsonl_reader_lines_and_layout(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{"a": 2}\n{"a": 3}')
    assert detect_layout(p) == "jsonl"
    assert records(p) == [(1, {"a": 1}), (3, {"a": 2}), (4, {"a": 3})]
    arr = tmp_path / "b.json"
    arr.write_text('  \n[\n{"a": 1},\n\n {"a": [1, 2]}\n]\n')
    assert detect_layout(arr) == "json"
    assert records(arr) == [(3, {"a": 1}), (5, {"a": [1, 2]})]


@pytest.mark.parametrize(
    "text, line, words",
    [
        ('[\n{"a": 1},\n{"a": 2\n,\n]', 5, "Expecting property name"),
        ('[\n{"a": 1}\n{"a": 2}\n]', 3, "expected ','"),
        ('[\n{"a": 1},\n', 3, "no record after it"),
        ('[\n{"a": 1}\n', 3, "not closed"),
        ('[{"a": 1}] x', 1, "extra data"),
        ('[{"a": 1},]', 1, "no record after it"),
    ],
)
def test_array_reader_errors_name_the_line(tmp_path, text, line, words):
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(DataError) as e:
        records(p)
    assert e.value.line == line and words in str(e.value) and str(p) in str(e.value)


def test_bad_jsonl_payloads():
    with pytest.raises(stream.BadRecord, match="malformed JSON"):
        parse(b'{"a": ')
    with pytest.raises(stream.BadRecord, match="UTF-8"):
        parse(b'{"a": "\xff"}')


def test_not_json_at_all(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("hello")
    with pytest.raises(DataError, match="neither a JSON array nor JSON Lines"):
        detect_layout(p)


@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_writer_is_atomic(tmp_path, layout):
    out = tmp_path / f"out.{layout}"
    out.write_text("previous\n")
    with pytest.raises(RuntimeError), RecordWriter(out, layout) as w:
        w.write(json.dumps({"a": 1}))
        raise RuntimeError("killed")
    assert out.read_text() == "previous\n"  # the old file is untouched, no partial new one
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary left behind
    with RecordWriter(out, layout) as w:
        for i in range(3):
            w.write(json.dumps({"a": i}))
    assert [r for _, r in records(out, layout)] == [{"a": 0}, {"a": 1}, {"a": 2}]


def test_empty_json_output_is_valid(tmp_path):
    out = tmp_path / "e.json"
    with RecordWriter(out, "json"):
        pass
    assert json.loads(out.read_text()) == []
