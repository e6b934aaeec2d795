"""Hypothesis fuzzing of what reads user files: the instruction-data readers, the chat-template renderer and
encoder, and the corpus reader of the vocabulary tools. Files mix broken JSON, wrong types, missing and extra
fields, empty and huge strings, invalid UTF-8, several formats, BOMs and CRLF. Every file must end in records,
a DataError naming file:line, or (with --skip_bad_records) a counted skip: never another exception, never a
hang. Each test sees well over a thousand malformed records."""

from __future__ import annotations

import json
import signal
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zhtune.errors import ConfigError, DataError
from zhtune.text.documents import iter_documents, sample_documents
from zhtune.text.records import ReadStats, read_conversations, to_messages

FUZZ = settings(
    max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True
)
SEEN: Counter = Counter()  # records tried, by kind, across the tests of this module
OUTCOMES: Counter = Counter()  # what became of them
TMP = Path(tempfile.mkdtemp(prefix="zhtune-fuzz-"))

# ---- strategies ----

texts = st.one_of(
    st.text(max_size=20),
    st.just(""),
    st.sampled_from(
        ["  ", "\u2028", "line\u2029sep", "\x00", "\ufeff", "{content}", "{{ x }}", "\r\n", "中文测试"]
    ),
    st.integers(20_000, 200_000).map(lambda n: "长" * n),  # huge strings
)
wrong = st.one_of(
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
value = st.one_of(texts, wrong)
roles = st.sampled_from(["user", "assistant", "system", "human", "gpt", "GPT", "bot", "", "tool"])


def alpaca():
    return st.fixed_dictionaries(
        {"instruction": value, "output": value},
        optional={
            "input": value,
            "system": value,
            "history": st.one_of(wrong, st.lists(st.lists(value, max_size=3), max_size=2)),
        },
    )


def sharegpt():
    turn = st.fixed_dictionaries(
        {}, optional={"from": st.one_of(roles, wrong), "value": value, "extra": value}
    )
    return st.fixed_dictionaries(
        {"conversations": st.one_of(wrong, st.lists(st.one_of(turn, wrong), max_size=4))},
        optional={"system": value},
    )


def messages():
    turn = st.fixed_dictionaries(
        {}, optional={"role": st.one_of(roles, wrong), "content": value, "name": value}
    )
    return st.fixed_dictionaries({"messages": st.one_of(wrong, st.lists(st.one_of(turn, wrong), max_size=4))})


def vicuna():
    return st.fixed_dictionaries(
        {"input": st.lists(value, max_size=3), "output": st.lists(value, max_size=3)}
    )


def good():
    pair = st.tuples(
        st.text(min_size=1, max_size=10).filter(str.strip), st.text(min_size=1, max_size=10).filter(str.strip)
    )
    return st.one_of(
        pair.map(lambda p: {"instruction": p[0], "output": p[1]}),
        pair.map(
            lambda p: {"conversations": [{"from": "human", "value": p[0]}, {"from": "gpt", "value": p[1]}]}
        ),
        pair.map(
            lambda p: {
                "messages": [{"role": "user", "content": p[0]}, {"role": "assistant", "content": p[1]}]
            }
        ),
        pair.map(lambda p: {"input": [p[0]], "output": [p[1]]}),
    )


records = st.one_of(
    good(),
    alpaca(),
    sharegpt(),
    messages(),
    vicuna(),
    st.dictionaries(st.text(max_size=8), value, max_size=4),  # unknown fields
    wrong,  # not an object
    st.builds(
        lambda r, extra: {**r, **extra}, good(), st.dictionaries(st.text(max_size=8), value, max_size=3)
    ),
)


@st.composite
def json_lines(draw) -> bytes:
    """One line: a record (any escaping), JSON cut short, invalid UTF-8, or blank."""
    kind = draw(st.sampled_from(["record", "record", "record", "cut", "bytes", "blank"]))
    SEEN[kind] += 1
    if kind == "blank":
        return b""
    if kind == "bytes":
        return draw(
            st.sampled_from([b"\xff\xfe{", b'{"instruction": "\xc3\x28"}', b"\x80", b'{"a": "\xed\xa0\x80"}'])
        )
    text = json.dumps(draw(records), ensure_ascii=draw(st.booleans()))
    if kind == "cut":
        text = text[: draw(st.integers(0, max(0, len(text) - 1)))]
    return text.encode("utf-8", "surrogatepass")


@st.composite
def data_files(draw) -> tuple[bytes, str]:
    lines = draw(st.lists(json_lines(), min_size=1, max_size=6))
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    bom = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
    if draw(st.booleans()):  # a JSON array, possibly with a broken separator or an unclosed bracket
        sep = draw(st.sampled_from([b"," + eol, b"," + eol, b" " + eol]))
        end = draw(st.sampled_from([b"]", b"]", b"", b"] x"]))
        return bom + b"[" + eol + sep.join(x or b"{}" for x in lines) + eol + end, ".json"
    return bom + eol.join(lines) + eol, ".jsonl"


@contextmanager
def no_hang(seconds: int = 20):
    def alarm(*_):  # noqa: ANN002
        raise TimeoutError(f"no answer in {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def write(data: bytes, suffix: str) -> Path:
    p = TMP / f"data{suffix}"
    p.write_bytes(data)
    return p


def assert_located(e: DataError, path: Path, data: bytes) -> None:
    assert str(e).startswith(f"{path}:"), e
    n_lines = data.count(b"\n") + 1
    assert e.line is None or 1 <= e.line <= n_lines, (e.line, n_lines, str(e))
    assert e.problem.strip()


def check_messages(msgs) -> None:  # noqa: ANN001
    assert msgs and all(
        m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str) for m in msgs
    )


# ---- readers ----


def test_jsonl_lines_end_at_newline_only(tmp_path):
    """U+2028, U+0085 and form feeds are legal unescaped in JSON strings; they do not end a JSONL line."""
    p = tmp_path / "d.jsonl"
    rec = {"instruction": "a\u2028b\x85c\x0cd", "output": "ok"}
    p.write_text(
        json.dumps(rec, ensure_ascii=False) + "\r\n" + json.dumps(rec, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    got = list(read_conversations([p]))
    assert [line for _, line, _ in got] == [1, 2] and got[0][2][0]["content"] == rec["instruction"]


@FUZZ
@given(data_files())
def test_readers_strict_error_names_file_and_line(f):
    data, suffix = f
    path = write(data, suffix)
    with no_hang():
        try:
            for _, _, msgs in read_conversations([path]):
                check_messages(msgs)
                OUTCOMES["strict: read"] += 1
        except DataError as e:
            assert_located(e, path, data)
            OUTCOMES["strict: file:line error"] += 1


@FUZZ
@given(data_files())
def test_readers_skip_bad_records_counts_instead_of_failing(f):
    data, _ = f
    path = write(data, ".jsonl")  # lenient reading is for JSON Lines
    stats = ReadStats()
    with no_hang():
        try:
            good = list(read_conversations([path], skip_bad_records=True, stats=stats))
        except DataError as e:  # only a file that is a JSON array cannot be read past its first error
            assert data.lstrip(b"\xef\xbb\xbf").lstrip().startswith(b"["), e
            assert_located(e, path, data)
            OUTCOMES["lenient: file:line error (JSON array)"] += 1
            return
    OUTCOMES["lenient: read"] += len(good)
    OUTCOMES["lenient: counted skip"] += stats.bad
    for _, _, msgs in good:
        check_messages(msgs)
    assert stats.records == len(good) + stats.bad
    assert sum(stats.problems.values()) == stats.bad
    nonblank = [x for x in data.lstrip(b"\xef\xbb\xbf").split(b"\n") if x.strip()]
    assert stats.records == len(nonblank)  # every line counted once: read or skipped


# ---- templates and the encoder ----


@pytest.fixture(scope="module")
def encoders(bpe_tokenizer_dir):
    from transformers import AutoTokenizer

    from zhtune.text.encode import SegmentEncoder
    from zhtune.text.templates import builtin_names, get_format

    tok = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    return [(get_format(tok, n), SegmentEncoder(tok)) for n in builtin_names()]


@FUZZ
@given(records, st.integers(0, 10_000), st.integers(4, 512))
def test_template_render_and_encode(encoders, rec, which, max_len):
    from zhtune.text.encode import IGNORE, encode_conversation

    SEEN["template"] += 1
    fmt, enc = encoders[which % len(encoders)]
    try:
        _, msgs = to_messages(rec)
    except ValueError as e:  # the reader's message, which read_conversations prefixes with file:line
        assert str(e).strip()
        OUTCOMES["template: rejected by the reader"] += 1
        return
    with no_hang():
        segs = fmt.segments(msgs)
        text = "".join(t for t, _ in segs)
        for m in msgs:
            assert m["content"] in text  # every message is rendered, braces and all
        assert fmt.segments(msgs + [{"role": "user", "content": "q"}], add_generation_prompt=True)
        try:
            out = encode_conversation(fmt, enc, msgs, max_len)
        except ConfigError as e:
            pytest.fail(f"built-in template {fmt.name}: {e}")
    OUTCOMES[f"template: {out.status}"] += 1
    assert out.status in ("ok", "turns_dropped", "response_truncated", "too_long", "no_labels")
    assert len(out.input_ids) == len(out.labels) <= max_len
    if out.status in ("ok", "turns_dropped", "response_truncated"):
        assert any(x != IGNORE for x in out.labels)


@FUZZ
@given(st.lists(st.fixed_dictionaries({"role": roles, "content": texts}), max_size=5), st.integers(0, 10_000))
def test_template_segments_of_any_message_list(encoders, msgs, which):
    """The renderer itself (as the chat command and the server call it) on any role order and content."""
    SEEN["message_list"] += 1
    fmt, _ = encoders[which % len(encoders)]
    with no_hang():
        segs = fmt.segments(msgs, add_generation_prompt=True)
    assert all(isinstance(t, str) and t and isinstance(s, bool) for t, s in segs)


# ---- the corpus reader of the vocabulary tools ----


@st.composite
def corpus_files(draw) -> tuple[bytes, str]:
    suffix = draw(st.sampled_from([".txt", ".jsonl"]))
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    lines = []
    for _ in range(draw(st.integers(2, 10))):
        SEEN["corpus"] += 1
        if suffix == ".txt":
            lines.append(
                draw(
                    st.one_of(
                        texts.map(
                            lambda t: (
                                t.replace("\n", " ").replace("\ufeff", "").encode("utf-8", "surrogatepass")
                            )
                        ),
                        st.sampled_from([b"\xff", b"\xc3\x28", b""]),
                    )
                )
            )
        else:
            lines.append(
                draw(json_lines()) if draw(st.booleans()) else json.dumps({"text": draw(value)}).encode()
            )
    bom = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
    return bom + eol.join(lines) + eol, suffix


@FUZZ
@given(corpus_files())
def test_corpus_reader(f):
    data, suffix = f
    path = write(data, suffix)
    with no_hang():
        try:
            docs = list(iter_documents(path))
            sample, counts = sample_documents([path], max_lines=3, max_chars=1000)
        except DataError as e:
            assert_located(e, path, data)
            OUTCOMES["corpus: file:line error"] += 1
            return
    OUTCOMES["corpus: documents read"] += len(docs)
    assert all(isinstance(t, str) and t.strip() and "\n" not in t and "\r" not in t for _, t in docs)
    if suffix == ".txt" and data.startswith(b"\xef\xbb\xbf") and docs and docs[0][0] == 1:
        assert not docs[0][1].startswith("\ufeff")  # a BOM is not text
    assert counts["documents_read"] == len(docs) and len(sample) <= 3


def test_thousands_of_malformed_records_were_tried():
    """Runs last in this module: the fuzz tests above really fed the volumes the project promises."""
    if len(SEEN) < 5:
        pytest.skip("run with the whole module")
    malformed = SEEN["cut"] + SEEN["bytes"] + SEEN["record"] // 2
    print(f"fuzz volumes: {dict(SEEN)}\noutcomes: {dict(OUTCOMES)}")
    assert malformed >= 1000 and SEEN["template"] >= 250 and SEEN["corpus"] >= 1000
