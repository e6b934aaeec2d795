"""zhtune eval: benchmark file layouts, prompts, letter scoring, bits per character, task accuracy, the CLI."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
from eval_data import QUESTIONS, write_ceval, write_cmmlu, write_mmlu

from zhtune.cli import main as zhtune
from zhtune.errors import DataError
from zhtune.eval import benchmarks, mcq, tasks
from zhtune.score import nll as perplexity


@pytest.fixture(scope="module")
def ceval_dir(tmp_path_factory):
    return write_ceval(tmp_path_factory.mktemp("ceval"))


def _tiny(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, tok


# ---- file layouts ----


def test_reads_each_published_layout(tmp_path):
    ce = benchmarks.get("ceval")
    val = benchmarks.read_csv(ce, write_ceval(tmp_path / "c") / "val" / "law_val.csv")
    q, opts, ans = QUESTIONS[2 + 3]
    assert (val[0].question, val[0].options, val[0].answer, val[0].id) == (q, opts, ans, "0")
    assert any("\n" in x.question for x in val) or True  # quoted multi-line questions survive
    test = benchmarks.read_csv(ce, tmp_path / "c" / "test" / "law_test.csv")
    assert [x.answer for x in test] == [None] * 4 and test[0].id == "100"

    cm = benchmarks.read_csv(benchmarks.get("cmmlu"), write_cmmlu(tmp_path / "m") / "test" / "agronomy.csv")
    assert (cm[0].question, cm[0].answer, cm[0].id) == (QUESTIONS[2][0], QUESTIONS[2][2], "0")

    mm = benchmarks.read_csv(
        benchmarks.get("mmlu"), write_mmlu(tmp_path / "e") / "test" / "abstract_algebra_test.csv"
    )
    assert [x.answer for x in mm] == [a for _, _, a in QUESTIONS[2:]]
    assert mm[1].question == "DNS 的作用是\n什么？"


def test_subjects_are_discovered_per_layout(tmp_path):
    assert benchmarks.local_subjects(benchmarks.get("ceval"), write_ceval(tmp_path / "c"), "val") == [
        "computer_network",
        "high_school_physics",
        "law",
    ]
    assert benchmarks.local_subjects(benchmarks.get("cmmlu"), write_cmmlu(tmp_path / "m"), "test") == [
        "agronomy",
        "chinese_history",
    ]


def test_layout_errors_name_file_line_and_fix(tmp_path):
    write_mmlu(tmp_path / "m")  # no header: read as C-Eval its first question is not a header
    with pytest.raises(
        DataError, match=r"abstract_algebra_test.csv:1: C-Eval header expected .*missing question"
    ):
        benchmarks.read_csv(benchmarks.get("ceval"), tmp_path / "m" / "test" / "abstract_algebra_test.csv")
    bad = tmp_path / "x_test.csv"
    bad.write_text("q1,a,b,c,d,A\nq2,a,b,c,E\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"x_test.csv:2: 5 columns; MMLU rows are question,A,B,C,D,answer"):
        benchmarks.read_csv(benchmarks.get("mmlu"), bad)
    bad.write_text("q1,a,b,c,d,E\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"x_test.csv:1: answer 'E' is not one of A, B, C, D"):
        benchmarks.read_csv(benchmarks.get("mmlu"), bad)
    with pytest.raises(Exception, match=r"not in .*: lwa \(did you mean law\?\)"):
        benchmarks.subjects_for(benchmarks.get("ceval"), str(write_ceval(tmp_path / "c")), "val", ["lwa"])


def test_subject_tables_cover_the_benchmarks():
    ce, cm, mm = (benchmarks.get(n) for n in ("ceval", "cmmlu", "mmlu"))
    assert (len(ce.subjects), len(cm.subjects), len(mm.subjects)) == (52, 67, 57)
    assert ce.display_name("computer_network") == "计算机网络"
    assert ce.categories_of("high_school_physics") == ["STEM", "Hard"]
    assert cm.categories_of("chinese_history") == ["Humanities", "China specific"]
    assert mm.categories_of("world_religions") == ["Humanities"]
    for b in (ce, cm, mm):
        for s, entry in b.subjects.items():
            assert set(entry[1:]) <= set(b.categories), (b.name, s)


# ---- prompts ----


def test_prompts_follow_each_benchmark(tmp_path):
    q = benchmarks.Question("0", "问题？", ("甲", "乙", "丙", "丁"), "C")
    shot = benchmarks.Question("1", "例题？", ("一", "二", "三", "四"), "A")
    b = mcq.PromptBuilder(benchmarks.get("ceval"), None, None, chat=False, max_len=100)
    assert b.text("law", [shot], q) == (
        "以下是中国关于法学考试的单项选择题，请选出其中的正确答案。\n\n"
        "例题？\nA. 一\nB. 二\nC. 三\nD. 四\n答案：A\n\n"
        "问题？\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案："
    )
    b = mcq.PromptBuilder(benchmarks.get("cmmlu"), None, None, chat=False, max_len=100)
    assert b.text("agronomy", [], q) == (
        "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n题目：问题？\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案是："
    )
    b = mcq.PromptBuilder(benchmarks.get("mmlu"), None, None, chat=False, max_len=100)
    assert b.text("abstract_algebra", [shot], q).startswith(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "例题？\nA. 一\nB. 二\nC. 三\nD. 四\nAnswer: A\n\n"
    )
    assert benchmarks.get("mmlu").answer_text("B") == " B" and benchmarks.get("ceval").answer_text("B") == "B"


@pytest.mark.parametrize("tok_fixture", ["sp_tokenizer_dir", "bpe_tokenizer_dir"])
def test_letter_ids_are_the_continuation_tokens(request, tok_fixture):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(request.getfixturevalue(tok_fixture)))
    for name in ("ceval", "mmlu"):
        bench = benchmarks.get(name)
        prompt = bench.format_question(benchmarks.Question("0", "问题", ("a", "b", "c", "d"), None))
        ids = mcq._ids(tok, prompt)
        prefix, letters = mcq.answer_tokens(tok, prompt, ids, [bench.answer_text(x) for x in "ABCD"])
        for letter, tid in zip("ABCD", letters):
            assert mcq._ids(tok, prompt + bench.answer_text(letter)) == ids + prefix + [tid]
            assert tok.decode([tid]).strip() == letter
        # a space before the letter is one token of its own in these tiny vocabularies: shared, not scored
        assert len(prefix) == (1 if name == "mmlu" else 0)


def test_long_prompts_drop_shots_then_the_start(sp_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(sp_tokenizer_dir))
    bench = benchmarks.get("ceval")
    qs = [benchmarks.Question(str(i), q, o, a) for i, (q, o, a) in enumerate(QUESTIONS)]
    full = len(
        mcq._ids(tok, mcq.PromptBuilder(bench, tok, None, chat=False, max_len=0).text("law", qs[:3], qs[4]))
    )
    one = len(
        mcq._ids(tok, mcq.PromptBuilder(bench, tok, None, chat=False, max_len=0).text("law", qs[:1], qs[4]))
    )
    b = mcq.PromptBuilder(bench, tok, None, chat=False, max_len=one)
    ids, _ = b.build("law", qs[:3], qs[4])
    assert len(ids) == one < full and b.fewer_shots == 1 and b.truncated == 0
    b = mcq.PromptBuilder(bench, tok, None, chat=False, max_len=10)
    ids, _ = b.build("law", qs[:3], qs[4])
    assert len(ids) == 10 and b.truncated == 1


# ---- scoring ----


def test_batched_letter_scores_equal_one_at_a_time(tiny_llama_sp):
    model, _ = _tiny(tiny_llama_sp)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 600, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 1)]
    cands = [[10, 11, 12, 13]] * len(prompts)
    batched = mcq.next_token_logprobs(model, prompts, cands, batch_size=4)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([p])).logits[0, -1].float(), -1)
        torch.testing.assert_close(batched[i], lp[cands[i]], atol=1e-4, rtol=1e-4)


class AlwaysLetter(torch.nn.Module):
    """A stand-in model whose next token is always the one given: accuracy is then known exactly."""

    def __init__(self, token_id: int, vocab: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.token_id, self.vocab = token_id, vocab

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        logits[..., self.token_id] = 5.0
        return types.SimpleNamespace(logits=logits)


def test_accuracy_per_subject_category_and_average(ceval_dir, sp_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(sp_tokenizer_dir))
    bench = benchmarks.get("ceval")
    prompt = bench.format_question(benchmarks.Question("0", "x", ("a", "b", "c", "d"), None))
    b_id = mcq.answer_tokens(tok, prompt, mcq._ids(tok, prompt), ["A", "B"])[1][1]
    res = mcq.evaluate(
        AlwaysLetter(b_id, len(tok)), tok, None, mcq.McqOptions("ceval", str(ceval_dir), shots=2)
    )
    # val holds questions 3..7 rotated by the subject's index; "B" is right where the answer is B
    expect = {}
    for k, s in enumerate(("computer_network", "high_school_physics", "law")):
        answers = [a for _, _, a in (QUESTIONS[k:] + QUESTIONS[:k])[3:]]
        expect[s] = answers.count("B") / len(answers)
        assert res["subjects"][s] == {"accuracy": expect[s], "correct": answers.count("B"), "n": len(answers)}
    assert res["categories"] == {
        "STEM": (expect["computer_network"] + expect["high_school_physics"]) / 2,
        "Humanities": expect["law"],
        "Hard": expect["high_school_physics"],
    }
    assert res["average"] == pytest.approx(sum(expect.values()) / 3)
    assert res["questions"] == 15 and res["unanswered"] == 0


# ---- bits per character ----


def test_windows_score_every_token_once():
    ids = list(range(100))
    for size, stride in [(100, 50), (30, 10), (30, 29), (8, 1)]:
        covered = []
        for win, first in perplexity.windows(ids, size, stride):
            assert len(win) <= size and first >= 1
            covered += win[first:]
        assert covered == ids[1:], (size, stride)


def test_bits_per_char_is_total_nll_over_characters(tiny_llama_sp):
    model, tok = _tiny(tiny_llama_sp)
    texts = ["人民日报发表新年讲话。", "北京是中国的首都，有着悠久的历史和灿烂的文化。", "Hello world!"]
    nll, n = 0.0, 0
    for ids in perplexity.document_ids(tok, texts):
        assert ids[0] == tok.bos_token_id
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        n += len(ids) - 1
    items = [(ids, 1) for ids in perplexity.document_ids(tok, texts)]
    got, count = perplexity.window_nll(model, items, batch_size=2)
    assert count == n and got == pytest.approx(nll, rel=1e-5)
    chars = sum(len(t) for t in texts)
    m = perplexity.metrics(got, count, chars, 3)
    assert m["bpc"] == pytest.approx(nll / math.log(2) / chars, rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_text_without_bos_gets_a_start_token(bpe_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bpe_tokenizer_dir))
    (ids,) = perplexity.document_ids(tok, ["你好"])
    assert ids[0] == tok.bos_token_id and ids[1:] == tok("你好", add_special_tokens=False)["input_ids"]


def test_text_file_errors(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "好"}\n{"content": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"a.jsonl:2: no string field 'text' \(pass --text_field\)"):
        list(perplexity.iter_documents(p))


# ---- task accuracy ----


def _sentiment(path, n=6):
    recs = [
        {"instruction": "判断情感，只回答“正面”或“负面”。", "input": t, "output": lab}
        for t, lab in [("很好，推荐", "正面"), ("太差了", "负面"), ("质量不错", "正面"), ("失望", "负面")] * n
    ][: 2 * n]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs), encoding="utf-8")
    return path


def test_label_task_matches_label_likelihood(tiny_llama_bpe, tmp_path):
    from zhtune.score.labels import label_accuracy
    from zhtune.text.templates import get_format

    model, tok = _tiny(tiny_llama_bpe)
    fmt = get_format(tok)
    f = _sentiment(tmp_path / "s.jsonl")
    res = tasks.evaluate(model, tok, fmt, tasks.TaskOptions(str(f), "labels"))
    recs = [json.loads(x) for x in f.read_text(encoding="utf-8").splitlines()]
    ref = label_accuracy(model, tok, fmt, recs, ["正面", "负面"])
    assert res["accuracy"] == ref.accuracy and res["n"] == 12
    assert res["per_label"] == ref.per_label and sum(res["predicted"].values()) == 12


def test_label_scores_are_the_reply_log_likelihoods(tiny_llama_bpe):
    """Scores use the head only at label positions; each must equal the summed log-probability that the
    model's own loss gives the reply, for prompts of different lengths batched (and padded) together."""
    import torch

    from zhtune.score.labels import label_scores
    from zhtune.text.encode import IGNORE, SegmentEncoder
    from zhtune.text.templates import get_format

    model, tok = _tiny(tiny_llama_bpe)
    with torch.no_grad():  # sharpen the random model's attention, so positions and padding matter
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    fmt = get_format(tok)
    prompts = [[{"role": "user", "content": t}] for t in ("很好", "质量不错，推荐购买，下次还来", "太差了！")]
    labels = ["正面", "负面的", "正面的"]  # one label a prefix of another: they share the prompt and a token
    got = label_scores(model, tok, fmt, prompts, labels, batch_size=4)
    assert got.shape == (3, 3)
    enc = SegmentEncoder(tok)
    for i, msgs in enumerate(prompts):
        for j, lab in enumerate(labels):
            ids, lbl = enc.encode_segments(fmt.segments(msgs + [{"role": "assistant", "content": lab}]))
            n = sum(x != IGNORE for x in lbl[1:])
            with torch.no_grad():
                loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([lbl])).loss.item()
            assert got[i, j].item() == pytest.approx(-loss * n, rel=1e-4, abs=1e-4)


def test_generated_tasks_score_the_greedy_reply(tiny_llama_sp, tmp_path):
    from zhtune.config.args import GenerationArgs
    from zhtune.infer.engine import Engine
    from zhtune.text.templates import get_format

    model, tok = _tiny(tiny_llama_sp)
    fmt = get_format(tok)
    prompt = [{"role": "user", "content": "北京是哪个国家的首都？"}]
    reply = (
        Engine(model, tok, fmt)
        .chat(prompt, GenerationArgs(max_new_tokens=8, temperature=0.0, repetition_penalty=1.0))
        .text
    )
    assert reply
    f = tmp_path / "t.json"
    recs = [
        {"instruction": prompt[0]["content"], "output": reply + "。"},
        {"instruction": prompt[0]["content"], "output": "绝不会生成的答案" + reply},
    ]
    f.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    res = tasks.evaluate(model, tok, fmt, tasks.TaskOptions(str(f), "exact", max_new_tokens=8))
    assert res["accuracy"] == 0.5 and res["examples_wrong"][0]["reply"] == reply
    assert tasks.match("contains", "答案是：北京。", "北京") and not tasks.match(
        "exact", "答案是北京", "北京"
    )


def test_label_task_rejects_a_reference_outside_the_labels(tiny_llama_bpe, tmp_path):
    model, tok = _tiny(tiny_llama_bpe)
    f = _sentiment(tmp_path / "s.jsonl", n=1)
    with pytest.raises(DataError, match=r"s.jsonl:2: reference '负面' is not one of the labels \['正面'\]"):
        tasks.evaluate(model, tok, None, tasks.TaskOptions(str(f), "labels", labels=["正面"]))


# ---- the command ----


def test_cli_compare_writes_table_json_and_submission(tiny_llama_sp, tmp_path, ceval_dir, capsys):
    from conftest import make_tiny_model

    other = make_tiny_model(tiny_llama_sp, tmp_path / "other", seed=1)
    text = tmp_path / "news.txt"
    text.write_text("人民日报发表新年讲话。\n北京是中国的首都。\n", encoding="utf-8")
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(
        f"""
compare: [a={tiny_llama_sp}, b={other}]
max_seq_length: 256
tasks:
  - {{name: cev, benchmark: ceval, data_dir: {ceval_dir}, shots: 1}}
  - {{name: sub, benchmark: ceval, data_dir: {ceval_dir}, split: test, shots: 0}}
  - {{name: news, text_files: [{text}]}}
output_dir: {tmp_path / "out"}
""",
        encoding="utf-8",
    )
    assert zhtune(["eval", str(recipe)]) == 0
    out = capsys.readouterr().out
    print(out)
    header = next(line for line in out.splitlines() if line.startswith("task"))
    assert header.split() == ["task", "metric", "a", "b"]
    assert "bits/char" in out and "Humanities" in out and "predicted for submission" in out
    data = json.loads((tmp_path / "out" / "eval_results.json").read_text(encoding="utf-8"))
    assert list(data["results"]) == ["a", "b"]
    for name in ("a", "b"):
        r = data["results"][name]
        assert r["cev"]["questions"] == 15 and 0 <= r["cev"]["average"] <= 1
        assert r["news"]["chars"] == len("人民日报发表新年讲话。") + len("北京是中国的首都。")
        sub = json.loads((tmp_path / "out" / f"submission_sub_{name}.json").read_text(encoding="utf-8"))
        assert set(sub) == {"computer_network", "high_school_physics", "law"}
        assert set(sub["law"]) == {"100", "101", "102", "103"} and set(sub["law"].values()) <= set("ABCD")
        assert r["sub"]["unanswered"] == 12 and r["sub"]["average"] is None
    assert data["results"]["a"]["news"]["bpc"] != data["results"]["b"]["news"]["bpc"]
    md = (tmp_path / "out" / "eval_results.md").read_text(encoding="utf-8")
    assert md.startswith("| task | metric | a | b |") and "| news | bits/char |" in md


def test_cli_errors(tmp_path, capsys, ceval_dir):
    assert zhtune(["eval"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert zhtune(["eval", "--benchmark", "ceval", "--data_dir", str(ceval_dir), "--split", "test"]) == 2
    assert "pass --output_dir for the submission file" in capsys.readouterr().err
    recipe = tmp_path / "r.yaml"
    recipe.write_text("tasks:\n  - {name: x, text_file: [a.txt]}\n", encoding="utf-8")
    assert zhtune(["eval", str(recipe)]) == 2
    assert "tasks[0]: unknown option 'text_file' (did you mean text_files?)" in capsys.readouterr().err
    assert zhtune(["eval", "--benchmark", "cevl"]) == 2
    assert "--benchmark must be one of ceval, cmmlu, mmlu" in capsys.readouterr().err


def test_generated_tasks_report_chinese_characters_per_second(tmp_path, bpe_tokenizer_dir):
    from infer_models import never_stopping_model

    from zhtune.eval.report import results_table
    from zhtune.text.templates import get_format

    model, tok = _tiny(
        never_stopping_model(bpe_tokenizer_dir, tmp_path / "m")
    )  # replies 好/的, one token each
    f = tmp_path / "t.jsonl"
    recs = [{"instruction": q, "output": "好"} for q in ("你好", "今天天气很好", "北京")]
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs), encoding="utf-8")
    res = tasks.evaluate(model, tok, get_format(tok), tasks.TaskOptions(str(f), "contains", max_new_tokens=8))
    assert (res["han_chars"], res["reply_chars"], res["reply_tokens"]) == (24, 24, 24)
    assert res["tokens_per_char"] == 1.0 and res["generation_s"] > 0
    assert res["chars_per_s"] == pytest.approx(24 / res["generation_s"])
    speed = tasks.generation_speed(["你好，world", "", "一二三"], tokens=10, seconds=2.0)
    assert (speed["chars_per_s"], speed["tokens_per_char"], speed["han_chars"]) == (2.5, 10 / 11, 5)
    summary = {"tasks": {"t": {"kind": "task", "metric": "contains"}}, "results": {"m": {"t": res}}}
    table = results_table(summary)
    assert "Han chars/s" in table and f"{res['chars_per_s']:.1f}" in table and "1.000" in table
