"""zhtune eval --task_metric response: reply bits per character, broken and looping replies, built-in prompts."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch

from zhtune.cli import main as zhtune
from zhtune.errors import ConfigError, DataError
from zhtune.eval import quality


def _tiny(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zhtune.text.templates import get_format

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, tok, get_format(tok)


def _jsonl(path, recs):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n", encoding="utf-8")
    return path


CHAT = {
    "messages": [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "北京是哪个国家的首都？"},
        {"role": "assistant", "content": "中国。"},
        {"role": "user", "content": "请再用一句话介绍一下它。"},
        {"role": "assistant", "content": "北京是中国的首都，有着悠久的历史和灿烂的文化。"},
    ]
}


# ---- what a reply looks like ----


@pytest.mark.parametrize(
    "reply",
    [
        "好的好的好的好的",  # a 2-character unit 4 times at the end
        "哈哈哈哈哈哈哈哈",  # one character 8 times: the unit 哈哈 4 times
        "答案是：我喜欢北京。我喜欢北京。我喜欢北京。我喜欢北京。",  # a sentence 4 times at the end
        "北京是首都。北京是首都。北京是首都。你好",  # 8 distinct 4-grams of 17, though it ends elsewhere
        "  ababababab \n",  # whitespace at the ends does not hide a loop
    ],
)
def test_repetitive_replies(reply):
    assert quality.repetitive(reply)


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "好的好的好的",  # the unit only 3 times, and too short for the 4-gram rule
        "哈哈哈哈哈哈哈",  # 7 characters: 哈哈 fits only 3 times
        "北京是中国的首都，有着悠久的历史和灿烂的文化。",
        "春风吹绿了柳梢，桃花开满了山坡，燕子飞回了屋檐。",  # a parallel poem line is not a loop
        "好的。好的。",
        "1. 苹果\n2. 香蕉\n3. 橘子\n4. 葡萄",
    ],
)
def test_replies_that_are_not_repetitive(reply):
    assert not quality.repetitive(reply)


def test_broken_character():
    assert quality.broken("北京是\ufffd的首都") and quality.broken("\ufffd")
    assert not quality.broken("北京是中国的首都。") and not quality.broken("")


# ---- bits per character of the reference reply ----


@pytest.mark.parametrize("fixture", ["tiny_llama_bpe", "tiny_llama_sp"])
def test_reply_span_is_what_sft_supervises_in_the_last_turn(request, fixture):
    from zhtune.text.encode import IGNORE, SegmentEncoder, encode_conversation
    from zhtune.text.records import to_messages

    model, tok, fmt = _tiny(request.getfixturevalue(fixture))
    _, msgs = to_messages(CHAT)
    enc = SegmentEncoder(tok)
    ids, start = quality.reply_ids(enc, fmt, msgs[:-1], msgs[-1]["content"])
    sft = encode_conversation(fmt, enc, msgs, 10_000)
    assert sft.status == "ok" and sft.input_ids[: len(ids)] == ids
    # SFT's labels: two supervised runs (both replies); the span is the last one, exactly
    runs, i = [], 0
    while i < len(sft.labels):
        if sft.labels[i] == IGNORE:
            i += 1
            continue
        j = i
        while j < len(sft.labels) and sft.labels[j] != IGNORE:
            j += 1
        runs.append((i, j))
        i = j
    assert len(runs) == 2 and runs[-1] == (start, len(ids))
    end_of_turn = "<|im_end|>" if fixture == "tiny_llama_bpe" else tok.eos_token
    assert tok.decode(ids[start:]) == msgs[-1]["content"] + end_of_turn


@pytest.mark.parametrize("fixture", ["tiny_llama_bpe", "tiny_llama_sp"])
def test_response_bpc_is_the_reply_loss_in_bits_per_character(request, fixture, tmp_path):
    from zhtune.text.encode import IGNORE, SegmentEncoder, encode_conversation
    from zhtune.text.records import to_messages

    model, tok, fmt = _tiny(request.getfixturevalue(fixture))
    f = _jsonl(tmp_path / "chat.jsonl", [CHAT])
    res = quality.evaluate(model, tok, fmt, quality.ResponseOptions(str(f), sample_replies=0))
    # by hand: SFT's encoding, the model's logits, the loss of the last reply's tokens (end-of-turn included)
    _, msgs = to_messages(CHAT)
    e = encode_conversation(fmt, SegmentEncoder(tok), msgs, 10_000)
    last = max(i for i, x in enumerate(e.labels) if x != IGNORE)
    first = last
    while e.labels[first - 1] != IGNORE:
        first -= 1
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([e.input_ids])).logits[0].float(), -1)
    nll = -sum(logp[t - 1, e.input_ids[t]].item() for t in range(first, last + 1))
    ref = msgs[-1]["content"]
    assert res["response_bpc"] == pytest.approx(nll / math.log(2) / len(ref), rel=1e-5)
    assert (res["scored"], res["reference_chars"], res["reference_tokens"]) == (1, len(ref), last + 1 - first)
    assert (res["prompts_cut"], res["too_long"], res["replies"], res["samples"]) == (0, 0, 0, [])
    assert res["fffd_share"] is None and res["repetition_share"] is None


def test_long_conversations_lose_the_start_of_their_prompt(tiny_llama_sp, tmp_path):
    assert quality.fit([1, 5, 6, 7, 8, 9], 4, 6, bos=1) == ([1, 5, 6, 7, 8, 9], 4)
    assert quality.fit([1, 5, 6, 7, 8, 9], 4, 4, bos=1) == ([1, 7, 8, 9], 2)  # bos kept, 5 and 6 cut
    assert quality.fit([3, 5, 6, 7, 8, 9], 4, 4, bos=1) == ([6, 7, 8, 9], 2)  # no bos to keep
    assert quality.fit([1, 5, 6, 7, 8, 9], 4, 3, bos=1) is None  # bos + reply alone: no prompt left
    model, tok, fmt = _tiny(tiny_llama_sp)
    f = _jsonl(tmp_path / "chat.jsonl", [CHAT])
    full = quality.evaluate(model, tok, fmt, quality.ResponseOptions(str(f), sample_replies=0))
    n = full["reference_tokens"]
    cut = quality.evaluate(
        model, tok, fmt, quality.ResponseOptions(str(f), sample_replies=0, max_seq_length=n + 3)
    )
    assert (cut["prompts_cut"], cut["scored"], cut["reference_tokens"]) == (1, 1, n)
    assert cut["response_bpc"] != full["response_bpc"]  # the same reply, with less context
    over = quality.evaluate(
        model, tok, fmt, quality.ResponseOptions(str(f), sample_replies=0, max_seq_length=n)
    )
    assert (over["too_long"], over["scored"], over["response_bpc"]) == (1, 0, None)


# ---- records ----


def test_prompts_without_a_reply_and_bad_records(tmp_path):
    f = _jsonl(
        tmp_path / "p.jsonl",
        [
            {"instruction": "请介绍一下北京。"},
            {"instruction": "翻译成英文", "input": "你好", "output": ""},
            {"conversations": [{"from": "human", "value": "你好"}]},
            {"instruction": "1+1=?", "output": "2"},
        ],
    )
    recs = quality.read_records(str(f))
    assert [(line, m[-1]["content"], ref) for line, m, ref in recs] == [
        (1, "请介绍一下北京。", None),
        (2, "翻译成英文\n你好", None),
        (3, "你好", None),
        (4, "1+1=?", "2"),
    ]
    assert [m["role"] for m in recs[3][1]] == ["user"]
    bad = _jsonl(
        tmp_path / "bad.jsonl", [{"instruction": "好"}, {"messages": [{"role": "robot", "content": "x"}]}]
    )
    with pytest.raises(DataError, match=r"bad.jsonl:2: messages\[0\] has unknown role 'robot'"):
        quality.read_records(str(bad))
    bad = _jsonl(tmp_path / "bad2.jsonl", [{"instruction": "好"}, {"instruction": 3}])
    with pytest.raises(DataError, match=r"bad2.jsonl:2: field 'instruction' must be a string"):
        quality.read_records(str(bad))
    with pytest.raises(DataError, match=r"nothing to measure"):
        quality.evaluate(None, None, None, quality.ResponseOptions(str(f), max_samples=3, sample_replies=0))


def test_builtin_prompts():
    recs = quality.read_records("builtin:zh_prompts")
    assert len(recs) == 10 and all(ref is None and m[0]["role"] == "user" for _, m, ref in recs)
    assert (
        recs[0][1][0]["content"] == "请介绍一下北京。"
        and len(quality.read_records("builtin:zh_prompts", 3)) == 3
    )
    with pytest.raises(
        ConfigError, match=r"unknown built-in prompt set 'builtin:en'; there are: builtin:zh_prompts"
    ):
        quality.read_records("builtin:en")


# ---- greedy replies and the command ----


def test_a_looping_model_is_caught(tmp_path, bpe_tokenizer_dir):
    from infer_models import never_stopping_model

    model, tok, fmt = _tiny(never_stopping_model(bpe_tokenizer_dir, tmp_path / "m"))  # replies 好/的 only
    opts = quality.ResponseOptions("builtin:zh_prompts", max_samples=3, max_new_tokens=10)
    res = quality.evaluate(model, tok, fmt, opts)
    assert res["replies"] == 3 and res["repetition_share"] == 1.0 and res["fffd_share"] == 0.0
    assert res["response_bpc"] is None and res["scored"] == 0
    assert [s["prompt"] for s in res["samples"]] == list(quality.BUILTIN_PROMPTS["zh_prompts"][:3])
    assert all(len(s["reply"]) == 10 and set(s["reply"]) <= set("好的") for s in res["samples"])
    assert all(s["repetitive"] and not s["fffd"] and s["reference"] is None for s in res["samples"])
    assert (res["reply_tokens"], res["reply_chars"], res["tokens_per_char"]) == (30, 30, 1.0)


def test_cli_builtin_prompts_and_references(tiny_llama_sp, tmp_path, capsys):
    f = _jsonl(tmp_path / "chats.jsonl", [CHAT, {"instruction": "你好", "output": "你好！"}])
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(
        f"""
model_name_or_path: {tiny_llama_sp}
max_new_tokens: 6
tasks:
  - {{task_file: "builtin:zh_prompts", task_metric: response}}
  - {{name: chats, task_file: {f}, task_metric: response, sample_replies: 1}}
output_dir: {tmp_path / "out"}
""",
        encoding="utf-8",
    )
    assert zhtune(["eval", str(recipe)]) == 0
    out = capsys.readouterr().out
    for row in ("response bits/char", "replies with U+FFFD", "repetitive replies", "Han chars/s"):
        assert row in out, row
    assert "zh_prompts: 请介绍一下北京。" in out and "chats: 请再用一句话介绍一下它。" in out
    data = json.loads((tmp_path / "out" / "eval_results.json").read_text(encoding="utf-8"))
    name = next(iter(data["results"]))
    zh, chats = data["results"][name]["zh_prompts"], data["results"][name]["chats"]
    assert (zh["n"], zh["replies"], len(zh["samples"]), zh["response_bpc"]) == (10, 10, 10, None)
    assert 0.0 <= zh["fffd_share"] <= 1.0 and 0.0 <= zh["repetition_share"] <= 1.0
    assert (chats["n"], chats["scored"], chats["replies"]) == (2, 2, 1) and chats["response_bpc"] > 0
    assert chats["samples"][0]["reference"] == CHAT["messages"][-1]["content"]
    assert data["tasks"]["zh_prompts"]["file"] == "builtin:zh_prompts"
    assert len(data["models"][name]["tokenizer"]) == 16
    md = (tmp_path / "out" / "eval_results.md").read_text(encoding="utf-8")
    assert "| chats | response bits/char |" in md and "| zh_prompts | repetitive replies |" in md


def test_cli_option_errors(tmp_path, capsys):
    assert zhtune(["eval", "--task_file", "builtin:nope", "--task_metric", "response"]) == 2
    assert "--task_file: unknown built-in prompt set 'builtin:nope'" in capsys.readouterr().err
    assert zhtune(["eval", "--task_file", "builtin:zh_prompts", "--task_metric", "exact"]) == 2
    assert (
        "holds prompts without reference replies; score it with task_metric response"
        in capsys.readouterr().err
    )


# ---- the pipeline report ----


def test_pipeline_report_shows_quality_and_leaves_perplexity_of_other_tokenizers_out(
    tmp_path, tiny_llama_sp, tiny_llama_bpe
):
    from conftest import make_tiny_model

    from zhtune.eval.cli import main as evaluate
    from zhtune.pipeline.report import NOT_COMPARABLE, write_report

    same = make_tiny_model(tiny_llama_sp, tmp_path / "same", seed=1)
    text = tmp_path / "news.txt"
    text.write_text("人民日报发表新年讲话。\n北京是中国的首都。\n", encoding="utf-8")
    chats = _jsonl(tmp_path / "chats.jsonl", [CHAT])
    summary = evaluate(
        {
            "eval": {
                "compare": [f"base={tiny_llama_sp}", f"same={same}", f"other={tiny_llama_bpe}"],
                "max_new_tokens": 4,
                "tasks": [
                    {"name": "news", "text_files": [str(text)]},
                    {"task_file": "builtin:zh_prompts", "task_metric": "response", "max_samples": 2},
                    {"task_file": str(chats), "task_metric": "response", "sample_replies": 0},
                ],
            }
        }
    )

    def report(models):
        part = {
            **summary,
            "models": {m: summary["models"][m] for m in models},
            "results": {m: summary["results"][m] for m in models},
        }
        run = tmp_path / "-".join(models)
        data = {"base_model": "x", "stages": {"eval": {"command": "eval", "status": "done", "result": part}}}
        return write_report(run, data, types.SimpleNamespace(report_text=None)).read_text(encoding="utf-8")

    def row(md, task, metric):
        return next(ln for ln in md.splitlines() if ln.startswith(f"| {task} | {metric} |"))

    md = report(["base", "other"])
    assert row(md, "news", "perplexity").endswith(f"| {NOT_COMPARABLE} |")
    assert row(md, "news", "bits/char").endswith("% |")  # bits per character compares across tokenizers
    assert row(md, "chats", "response bits/char").endswith("% |")  # per character too: compared
    assert row(md, "zh_prompts", "replies with U+FFFD").endswith(" pt |")
    assert row(md, "zh_prompts", "repetitive replies").endswith(" pt |")
    # prompts alone have no reply bits/char; replies were not written for the chats
    assert "| zh_prompts | response bits/char |" not in md and "| chats | repetitive replies |" not in md
    for i, prompt in enumerate(quality.BUILTIN_PROMPTS["zh_prompts"][:2]):
        line = row(md, "zh_prompts", prompt)  # the replies table: prompt, reference, each model's reply
        replies = [summary["results"][m]["zh_prompts"]["samples"][i]["reply"] for m in ("base", "other")]
        assert line.split(" | ")[2] == "-" and all(
            r.replace("|", "\\|").replace("\n", "<br>") in line for r in replies
        )
    same_md = report(["base", "same"])
    assert NOT_COMPARABLE not in same_md and row(same_md, "news", "perplexity").endswith("% |")
    # results written before eval recorded tokenizers: as many tokens for the same text, or not
    old = {**summary, "models": {m: {"model": "x"} for m in summary["models"]}}
    from zhtune.pipeline.report import same_tokenizer

    assert same_tokenizer(old, "news", "base", "same") and not same_tokenizer(old, "news", "base", "other")
