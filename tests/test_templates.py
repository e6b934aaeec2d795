"""Labels are exact at the token level: the supervised ids decode to exactly the assistant texts plus their
end-of-turn token, for SentencePiece and byte-level BPE tokenizers, every built-in template and a model's
own Jinja template, single- and multi-turn, Chinese and English."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from zhtune.errors import ConfigError
from zhtune.text.encode import IGNORE, SegmentEncoder, encode_conversation
from zhtune.text.templates import BuiltinFormat, JinjaFormat, attach, builtin_names, builtin_specs, get_format

SINGLE_ZH = [
    {"role": "user", "content": "请介绍一下北京。"},
    {"role": "assistant", "content": "北京是中国的首都，有三千多年的历史。"},
]
MULTI = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "你好，北京在哪里？"},
    {"role": "assistant", "content": "北京位于华北平原的北部。"},
    {"role": "user", "content": "Write a two-line poem about the sea."},
    {"role": "assistant", "content": "The sea is wide and blue,\nit sings all night for you."},
    {"role": "user", "content": "再用中文说一遍 {这是大括号}。"},
    {"role": "assistant", "content": "大海宽广又蔚蓝，\n整夜为你把歌唱 {好}。"},
]
CONVERSATIONS = {"single_zh": SINGLE_ZH, "multi_mixed": MULTI}


@pytest.fixture(scope="module", params=["sp", "bpe"])
def tok(request, sp_tokenizer_dir, bpe_tokenizer_dir):
    return AutoTokenizer.from_pretrained(
        str(sp_tokenizer_dir if request.param == "sp" else bpe_tokenizer_dir)
    )


def supervised_spans(ids: list[int], labels: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, lab in enumerate(labels):
        if lab != IGNORE and start is None:
            start = i
        if lab == IGNORE and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(labels)))
    return spans


def expected_assistant_texts(fmt, messages) -> list[str]:
    return [t for t, sup in fmt.segments(messages) if sup]


def check_exact(tok, fmt, messages):
    enc = SegmentEncoder(tok)
    segs = fmt.segments(messages)
    ids, labels = enc.encode_segments(segs)
    assert len(ids) == len(labels)
    for i, lab in enumerate(labels):
        assert lab == IGNORE or lab == ids[i]
    spans = supervised_spans(ids, labels)
    expected = expected_assistant_texts(fmt, messages)
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    assert len(spans) == len(expected) == n_assistant
    for (s, e), text in zip(spans, expected):
        # decoding the prefix through the span adds exactly the assistant text and its end-of-turn token
        before = tok.decode(ids[:s], skip_special_tokens=False)
        through = tok.decode(ids[:e], skip_special_tokens=False)
        assert through.startswith(before)
        assert through[len(before) :] == text, (through[len(before) :], text)
    # and every assistant message's content is inside its supervised text, ending with the stop string
    stops = fmt.stop_strings()
    assistants = [m["content"] for m in messages if m["role"] == "assistant"]
    for content, text in zip(assistants, expected):
        assert content.strip() in text
        assert any(text.endswith(s) for s in stops), (text, stops)
    return ids, labels


@pytest.mark.parametrize("name", builtin_names())
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_builtin_masks_are_exact(tok, name, conv):
    check_exact(tok, get_format(tok, name), CONVERSATIONS[conv])


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_model_jinja_template_masks_are_exact(tok, conv):
    chatml_jinja = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    fmt = JinjaFormat(tok, chatml_jinja)
    ids, labels = check_exact(tok, fmt, CONVERSATIONS[conv])
    # the "\n" after <|im_end|> is template, not supervised
    sup = [t for t, s in fmt.segments(CONVERSATIONS[conv]) if s]
    assert all(t.endswith("<|im_end|>") for t in sup)


@pytest.mark.parametrize("name", builtin_names())
def test_generated_jinja_renders_like_the_structured_template(tok, name):
    fmt = get_format(tok, name)
    attach(fmt, tok)
    try:
        for messages in (SINGLE_ZH, MULTI, MULTI[:-1]):
            for gen in (False, True):
                if gen and messages[-1]["role"] != "user":
                    continue
                want = "".join(t for t, _ in fmt.segments(messages, add_generation_prompt=gen))
                got = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
                assert got == want
    finally:
        tok.chat_template = None


def test_generation_prompt_is_the_training_prefix(tok):
    """At inference the prompt ids equal the training ids up to the first supervised token."""
    fmt = get_format(tok, "chatml")
    enc = SegmentEncoder(tok)
    ids, labels = enc.encode_segments(fmt.segments(MULTI))
    first_sup_last_turn = supervised_spans(ids, labels)[-1][0]
    prompt = enc.prompt_ids(fmt, MULTI[:-1])
    assert prompt == ids[:first_sup_last_turn]


def test_alpaca_is_chinese_llama_alpaca_prompt(tok):
    fmt = get_format(tok, "alpaca")
    text = "".join(
        t for t, _ in fmt.segments([{"role": "user", "content": "你好"}], add_generation_prompt=True)
    )
    assert text.endswith(
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n你好\n\n### Response: "
    )


def test_vicuna_matches_fastchat_layout(tok):
    fmt = get_format(tok, "vicuna")
    text = "".join(t for t, _ in fmt.segments(MULTI[1:3] + [MULTI[3]], add_generation_prompt=True))
    sys = builtin_specs()["vicuna"]["default_system"]
    eos = tok.eos_token
    assert (
        text
        == f"{tok.bos_token}{sys} USER: 你好，北京在哪里？ ASSISTANT: 北京位于华北平原的北部。{eos}USER: {MULTI[3]['content']} ASSISTANT:"
    )


def test_llama2_puts_system_in_first_turn(tok):
    fmt = get_format(tok, "llama2")
    text = "".join(t for t, _ in fmt.segments(MULTI[:3]))
    assert text.startswith(
        f"{tok.bos_token}[INST] <<SYS>>\n你是一个乐于助人的助手。\n<</SYS>>\n\n你好，北京在哪里？ [/INST]"
    )


def test_unknown_template_is_an_error(tok):
    with pytest.raises(ConfigError, match="unknown --template 'chatgpt'"):
        get_format(tok, "chatgpt")


def test_template_that_rewrites_history_is_rejected(tok):
    # a template that renders only the last two messages is not prefix-consistent
    bad = "{% for m in messages[-2:] %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ConfigError, match="prefix"):
        JinjaFormat(tok, bad).segments(MULTI)


def test_truncation_drops_leading_turns_then_truncates_last_reply(tok):
    fmt = get_format(tok, "chatml")
    enc = SegmentEncoder(tok)
    full, _ = enc.encode_segments(fmt.segments(MULTI))
    last_two = [MULTI[0]] + MULTI[-2:]
    short, _ = enc.encode_segments(fmt.segments(last_two))
    # room for the last pair only: the leading turns are dropped, the system prompt kept
    e = encode_conversation(fmt, enc, MULTI, max_len=len(short), truncation="auto")
    assert e.status == "turns_dropped" and e.input_ids == short
    # room for less than the last pair: its reply is cut, never all labels gone
    e = encode_conversation(fmt, enc, MULTI, max_len=len(short) - 3, truncation="auto")
    assert e.status == "response_truncated" and len(e.input_ids) == len(short) - 3
    assert any(x != IGNORE for x in e.labels)
    # the prompt alone does not fit: dropped, not trained with every label -100
    e = encode_conversation(fmt, enc, MULTI, max_len=8, truncation="auto")
    assert e.status == "too_long" and e.input_ids == []
    e = encode_conversation(fmt, enc, MULTI, max_len=len(full) - 1, truncation="drop")
    assert e.status == "too_long"
    e = encode_conversation(fmt, enc, MULTI, max_len=len(full), truncation="drop")
    assert e.status == "ok"


def test_builtin_format_handles_braces_in_content(tok):
    fmt = BuiltinFormat("chatml", builtin_specs()["chatml"], tok)
    text = "".join(t for t, _ in fmt.segments([{"role": "user", "content": "{content} {eos_token}"}], True))
    assert "{content} {eos_token}" in text
