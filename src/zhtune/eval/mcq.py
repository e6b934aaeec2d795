"""Multiple-choice accuracy (C-Eval, CMMLU, MMLU) scored by the logits of the answer letters.

A prompt is the subject's header, ``shots`` worked examples from the dev split and the question, ending
where the answer letter goes (``答案：``, ``答案是：``, ``Answer:``). The prediction is whichever of A-D
the model finds most likely as the next token, each letter tokenized exactly as it would follow that prompt
(``A`` after ``答案：``, `` A`` after ``Answer:``). With ``chat`` the same text is the user's turn in the
model's chat template and the letter is the first token of the reply. Prompts too long for
``max_seq_length`` lose shots, then their beginning.

Accuracy is reported per subject, per category (the mean of its subjects, as the benchmarks' authors
report it), as the mean over subjects (``average``) and over questions (``overall``). Questions without a
published answer (C-Eval's test split) are predicted for a submission file instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from zhtune.errors import ConfigError
from zhtune.eval.benchmarks import LETTERS, Benchmark, Question, load_split, subjects_for

log = logging.getLogger(__name__)


@dataclass
class McqOptions:
    benchmark: str
    data_dir: str | None = None
    split: str | None = None
    shots: int = 5
    subjects: list[str] | None = None
    max_questions: int | None = None
    chat: bool = False
    max_seq_length: int = 2048
    batch_size: int = 8
    cache_dir: str | None = None


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=True)["input_ids"])


def answer_tokens(
    tok: Any, prompt: str, prompt_ids: list[int], answers: Sequence[str]
) -> tuple[list[int], list[int]]:
    """How the answers continue ``prompt``: (tokens they all begin with, the token that tells them apart).

    ``" A"`` may be one token or a space token then ``A``; a shared first token is appended to the prompt
    (it multiplies every answer's probability alike, so the ranking is unchanged) and the letters are
    compared at the next position.
    """
    from zhtune.text.encode import SegmentEncoder

    conts = []
    for ans in answers:
        full = _ids(tok, prompt + ans)
        n = len(prompt_ids)
        if full[:n] == prompt_ids and len(full) > n:
            conts.append(full[n:])
        else:  # the answer merged with the prompt's last token: use the answer tokenized as a continuation
            conts.append(SegmentEncoder(tok).encode(ans, first=False))
    return split_shared(conts, f"answers {list(answers)} after {prompt[-20:]!r}")


def split_shared(conts: Sequence[list[int]], what: str) -> tuple[list[int], list[int]]:
    """(the tokens every continuation starts with, each one's first token after them)."""
    shared = 0
    while all(len(c) > shared + 1 for c in conts) and len({c[shared] for c in conts}) == 1:
        shared += 1
    letters = [c[shared] for c in conts]
    if len(set(letters)) != len(letters):
        raise ValueError(f"{what}: no token tells them apart ({conts})")
    return list(conts[0][:shared]), letters


class PromptBuilder:
    """Token ids of a question's prompt and of its four answer letters, within a length budget."""

    def __init__(self, bench: Benchmark, tok: Any, fmt: Any, *, chat: bool, max_len: int):
        from zhtune.text.encode import SegmentEncoder

        self.bench, self.tok, self.fmt, self.chat, self.max_len = bench, tok, fmt, chat, max_len
        self.truncated = 0
        self.fewer_shots = 0
        if chat:
            self.enc = SegmentEncoder(tok)
            conts = [self.enc.encode(letter, first=False) for letter in LETTERS]
            self.chat_answer = split_shared(conts, "answer letters at the start of a reply")

    def text(self, subject: str, shots: Sequence[Question], q: Question) -> str:
        b = self.bench
        parts = [b.header_for(subject)]
        parts += [b.format_question(s, with_answer=s.answer) for s in shots]
        parts.append(b.format_question(q))
        return "".join(parts)

    def _encode(self, text: str) -> list[int]:
        if self.chat:
            return self.enc.prompt_ids(self.fmt, [{"role": "user", "content": text}])
        return _ids(self.tok, text)

    def build(self, subject: str, shots: Sequence[Question], q: Question) -> tuple[list[int], list[int]]:
        k = len(shots)
        while True:
            text = self.text(subject, shots[:k], q)
            ids = self._encode(text)
            if len(ids) <= self.max_len or k == 0:
                break
            k -= 1
        if k < len(shots):
            self.fewer_shots += 1
        if self.chat:
            prefix, letters = self.chat_answer
        else:
            answers = [self.bench.answer_text(x) for x in LETTERS]
            prefix, letters = answer_tokens(self.tok, text, ids, answers)
        ids = ids + prefix
        if len(ids) > self.max_len:
            self.truncated += 1
            ids = ids[-self.max_len :]
        return ids, letters


@torch.inference_mode()
def next_token_logprobs(
    model: Any, prompts: Sequence[list[int]], candidates: Sequence[list[int]], batch_size: int = 8
) -> torch.Tensor:
    """Log-probability of each candidate token right after each prompt: a tensor [len(prompts), k].

    Prompts are batched longest first and left-padded, with position ids counted from each prompt's
    first real token, so a padded batch scores exactly as one prompt at a time does.
    """
    from tqdm import tqdm

    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = torch.empty(len(prompts), len(candidates[0]))
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc="scoring", leave=False, unit="batch"):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        x = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(prompts[i])
            x[r, width - n :] = torch.tensor(prompts[i])
            mask[r, width - n :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = (
            model(
                input_ids=x.to(device),
                attention_mask=mask.to(device),
                position_ids=pos.to(device),
                logits_to_keep=1,
            )
            .logits[:, -1]
            .float()
        )
        logp = torch.log_softmax(logits, dim=-1).cpu()
        for r, i in enumerate(idx):
            out[i] = logp[r, candidates[i]]
    if was_training:
        model.train()
    return out


def evaluate(model: Any, tok: Any, fmt: Any, opts: McqOptions) -> dict[str, Any]:
    """Accuracy per subject and category, and predictions for questions without published answers."""
    from zhtune.eval import benchmarks

    bench = benchmarks.get(opts.benchmark)
    split = opts.split or bench.default_split
    subjects = subjects_for(bench, opts.data_dir, split, opts.subjects)
    builder = PromptBuilder(bench, tok, fmt, chat=opts.chat, max_len=opts.max_seq_length)
    per_subject: dict[str, dict[str, Any]] = {}
    predictions: dict[str, dict[str, str]] = {}
    for subject in subjects:
        questions = load_split(bench, opts.data_dir, split, subject, opts.cache_dir) or []
        if opts.max_questions:
            questions = questions[: opts.max_questions]
        shots: list[Question] = []
        if opts.shots:
            dev = load_split(bench, opts.data_dir, "dev", subject, opts.cache_dir)
            if dev is None:
                raise ConfigError(
                    f"{opts.shots}-shot prompts need {subject}'s dev split, which is not in {opts.data_dir}; "
                    "add it or pass --shots 0"
                )
            shots = [s for s in dev if s.answer][: opts.shots]
        built = [builder.build(subject, shots, q) for q in questions]
        scores = next_token_logprobs(model, [b[0] for b in built], [b[1] for b in built], opts.batch_size)
        pred = [LETTERS[i] for i in scores.argmax(-1).tolist()]
        answered = [(p, q.answer) for p, q in zip(pred, questions) if q.answer]
        correct = sum(p == a for p, a in answered)
        per_subject[subject] = {
            "accuracy": correct / len(answered) if answered else None,
            "correct": correct,
            "n": len(answered),
        }
        missing = {q.id: p for p, q in zip(pred, questions) if not q.answer}
        if missing:
            predictions[subject] = missing
    if builder.fewer_shots or builder.truncated:
        log.warning(
            "%d prompts too long for %d tokens used fewer shots; %d were cut at the start",
            builder.fewer_shots,
            opts.max_seq_length,
            builder.truncated,
        )
    return summarize(bench, split, opts, per_subject, predictions)


def summarize(
    bench: Benchmark,
    split: str,
    opts: McqOptions,
    per_subject: dict[str, dict[str, Any]],
    predictions: dict[str, dict[str, str]],
) -> dict[str, Any]:
    scored = {s: r for s, r in per_subject.items() if r["accuracy"] is not None}
    cats: dict[str, list[float]] = {}
    for s, r in scored.items():
        for c in bench.categories_of(s):
            cats.setdefault(c, []).append(r["accuracy"])
    order = bench.categories + [g for g in bench.groups] + sorted(set(cats) - set(bench.categories))
    n = sum(r["n"] for r in scored.values())
    return {
        "benchmark": bench.name,
        "split": split,
        "shots": opts.shots,
        "chat": opts.chat,
        "average": sum(r["accuracy"] for r in scored.values()) / len(scored) if scored else None,
        "overall": sum(r["correct"] for r in scored.values()) / n if n else None,
        "questions": n,
        "categories": {c: sum(cats[c]) / len(cats[c]) for c in dict.fromkeys(order) if c in cats},
        "subjects": per_subject,
        "unanswered": sum(len(v) for v in predictions.values()),
        "predictions": predictions,
    }
