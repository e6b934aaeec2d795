"""clean-html, normalize, filter-lang and filter through the CLI, on shared samples and planted records."""

from __future__ import annotations

import json

from conftest import shared_asset

from zhtune.cli import main as zhtune
from zhtune.data.jsonl import detect_layout, iter_raw, parse
from zhtune.data.quality import repeat_ratio


def load(path):
    return [parse(p) for _, p, _ in iter_raw(path, detect_layout(path))]


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return path


def sg(*turns, **extra):
    return {
        **extra,
        "conversations": [
            {"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)
        ],
    }


def run(tool, src, out, *args):
    return zhtune(["data", tool, "--in_file", str(src), "--out_file", str(out), *args])


SHAREGPT_HTML = (
    '<div class="markdown prose"><p>1 / 2</p><p>Use <code>sorted</code>:</p>'
    '<pre><div class="bg-black"><div class="flex"><span>python</span><button>Copy code</button></div>'
    '<div><code class="!whitespace-pre hljs language-python">def top(xs, k_max=3):\n    return sorted(xs)[-k_max:]\n'
    "</code></div></div></pre><table><thead><tr><th>输入</th><th>输出</th></tr></thead>"
    "<tbody><tr><td>[3, 1, 2]</td><td>[1, 2, 3]</td></tr></tbody></table></div>"
)


def test_clean_html_keeps_code_and_tables(tmp_path, capsys):
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [
            sg("how do I sort?", SHAREGPT_HTML, id="html"),
            sg("plain", "Already *Markdown* with snake_case and <T> generics.", id="md"),
            sg("empty", "<div><span></span></div>", id="empty"),
        ],
    )
    out = tmp_path / "out.jsonl"
    assert run("clean-html", src, out, "--report_file", str(tmp_path / "r.json")) == 0
    recs = load(out)
    assert [r["id"] for r in recs] == ["html", "md"]
    answer = recs[0]["conversations"][1]["value"]
    assert "```python\ndef top(xs, k_max=3):\n    return sorted(xs)[-k_max:]\n```" in answer
    assert "| 输入 | 输出 |\n| --- | --- |\n| [3, 1, 2] | [1, 2, 3] |" in answer
    assert "Copy code" not in answer and not answer.startswith("1 / 2") and "<" not in answer
    assert recs[1] == sg("plain", "Already *Markdown* with snake_case and <T> generics.", id="md")
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["changed"] == 1 and rep["dropped"] == {"unusable after cleaning (empty assistant turn)": 1}


def test_clean_html_on_shared_sharegpt_changes_nothing_without_html(tmp_path):
    src = shared_asset("data/sharegpt_dummy_conversation.json")
    out = tmp_path / "out.json"
    assert run("clean-html", src, out) == 0
    assert load(out) == load(src)


def test_normalize_traditional_fullwidth_whitespace(tmp_path):
    src = shared_asset("data/chinese_vicuna_chat_sample.jsonl")
    out = tmp_path / "out.jsonl"
    assert run("normalize", src, out) == 0
    before, after = load(src), load(out)
    assert len(after) == len(before) == 3
    text_before = json.dumps(before, ensure_ascii=False)
    text_after = json.dumps(after, ensure_ascii=False)
    assert "個" in text_before and "個" not in text_after and "个" in text_after
    assert "來彰化跑步" in text_before and "来彰化跑步" in text_after
    assert "| 時間 |" in text_before and "| 时间 |" in text_after  # tables untouched apart from characters


def test_normalize_rules(tmp_path, capsys):
    recs = [
        {"instruction": "ｈｅｌｌｏ，ｗｏｒｌｄ３　ｏｋ", "output": "你好，世界！Ｐｙｔｈｏｎ（编程语言）"},
        {"instruction": "a\r\nb\u200b\u00a0c  \n\n\n\nd\x07", "output": "  def f():\n      return 1\t\n"},
        {"instruction": "臺灣", "output": "軟體"},
        {"instruction": "空", "output": "\u200b \u3000"},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    out = tmp_path / "out.jsonl"
    assert run("normalize", src, out) == 0
    got = load(out)
    assert got[0] == {"instruction": "hello,world3 ok", "output": "你好，世界！Python（编程语言）"}
    assert got[1] == {"instruction": "a\nb c\n\nd", "output": "def f():\n      return 1"}
    assert got[2] == {"instruction": "台湾", "output": "软体"}
    assert len(got) == 3 and "unusable after normalizing (empty assistant turn)" in capsys.readouterr().out
    assert run("normalize", src, tmp_path / "nfkc.jsonl", "--nfkc", "--t2s", "false") == 0
    got = load(tmp_path / "nfkc.jsonl")
    assert got[0]["output"] == "你好,世界!Python(编程语言)"  # NFKC folds Chinese punctuation too
    assert got[2]["instruction"] == "臺灣"


def test_filter_lang_keep_and_skip(tmp_path, capsys):
    zh = shared_asset("data/alpaca_zh_demo.json")
    en = shared_asset("data/alpaca_en_demo.json")
    out, rep = tmp_path / "zh.jsonl", tmp_path / "r.json"
    args = ["--in_file", f"{zh},{en}", "--report_file", str(rep)]
    assert zhtune(["data", "filter-lang", *args, "--out_file", str(out), "--keep_lang", "zh"]) == 0
    r = json.loads(rep.read_text())
    assert r["records_in"] == 1999
    assert r["languages"]["zh"] > 950 and r["languages"]["en"] > 950
    assert r["records_out"] == r["languages"]["zh"]
    assert r["dropped"]["language en"] == r["languages"]["en"]
    assert "languages seen: " in capsys.readouterr().out
    kept = load(out)
    assert len(kept) == r["records_out"] and all("instruction" in x for x in kept)


def test_filter_lang_skip(tmp_path, capsys):
    recs = [
        {
            "instruction": "请介绍一下长城的历史。",
            "output": "长城始建于春秋战国时期，秦朝把各国的城墙连接起来。",
        },
        {
            "instruction": "Describe the Great Wall.",
            "output": "The Great Wall is a series of fortifications in China.",
        },
        {"instruction": "日本の首都はどこですか。", "output": "日本の首都は東京です。"},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    out = tmp_path / "out.jsonl"
    assert run("filter-lang", src, out, "--skip_lang", "en,ja") == 0
    assert load(out) == recs[:1]
    assert "language en   1" in capsys.readouterr().out
    assert run("filter-lang", src, out, "--overwrite") == 2
    assert "give --keep_lang" in capsys.readouterr().err


def test_quality_checks_each_counted(tmp_path):
    loop = "我不知道。" * 40
    recs = [
        {"instruction": "介绍一下北京。", "output": "北京是中国的首都，有三千多年的建城史。"},
        {"instruction": "空回答", "output": "   "},
        {"instruction": "短", "output": "好"},
        {
            "instruction": "Tell me a joke.",
            "output": "Why did the chicken cross the road? To get to the other side.",
        },
        {"instruction": "重复", "output": loop},
        {"instruction": "你的看法？", "output": "作为一个AI语言模型，我没有个人看法。"},
        {"instruction": "Opinion?", "output": "As an AI language model, I do not have opinions."},
        {"instruction": "介绍上海。", "output": "上海是中国最大的经济中心城市之一，位于长江入海口。"},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    out, rep = tmp_path / "out.jsonl", tmp_path / "r.json"
    args = ["--min_response_chars", "2", "--min_chinese_ratio", "0.5", "--report_file", str(rep)]
    assert run("filter", src, out, *args) == 0
    assert [r["instruction"] for r in load(out)] == ["介绍一下北京。", "介绍上海。"]
    r = json.loads(rep.read_text())
    assert r["dropped"] == {
        "empty answer": 1,
        "answer too short": 1,
        "too little Chinese": 2,
        "repeated n-grams": 1,
        "refusal or boilerplate": 1,
    }
    # the English refusal fails two checks: counted under both, dropped under the first
    assert r["checks_failed"]["refusal or boilerplate"] == 2 and r["checks_failed"]["too little Chinese"] == 2
    assert repeat_ratio(loop, 10) > 0.9 and repeat_ratio("北京是中国的首都，有三千多年的建城史。", 10) == 0


def test_quality_on_shared_sharegpt(tmp_path):
    src = shared_asset("data/sharegpt_dummy_conversation.json")
    rep = tmp_path / "r.json"
    assert run("filter", src, tmp_path / "out.jsonl", "--report_file", str(rep)) == 0
    r = json.loads(rep.read_text())
    # FastChat's dummy set introduces itself as a model trained by LMSYS/OpenAI in some answers
    assert r["records_in"] == 500 and r["records_out"] + r["dropped"].get("refusal or boilerplate", 0) == 500


def test_sparse_langid_scores_match_langid():
    from langid.langid import LanguageIdentifier

    from zhtune.data.filter_lang import identifier

    ours = identifier()
    ref = LanguageIdentifier(
        ours.nb_ptc,
        ours.nb_pc,
        ours.nb_numfeats,
        ours.nb_classes,
        ours.tk_nextmove,
        ours.tk_output,
        norm_probs=True,
    )
    recs = (
        load(shared_asset("data/alpaca_zh_demo.json"))[:20]
        + load(shared_asset("data/alpaca_en_demo.json"))[:20]
    )
    for r in recs:
        text = r["instruction"] + "\n" + r["output"]
        (a, pa), (b, pb) = ours.classify(text), ref.classify(text)
        assert a == b and abs(pa - pb) < 1e-4
