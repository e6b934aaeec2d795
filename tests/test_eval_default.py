"""zhtune eval on the embedded SmolLM2-135M-Instruct and real Chinese data (slow)."""

from __future__ import annotations

import json

import pytest
from eval_data import write_ceval

from zhtune.cli import main as zhtune

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_engine():
    pytest.importorskip("snownlp")
    from zhtune.model.default import locate_default_gguf

    try:
        locate_default_gguf()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"the embedded default model is not installed: {e}")
    from zhtune.config.args import ModelArgs
    from zhtune.eval.cli import ModelSpec, load_model

    return load_model(ModelSpec("default", "default", []), ModelArgs(), None)


def test_letters_are_single_tokens_after_each_prompt(default_engine):
    from zhtune.eval import benchmarks, mcq

    tok = default_engine.tok
    for name in ("ceval", "cmmlu", "mmlu"):
        bench = benchmarks.get(name)
        prompt = bench.format_question(benchmarks.Question("0", "问题", ("甲", "乙", "丙", "丁"), None))
        ids = mcq._ids(tok, prompt)
        prefix, letters = mcq.answer_tokens(tok, prompt, ids, [bench.answer_text(x) for x in "ABCD"])
        assert prefix == [] and [tok.decode([t]).strip() for t in letters] == list("ABCD"), name


def test_default_model_on_real_data(tmp_path, capsys):
    from zhtune.demo.corpus import people_daily_documents, sentiment_splits, write_jsonl

    paragraphs = list(people_daily_documents())
    docs = [d for d in paragraphs[int(len(paragraphs) * 0.9) :] if 60 <= len(d) <= 150][:8]
    news = tmp_path / "news.txt"
    news.write_text("\n".join(docs) + "\n", encoding="utf-8")
    _, held = sentiment_splits(10, 12, seed=1)
    write_jsonl(tmp_path / "sentiment.jsonl", held)
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(
        f"""
model_name_or_path: default
max_seq_length: 512
tasks:
  - {{name: news, text_files: [{news}]}}
  - {{name: sentiment, task_file: {tmp_path / "sentiment.jsonl"}}}
  - {{name: ceval, benchmark: ceval, data_dir: {write_ceval(tmp_path / "ceval")}, shots: 1}}
output_dir: {tmp_path / "out"}
""",
        encoding="utf-8",
    )
    assert zhtune(["eval", str(recipe)]) == 0
    r = json.loads((tmp_path / "out" / "eval_results.json").read_text(encoding="utf-8"))["results"]["default"]
    # an English-centric 135M model spells Chinese in ~1.9 byte-level tokens per character, a few bits each
    assert 1.5 < r["news"]["tokens_per_char"] < 2.3 and 5.0 < r["news"]["bpc"] < 12.0
    assert r["news"]["chars"] == sum(len(d) for d in docs)
    assert r["sentiment"]["n"] == 12 and set(r["sentiment"]["per_label"]) == {"正面", "负面"}
    assert r["ceval"]["questions"] == 15
    assert "bits/char" in capsys.readouterr().out
