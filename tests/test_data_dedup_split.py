"""split-long, dedup and stats through the CLI; --num_proc gives the same output as one process."""

from __future__ import annotations

import json
import random

import pytest
from conftest import ZH, shared_asset

from zhtune.cli import main as zhtune
from zhtune.data.jsonl import detect_layout, iter_raw, parse
from zhtune.data.split_long import pack_pairs
from zhtune.text.records import to_messages


def load(path):
    return [parse(p) for _, p, _ in iter_raw(path, detect_layout(path))]


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return path


def test_pack_pairs_keeps_the_last_pair_and_never_emits_empty_pieces():
    assert pack_pairs([5, 5, 5], 10) == [(0, 2), (2, 3)]  # FastChat's script loses the last pair here
    assert pack_pairs([50, 5, 5], 10) == [(0, 1), (1, 3)]  # an over-long pair stays alone; no empty piece
    assert pack_pairs([3, 3, 3], 100) == [(0, 3)]
    assert pack_pairs([], 10) == []


@pytest.mark.parametrize(
    "sample", ["data/sharegpt_dummy_conversation.json", "data/chinese_vicuna_chat_sample.jsonl"]
)
def test_split_long_respects_budget_and_pairs(tmp_path, sp_tokenizer_dir, sample):
    from transformers import AutoTokenizer

    src = shared_asset(sample)
    out, rep = tmp_path / "out.jsonl", tmp_path / "r.json"
    budget, overhead = 96, 6
    args = [
        "--model_name_or_path",
        str(sp_tokenizer_dir),
        "--max_length",
        str(budget),
        "--report_file",
        str(rep),
    ]
    assert zhtune(["data", "split-long", "--in_file", str(src), "--out_file", str(out), *args]) == 0
    tok = AutoTokenizer.from_pretrained(str(sp_tokenizer_dir))

    def cost(m):
        return len(tok(m["content"], add_special_tokens=False)["input_ids"]) + overhead

    originals, pieces = load(src), load(out)
    r = json.loads(rep.read_text())
    assert r["records_in"] == len(originals) and r["records_out"] == len(pieces) > len(originals)
    it = iter(pieces)
    for rec in originals:
        fmt, msgs = to_messages(rec)
        got: list = []
        while len(got) < len(msgs):
            piece = next(it)
            pfmt, pmsgs = to_messages(piece)  # each piece is a valid conversation of the same format
            assert pfmt == fmt and pmsgs[0]["role"] == "user" and pmsgs[-1]["role"] == "assistant"
            total = sum(cost(m) for m in pmsgs)
            assert total <= budget or len(pmsgs) == 2  # only a lone over-long pair may exceed the budget
            got += pmsgs
        assert got == msgs  # pieces, in order, give back the conversation: no turn lost or split
    if "sharegpt" in sample:
        ids = [p["id"] for p in pieces]
        assert len(set(ids)) == len(ids) and "identity_2_0" in ids and "identity_2_2" in ids


def test_split_long_system_prompt_repeated_and_long_pairs_dropped(tmp_path, sp_tokenizer_dir):
    long = "".join(ZH) * 3
    rec = {"messages": [{"role": "system", "content": "你是一个助手。"}]}
    rec["messages"] += [
        {"role": r, "content": c}
        for r, c in [
            ("user", "你好"),
            ("assistant", "你好！"),
            ("user", "长"),
            ("assistant", long),
            ("user", "再见"),
            ("assistant", "再见！"),
        ]
    ]
    src = write_jsonl(tmp_path / "in.jsonl", [rec])
    out = tmp_path / "out.jsonl"
    base = ["data", "split-long", "--in_file", str(src), "--model_name_or_path", str(sp_tokenizer_dir)]
    assert zhtune([*base, "--out_file", str(out), "--max_length", "64"]) == 0
    pieces = [to_messages(p)[1] for p in load(out)]
    assert [len(p) for p in pieces] == [3, 3, 3] and all(p[0]["role"] == "system" for p in pieces)
    assert (
        zhtune([*base, "--out_file", str(out), "--max_length", "64", "--drop_long_pairs", "--overwrite"]) == 0
    )
    assert [[m["content"] for m in to_messages(p)[1][1:]] for p in load(out)] == [
        ["你好", "你好！"],
        ["再见", "再见！"],
    ]


def planted_near_duplicates(n_base=60, seed=0):
    """Distinct Chinese documents, then copies with a few characters changed, and exact copies re-spaced."""
    rng = random.Random(seed)
    chars = "".join(sorted(set("".join(ZH))))
    base = ["".join(rng.choice(chars) for _ in range(200)) for _ in range(n_base)]
    recs, truth = [], []
    for i, text in enumerate(base):
        recs.append({"id": f"b{i}", "instruction": f"问题{i}", "output": text})
        truth.append(False)
    for i in range(0, n_base, 3):  # near: 2 of 200 characters replaced (Jaccard of 5-grams about 0.9)
        t = list(base[i])
        for j in rng.sample(range(200), 2):
            t[j] = rng.choice(chars)
        recs.append({"id": f"n{i}", "instruction": f"问题{i}", "output": "".join(t)})
        truth.append(True)
    for i in range(1, n_base, 10):  # exact after normalisation: spacing and punctuation differ
        recs.append(
            {"id": f"e{i}", "instruction": f"问题 {i}！", "output": base[i][:100] + " \n" + base[i][100:]}
        )
        truth.append(True)
    return recs, truth


def test_dedup_finds_planted_duplicates(tmp_path, capsys):
    recs, truth = planted_near_duplicates()
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    out, rep, clusters = tmp_path / "out.jsonl", tmp_path / "r.json", tmp_path / "clusters.jsonl"
    rc = zhtune(
        [
            "data",
            "dedup",
            "--in_file",
            str(src),
            "--out_file",
            str(out),
            "--report_file",
            str(rep),
            "--clusters_file",
            str(clusters),
        ]
    )
    assert rc == 0
    kept = {r["id"] for r in load(out)}
    removed = {r["id"] for r in recs} - kept
    assert removed == {r["id"] for r, dup in zip(recs, truth) if dup}  # precision and recall of 1 here
    r = json.loads(rep.read_text())
    assert r["dropped"] == {"near duplicate": 20, "exact duplicate": 6}
    rows = [json.loads(x) for x in clusters.read_text().splitlines()]
    assert len(rows) == r["clusters"] == 24 and r["units_removed"] == 26  # two bases have two copies each
    exact = [x for row in rows for x in row["removed"] if x["match"] == "exact"]
    assert len(exact) == 6 and all(x["similarity"] == 1.0 for x in exact)
    # the kept record of each cluster is the first occurrence, at its own line of the input
    for row in rows:
        assert row["kept"]["line"] < min(x["line"] for x in row["removed"])
        assert recs[row["kept"]["line"] - 1]["id"].startswith("b")
    assert "duplicate clusters: 24, conversations removed: 26" in capsys.readouterr().out


def test_dedup_exact_only_and_prompt_level(tmp_path):
    recs, _ = planted_near_duplicates()
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    rep = tmp_path / "r.json"
    base = ["data", "dedup", "--in_file", str(src), "--report_file", str(rep)]
    assert zhtune([*base, "--out_file", str(tmp_path / "a.jsonl"), "--method", "exact"]) == 0
    assert json.loads(rep.read_text())["dropped"] == {"exact duplicate": 6}
    # prompt level: same question text means the same prompt, whatever the answer
    assert zhtune([*base, "--out_file", str(tmp_path / "b.jsonl"), "--level", "prompt"]) == 0
    assert json.loads(rep.read_text())["dropped"] == {"exact duplicate": 26}


def test_dedup_turn_level_cuts_repeated_pairs(tmp_path):
    a = ["你好", "你好！有什么可以帮你？", "北京在哪里？", "北京位于华北平原北部。"]
    b = ["你好", "你好！有什么可以帮你？", "上海有多少人？", "上海常住人口约两千五百万。"]
    c = ["你好", "你好！有什么可以帮你？"]

    def conv(turns):
        return {
            "conversations": [
                {"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)
            ]
        }

    src = write_jsonl(tmp_path / "in.jsonl", [conv(a), conv(b), conv(c)])
    out, rep = tmp_path / "out.jsonl", tmp_path / "r.json"
    assert (
        zhtune(
            [
                "data",
                "dedup",
                "--in_file",
                str(src),
                "--out_file",
                str(out),
                "--level",
                "turn",
                "--report_file",
                str(rep),
            ]
        )
        == 0
    )
    got = [[t["value"] for t in r["conversations"]] for r in load(out)]
    assert got == [a, b[2:]]
    r = json.loads(rep.read_text())
    assert (
        r["changed"] == 1 and r["dropped"] == {"exact duplicate (every turn)": 1} and r["units_removed"] == 2
    )


def test_dedup_on_shared_sharegpt_removes_templated_near_copies(tmp_path):
    src = shared_asset("data/sharegpt_dummy_conversation.json")
    rep, clusters = tmp_path / "r.json", tmp_path / "c.jsonl"
    args = ["--report_file", str(rep), "--clusters_file", str(clusters), "--threshold", "0.9"]
    assert (
        zhtune(["data", "dedup", "--in_file", str(src), "--out_file", str(tmp_path / "o.jsonl"), *args]) == 0
    )
    r = json.loads(rep.read_text())
    assert 0 < r["records_out"] < 500
    recs = load(src)
    by_line = {line: parse(p) for line, p, _ in iter_raw(src, "json")}
    for row in map(json.loads, clusters.read_text().splitlines()[:10]):  # every removal is a real near copy
        kept = by_line[row["kept"]["line"]]
        for x in row["removed"]:
            other = by_line[x["line"]]
            assert x["similarity"] >= 0.9 and kept["id"] != other["id"]
    assert len(recs) == 500


def test_stats_table_png_and_numbers(tmp_path, capsys, bpe_tokenizer_dir):
    from transformers import AutoTokenizer

    src = shared_asset("data/sharegpt_dummy_conversation.json")
    png, rep = tmp_path / "h.png", tmp_path / "r.json"
    args = [
        "--model_name_or_path",
        str(bpe_tokenizer_dir),
        "--plot_file",
        str(png),
        "--report_file",
        str(rep),
    ]
    assert zhtune(["data", "stats", "--in_file", str(src), *args]) == 0
    out = capsys.readouterr().out
    assert "conversation length (tokens)" in out and "languages" in out and str(png) in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = json.loads(rep.read_text())
    tok = AutoTokenizer.from_pretrained(str(bpe_tokenizer_dir))
    msgs = [to_messages(x)[1] for x in load(src)]
    want = sum(len(tok(m["content"], add_special_tokens=False)["input_ids"]) for c in msgs for m in c)
    assert r["conversation_length"]["total"] == want and r["conversation_length"]["count"] == 500
    pairs = {}
    for c in msgs:
        pairs[str(len(c) // 2)] = pairs.get(str(len(c) // 2), 0) + 1
    assert {str(k): v for k, v in r["pairs_per_conversation"].items()} == pairs
    assert r["languages"]["en"] > 450


def test_num_proc_gives_the_same_output(tmp_path):
    sg = shared_asset("data/sharegpt_dummy_conversation.json")
    vc = shared_asset("data/chinese_vicuna_chat_sample.jsonl")
    outs = []
    for n in (1, 2):
        out = tmp_path / f"out{n}.jsonl"
        assert (
            zhtune(
                ["data", "normalize", "--in_file", f"{vc},{sg}", "--out_file", str(out), "--num_proc", str(n)]
            )
            == 0
        )
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] and outs[0].count(b"\n") == 503
