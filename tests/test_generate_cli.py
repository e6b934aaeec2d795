"""``zhtune generate``: mixed input formats, batched backends, resumable line-safe output, clear errors."""

from __future__ import annotations

import json

import pytest
from infer_models import never_stopping_model

from zhtune.cli import main as zhtune
from zhtune.errors import DataError
from zhtune.infer.generate import main, read_requests, to_request


@pytest.fixture(scope="module")
def looping_model(tmp_path_factory, bpe_tokenizer_dir):
    return never_stopping_model(bpe_tokenizer_dir, tmp_path_factory.mktemp("looping_gen"))


RECORDS = [
    "你好",
    {"id": "p", "prompt": "请介绍北京"},
    {"id": "a", "instruction": "翻译成英文", "input": "今天天气很好", "output": "The weather is nice today."},
    {"id": "s", "conversations": [{"from": "human", "value": "你是谁？"}]},
    {
        "id": "m",
        "messages": [
            {"role": "system", "content": "简短回答"},
            {"role": "user", "content": "一加一"},
            {"role": "assistant", "content": "二"},
        ],
    },
]


def test_records_become_conversations_with_references():
    assert to_request("hi") == ([{"role": "user", "content": "hi"}], None)
    msgs, ref = to_request(RECORDS[2])
    assert (
        msgs == [{"role": "user", "content": "翻译成英文\n今天天气很好"}]
        and ref == "The weather is nice today."
    )
    assert to_request({"instruction": "写诗"}) == ([{"role": "user", "content": "写诗"}], None)
    assert to_request(RECORDS[3]) == ([{"role": "user", "content": "你是谁？"}], None)
    msgs, ref = to_request(RECORDS[4])
    assert [m["role"] for m in msgs] == ["system", "user"] and ref == "二"


def test_bad_input_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "ok"}\n{"messages": [{"role": "robot", "content": "x"}]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: messages\[0\] has unknown role 'robot'"):
        read_requests(p)
    p.write_text('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r":2: duplicate id 1"):
        read_requests(p)
    p.write_text('{"prompt": "a"}\n{"prompt": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r":2: malformed JSON"):
        read_requests(p)


@pytest.mark.parametrize(
    "backend,backend_opts", [("continuous", {}), ("generate", {"repetition_penalty": 1.2})], ids=str
)
def test_generate_resumes_and_writes_whole_lines(tmp_path, looping_model, backend, backend_opts, capsys):
    src = tmp_path / "in.json"
    src.write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out" / "replies.jsonl"
    # a previous run that was killed: two complete lines, one torn line
    out.parent.mkdir()
    done_line = {"id": "p", "messages": [], "output": "previous answer", "finish_reason": "stop"}
    out.write_text(json.dumps(done_line, ensure_ascii=False) + "\n" + '{"id": "a", "outp', encoding="utf-8")
    cfg = {
        "model_name_or_path": str(looping_model),
        "input_file": str(src),
        "output_file": str(out),
        "max_new_tokens": 5,
        "temperature": 0,
        "max_batch_size": 2,
        "repetition_penalty": 1.0,
        **backend_opts,
    }
    s = main(cfg)
    assert "5 records, 1 already answered, 4 to go" in capsys.readouterr().out
    assert s == {"records": 5, "written": 5, "errors": 0, "output_file": str(out), "backend": backend}
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in lines] == ["0", "p", "a", "s", "m"]  # input order once complete
    assert lines[1]["output"] == "previous answer"  # skipped, not redone
    for r in lines[:1] + lines[2:]:
        assert len(r["output"]) == 5 and set(r["output"]) <= set("好的")
        assert r["finish_reason"] == "length" and r["completion_tokens"] == 5 and r["prompt_tokens"] > 0
    assert lines[2]["reference"] == "The weather is nice today." and lines[4]["reference"] == "二"
    assert lines[4]["messages"][0] == {"role": "system", "content": "简短回答"}
    # a second run has nothing left to do and leaves the file as it is
    before = out.read_bytes()
    assert main(cfg)["backend"] is None
    assert out.read_bytes() == before


def test_cli_reports_missing_options(capsys):
    assert zhtune(["generate", "--output_file", "x.jsonl"]) == 2
    assert "--input_file is required" in capsys.readouterr().err


def test_a_reply_with_unicode_line_breaks_stays_one_line():
    """A tiny random model once replied with U+0085: json.dumps leaves it raw and splitlines broke the record."""
    from zhtune.text.records import json_line

    rec = {"id": "0", "output": "好\u0085a\u2028b\u2029c，北京"}
    line = json_line(rec) + "\n"
    assert len(line.splitlines()) == 1 and "北京" in line
    assert json.loads(line) == rec
