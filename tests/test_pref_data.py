"""Preference encoding: replies decode back to exactly their texts plus the end-of-turn token, the prompt is the
SFT/inference prefix, every TRL layout's columns agree, the truncation rule, and the cached datasets build."""

from __future__ import annotations

import json

import pytest
from conftest import shared_asset
from transformers import AutoTokenizer

from zhtune.config.args import DataArgs
from zhtune.errors import ConfigError, DataError
from zhtune.text.encode import IGNORE, SegmentEncoder
from zhtune.text.preference import Pair, Unpaired, read_preferences
from zhtune.text.templates import get_format
from zhtune.train.pref_data import (
    KEPT,
    LOSS_LAYOUT,
    build_preference_data,
    encode_example,
    encode_pair,
    truncate,
)

MULTI = Pair(
    [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "你好，北京在哪里？"},
        {"role": "assistant", "content": "北京位于华北平原的北部。"},
        {"role": "user", "content": "Write a two-line poem about the sea {braces}."},
    ],
    "The sea is wide and blue,\nit sings all night for you.",
    "大海。",
)
SINGLE = Pair(
    [{"role": "user", "content": "请介绍一下北京。"}], "北京是中国的首都，有三千多年的历史。", " sea"
)


@pytest.fixture(scope="module", params=["sp", "bpe"])
def tok(request, sp_tokenizer_dir, bpe_tokenizer_dir):
    return AutoTokenizer.from_pretrained(
        str(sp_tokenizer_dir if request.param == "sp" else bpe_tokenizer_dir)
    )


def end_of_turn(tok, template: str) -> str:
    return tok.eos_token if template == "alpaca" else "<|im_end|>"


def added_text(tok, before: list[int], after: list[int]) -> str:
    """The text ``after`` adds when decoded after ``before`` (SentencePiece decodes a piece differently at the
    start of a sequence, so decode the prefix and the whole and compare)."""
    a = tok.decode(before, skip_special_tokens=False)
    b = tok.decode(before + after, skip_special_tokens=False)
    assert b.startswith(a)
    return b[len(a) :]


@pytest.mark.parametrize("template", ["alpaca", "chatml"])
@pytest.mark.parametrize("pair", [SINGLE, MULTI], ids=["single", "multi_turn"])
def test_replies_decode_to_exactly_their_text_and_end_of_turn(tok, template, pair):
    fmt = get_format(tok, template)
    enc = SegmentEncoder(tok)
    end = end_of_turn(tok, template)
    prompt, chosen, rejected = encode_pair(fmt, enc, pair)
    assert added_text(tok, prompt, chosen) == pair.chosen + end
    assert added_text(tok, prompt, rejected) == pair.rejected + end
    # the prompt is what inference generates from, and prompt + reply is SFT's encoding up to the end-of-turn
    assert prompt == enc.prompt_ids(fmt, pair.prompt)
    conv = pair.prompt + [{"role": "assistant", "content": pair.chosen}]
    ids, labels = enc.encode_segments(fmt.segments(conv))
    assert ids[: len(prompt) + len(chosen)] == prompt + chosen
    assert labels[len(prompt) : len(prompt) + len(chosen)] == chosen
    assert labels[len(prompt) - 1] == IGNORE and all(x == IGNORE for x in labels[len(prompt) + len(chosen) :])


def test_the_models_own_jinja_template_splits_the_same_way(bpe_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(bpe_tokenizer_dir))
    fmt = get_format(tok, "model")
    prompt, chosen, _ = encode_pair(fmt, SegmentEncoder(tok), MULTI)
    assert added_text(tok, prompt, chosen) == MULTI.chosen + "<|im_end|>"  # not the "\n" after it
    assert tok.decode(prompt, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_every_layout_carries_the_same_ids(tok):
    fmt, enc = get_format(tok, "chatml"), SegmentEncoder(tok)
    dpo, s1 = encode_example(fmt, enc, MULTI, "dpo", max_length=4096)
    cpo, s2 = encode_example(fmt, enc, MULTI, "cpo", max_length=4096)
    assert s1 == s2 == "ok"
    p = dpo["prompt_ids"]
    assert cpo["prompt_input_ids"] == p and cpo["prompt_attention_mask"] == [1] * len(p)
    for side in ("chosen", "rejected"):
        reply = dpo[f"{side}_ids"]
        assert cpo[f"{side}_input_ids"] == p + reply
        assert cpo[f"{side}_attention_mask"] == [1] * (len(p) + len(reply))
        assert cpo[f"{side}_labels"] == [IGNORE] * len(p) + reply
    kto, _ = encode_example(fmt, enc, Unpaired(MULTI.prompt, MULTI.rejected, False), "kto", max_length=4096)
    assert kto == {"prompt_ids": p, "completion_ids": dpo["rejected_ids"], "label": False}
    assert set(LOSS_LAYOUT) == {"dpo", "ipo", "orpo", "simpo", "kto"}


P = [1, 10, 11, 12, 13, 14, 15, 16]  # a prompt starting with BOS 1


@pytest.mark.parametrize(
    "replies,max_length,max_prompt,truncation,want",
    [
        ([[20, 21], [30]], 10, None, "auto", (P, [[20, 21], [30]], "ok")),
        ([[20, 21], [30]], 10, 8, "auto", (P, [[20, 21], [30]], "ok")),
        # the prompt keeps its BOS and its end
        ([[20, 21], [30]], 10, 4, "auto", ([1, 14, 15, 16], [[20, 21], [30]], "prompt_cut")),
        # replies lose their end, to the room left
        ([[20, 21, 22, 23], [30]], 10, None, "auto", (P, [[20, 21], [30]], "reply_cut")),
        (
            [[20, 21, 22, 23, 24, 25, 26], [30]],
            10,
            4,
            "auto",
            ([1, 14, 15, 16], [[20, 21, 22, 23, 24, 25], [30]], "both_cut"),
        ),
        # no room left for a reply, or the cut makes both replies the same: dropped
        ([[20], [30]], 8, None, "auto", (P, [[20], [30]], "no_room")),
        ([[20, 21, 22], [20, 21, 23]], 10, None, "auto", (P, [[20, 21], [20, 21]], "same_after_cut")),
        ([[20, 21, 22], [30]], 10, None, "drop", (P, [[20, 21, 22], [30]], "too_long")),
        ([[20, 21]], 10, 3, "auto", ([1, 15, 16], [[20, 21]], "prompt_cut")),  # KTO: one reply
    ],
)
def test_truncation_rule(replies, max_length, max_prompt, truncation, want):
    assert truncate(P, replies, max_length, max_prompt, bos_id=1, truncation=truncation) == want


def test_prompt_without_bos_keeps_just_its_end():
    assert truncate([5, 6, 7, 8], [[9]], 10, 2, bos_id=1) == ([7, 8], [[9]], "prompt_cut")


def write_pairs(path, n=12):
    recs = []
    for i in range(n):
        prompt = [{"from": "human", "value": f"第{i}个问题：北京在哪里？" + "请详细说明。" * (i % 4) * 3}]
        recs.append(
            {
                "conversations": prompt,
                "chosen": {"from": "gpt", "value": f"北京位于华北平原的北部（{i}）。" + "历史悠久。" * i},
                "rejected": {"from": "gpt", "value": f"I do not know ({i})."},
            }
        )
    path.write_text(json.dumps(recs, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def data_args(tmp_path, files, **kw):
    return DataArgs(train_files=[str(f) for f in files], data_cache_dir=str(tmp_path / "cache"), **kw)


@pytest.mark.parametrize("layout", ["dpo", "cpo", "kto"])
def test_built_sets_keep_the_rule_and_count_what_they_drop(tmp_path, tok, layout):
    f = write_pairs(tmp_path / "pairs.json")
    fmt = get_format(tok, "chatml")
    d = data_args(tmp_path, [f], max_seq_length=48)
    train, ev, rep = build_preference_data(tok, fmt, d, layout=layout, seed=0, max_prompt_length=24)
    assert ev is None and rep.records == 12 and rep.examples == (24 if layout == "kto" else 12)
    kept = sum(getattr(rep, s) for s in KEPT)
    dropped = rep.too_long + rep.no_room + rep.same_after_cut
    assert kept + dropped == rep.examples and len(train) == rep.train_samples == kept
    assert (
        rep.prompt_cut + rep.both_cut > 0 and rep.reply_cut + rep.both_cut > 0
    )  # the data exercises the cuts
    for row in train:
        if layout == "cpo":
            assert len(row["prompt_input_ids"]) <= 24 and len(row["chosen_input_ids"]) <= 48
            assert row["chosen_labels"][: len(row["prompt_input_ids"])] == [IGNORE] * len(
                row["prompt_input_ids"]
            )
        else:
            replies = [row["completion_ids"]] if layout == "kto" else [row["chosen_ids"], row["rejected_ids"]]
            assert len(row["prompt_ids"]) <= 24 and all(
                len(row["prompt_ids"]) + len(r) <= 48 for r in replies
            )
    if layout == "kto":
        assert sorted(train["label"]) == [False] * 12 + [True] * 12


def test_built_set_is_cached_by_content(tmp_path, tok):
    f = write_pairs(tmp_path / "pairs.json")
    fmt = get_format(tok, "alpaca")
    d = data_args(tmp_path, [f], max_seq_length=4096)
    a, _, rep = build_preference_data(tok, fmt, d, layout="dpo", seed=0)
    b, _, rep2 = build_preference_data(tok, fmt, d, layout="dpo", seed=0)
    assert not rep.cached and rep2.cached and a["chosen_ids"] == b["chosen_ids"]
    # the rows are the pairs, in the dpo columns
    by_prompt = {tuple(r["prompt_ids"]): r for r in a}
    enc = SegmentEncoder(tok)
    for _, _, pair in read_preferences([f]):
        p, c, r = encode_pair(fmt, enc, pair)
        assert by_prompt[tuple(p)]["chosen_ids"] == c and by_prompt[tuple(p)]["rejected_ids"] == r
    f.write_text(f.read_text(encoding="utf-8").replace("I do not know", "No idea"), encoding="utf-8")
    c, _, rep3 = build_preference_data(tok, fmt, d, layout="dpo", seed=0)
    assert not rep3.cached and c["rejected_ids"] != a["rejected_ids"]


def test_bad_record_in_a_built_set_names_its_line_or_is_counted(tmp_path, tok):
    f = tmp_path / "pairs.jsonl"
    good = json.dumps(
        {"prompt": "北京在哪里？", "chosen": "华北平原。", "rejected": "不知道。"}, ensure_ascii=False
    )
    f.write_text("\n".join([good, good, json.dumps({"prompt": "x", "chosen": "y"}), good]) + "\n")
    fmt = get_format(tok, "chatml")
    with pytest.raises(DataError, match=r"pairs.jsonl:3: missing field 'rejected'"):
        build_preference_data(tok, fmt, data_args(tmp_path, [f]), layout="dpo", seed=0)
    d = data_args(tmp_path, [f], skip_bad_records=True, validation_split_percentage=34)
    train, ev, rep = build_preference_data(tok, fmt, d, layout="dpo", seed=0)
    assert (rep.records, rep.bad_records, len(train), len(ev)) == (4, 1, 2, 1)
    assert rep.bad_reasons == {"missing field 'rejected'": 1}


def test_options_that_leave_no_room_are_refused(tmp_path, tok):
    d = data_args(tmp_path, [write_pairs(tmp_path / "p.json")], max_seq_length=64)
    with pytest.raises(ConfigError, match="--max_prompt_length 64 must be positive and below"):
        build_preference_data(tok, get_format(tok, "chatml"), d, layout="dpo", seed=0, max_prompt_length=64)
    with pytest.raises(ConfigError, match="unknown preference layout 'orpo'"):
        build_preference_data(tok, get_format(tok, "chatml"), d, layout="orpo", seed=0)


def test_the_real_dpo_demo_encodes_exactly(tmp_path, bpe_tokenizer_dir):
    path = shared_asset("data/dpo_zh_demo.json")
    tok = AutoTokenizer.from_pretrained(str(bpe_tokenizer_dir))
    fmt, enc = get_format(tok, "chatml"), SegmentEncoder(tok)
    pairs = [x for _, _, x in read_preferences([path])]
    for pair in pairs[::10]:
        prompt, chosen, rejected = encode_pair(fmt, enc, pair)
        assert added_text(tok, prompt, chosen) == pair.chosen + "<|im_end|>"
        assert added_text(tok, prompt, rejected) == pair.rejected + "<|im_end|>"
    d = data_args(tmp_path, [path], max_seq_length=1024)
    train, _, rep = build_preference_data(tok, fmt, d, layout="dpo", seed=0, max_prompt_length=512)
    assert rep.records == 300 and rep.bad_records == 0 and rep.examples == 300
    # a 600-piece tokenizer spends about a token per byte, so many are cut, but none vanish
    assert len(train) == rep.ok + rep.prompt_cut + rep.reply_cut + rep.both_cut == 300
    assert rep.ok > 0 and rep.reply_cut > 0 and rep.prompt_cut > 0


def test_trls_own_collators_supervise_exactly_the_replies(tok):
    """The column contract, checked against TRL's collators (runs where TRL is installed)."""
    pytest.importorskip("trl")
    import torch
    from trl.experimental.utils import DPODataCollatorWithPadding
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    fmt, enc = get_format(tok, "chatml"), SegmentEncoder(tok)
    pairs = [MULTI, SINGLE]
    dpo = [encode_example(fmt, enc, x, "dpo", max_length=4096)[0] for x in pairs]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    b = DataCollatorForPreference(pad_token_id=pad)(dpo)
    replies = [r["chosen_ids"] for r in dpo] + [r["rejected_ids"] for r in dpo]
    for i, reply in enumerate(replies):  # chosen rows first, then rejected
        assert b["input_ids"][i][b["completion_mask"][i].bool()].tolist() == reply

    cpo = [encode_example(fmt, enc, x, "cpo", max_length=4096)[0] for x in pairs]
    b = DPODataCollatorWithPadding(pad_token_id=pad)(cpo)
    for i, row in enumerate(dpo):
        for side in ("chosen", "rejected"):
            labels = b[f"{side}_labels"][i, 1:]  # CPO/ORPO score token t+1 from position t
            scored = b[f"{side}_input_ids"][i, 1:][labels != IGNORE]
            assert scored.tolist() == row[f"{side}_ids"] and torch.equal(labels[labels != IGNORE], scored)

    kto = [
        encode_example(fmt, enc, Unpaired(x.prompt, x.rejected, False), "kto", max_length=4096)[0]
        for x in pairs
    ]
    b = DataCollatorForUnpairedPreference(pad_token_id=pad)(kto)
    for i, row in enumerate(dpo):
        assert b["input_ids"][i][b["completion_mask"][i].bool()].tolist() == row["rejected_ids"]
    assert b["label"].tolist() == [False, False]
