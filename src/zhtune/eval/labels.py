"""Classification by label likelihood: which of a fixed set of answers does the model find most probable?

Each candidate answer is scored as the assistant reply to the prompt, through the same chat format and
segment encoder as training, by the sum of its tokens' log-probabilities (end-of-turn included, so a label
that is a prefix of another is not favoured). This measures a base model fairly: it need not follow an
output format to be counted right.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from zhtune.data.encode import IGNORE, SegmentEncoder
from zhtune.data.templates import ChatFormat, Message


@dataclass
class LabelResult:
    accuracy: float
    n: int
    per_label: dict[str, float]
    predictions: list[str]


def _messages(rec: dict) -> list[Message]:
    prompt = f"{rec['instruction']}\n{rec['input']}" if rec.get("input") else rec["instruction"]
    return [{"role": "user", "content": prompt}]


@torch.inference_mode()
def label_scores(
    model: Any,
    tokenizer: Any,
    fmt: ChatFormat,
    prompts: Sequence[list[Message]],
    labels: Sequence[str],
    batch_size: int = 16,
) -> torch.Tensor:
    """Log-likelihood of each label for each prompt: a tensor [len(prompts), len(labels)]."""
    enc = SegmentEncoder(tokenizer)
    device = next(model.parameters()).device
    rows: list[tuple[list[int], list[int]]] = []
    for msgs in prompts:
        for lab in labels:
            ids, lbl = enc.encode_segments(fmt.segments(list(msgs) + [{"role": "assistant", "content": lab}]))
            rows.append((ids, lbl))
    scores = torch.empty(len(rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        x = torch.full((len(chunk), width), pad, dtype=torch.long)
        y = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (ids, lbl) in enumerate(chunk):
            x[i, : len(ids)] = torch.tensor(ids)
            y[i, : len(lbl)] = torch.tensor(lbl)
            mask[i, : len(ids)] = 1
        logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = y[:, 1:].to(device)
        ok = tgt != IGNORE
        tok_lp = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * ok
        scores[start : start + len(chunk)] = tok_lp.sum(-1).cpu()
    if was_training:
        model.train()
    return scores.view(len(prompts), len(labels))


def label_accuracy(
    model: Any,
    tokenizer: Any,
    fmt: ChatFormat,
    records: Sequence[dict],
    labels: Sequence[str],
    batch_size: int = 16,
) -> LabelResult:
    """Accuracy of label-likelihood predictions on Alpaca-style records whose output is one of ``labels``."""
    scores = label_scores(model, tokenizer, fmt, [_messages(r) for r in records], labels, batch_size)
    pred = [labels[i] for i in scores.argmax(-1).tolist()]
    gold = [r["output"] for r in records]
    correct = [p == g for p, g in zip(pred, gold)]
    per = {}
    for lab in labels:
        idx = [i for i, g in enumerate(gold) if g == lab]
        per[lab] = sum(correct[i] for i in idx) / len(idx) if idx else float("nan")
    return LabelResult(sum(correct) / max(len(correct), 1), len(correct), per, pred)
