"""Classification by label likelihood: which of a fixed set of answers does the model find most probable?

Each candidate answer is scored as the assistant reply to the prompt, through the same chat format and
segment encoder as training, by the sum of its tokens' log-probabilities (end-of-turn included, so a label
that is a prefix of another is not favoured). This measures a base model fairly: it need not follow an
output format to be counted right.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from zhtune.score.loss import capture_final_hidden, head_weight
from zhtune.text.encode import IGNORE, SegmentEncoder
from zhtune.text.templates import ChatFormat, Message


@dataclass
class LabelResult:
    accuracy: float
    n: int
    per_label: dict[str, float]
    predictions: list[str]


def _messages(rec: dict) -> list[Message]:
    prompt = f"{rec['instruction']}\n{rec['input']}" if rec.get("input") else rec["instruction"]
    return [{"role": "user", "content": prompt}]


def _encode(enc: SegmentEncoder, fmt: ChatFormat, msgs: list[Message], labels: Sequence[str]):
    """Each label's (ids, labels) as the reply to ``msgs``, and the length of the ids they all start with
    (at most one less than the shortest, so every label keeps a token of its own)."""
    rows = [
        enc.encode_segments(fmt.segments(list(msgs) + [{"role": "assistant", "content": lab}]))
        for lab in labels
    ]
    p = min(len(ids) for ids, _ in rows) - 1
    first = rows[0][0]
    for ids, _ in rows[1:]:
        p = next((i for i in range(p) if ids[i] != first[i]), p)
    return rows, p


def _full_scores(
    model: Any, rows: list[tuple[list[int], list[int]]], pad: int, device: Any, bs: int
) -> torch.Tensor:
    """Every (prompt + label) row through the whole model, logits at every position: the reference path,
    for heads that are not a plain linear layer."""
    scores = torch.empty(len(rows))
    for start in range(0, len(rows), bs):
        chunk = rows[start : start + bs]
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
    return scores


def _shared_prompt_scores(
    model: Any, weight: torch.Tensor, batch: list, n_labels: int, pad: int, device: Any
) -> torch.Tensor:
    """One batch of prompts: the shared prefix (left-padded) runs once and its key/value cache serves every
    label's continuation; the head runs only where a label token is predicted. Returns [prompts, labels]."""
    n = len(batch)
    width = max(p for _, p in batch)
    x = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, (rows, p) in enumerate(batch):
        x[i, width - p :] = torch.tensor(rows[0][0][:p])
        mask[i, width - p :] = 1
    x, mask = x.to(device), mask.to(device)
    with capture_final_hidden(model) as box:
        out = model(
            input_ids=x, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True, logits_to_keep=1,
        )  # fmt: skip
    prefix_h, cache = box["hidden"], out.past_key_values
    scores = torch.zeros(n, n_labels, device=device)
    for j in range(n_labels):
        cont = [rows[j][0][p:] for rows, p in batch]
        cw = max(len(c) for c in cont)
        x2 = torch.full((n, cw), pad, dtype=torch.long)
        m2 = torch.zeros((n, cw), dtype=torch.long)
        for i, c in enumerate(cont):
            x2[i, : len(c)] = torch.tensor(c)
            m2[i, : len(c)] = 1
        x2, m2 = x2.to(device), m2.to(device)
        pos = mask.sum(-1, keepdim=True) + torch.arange(cw, device=device)
        with capture_final_hidden(model) as box:
            model(
                input_ids=x2, attention_mask=torch.cat([mask, m2], dim=1), position_ids=pos,
                past_key_values=copy.deepcopy(cache), use_cache=True, logits_to_keep=1,
            )  # fmt: skip
        cont_h = box["hidden"]
        hs, tgts, owner = [], [], []
        for i, (rows, p) in enumerate(batch):
            ids, lbl = rows[j]
            for t in range(len(ids) - 1):  # the hidden state at t predicts token t + 1
                if lbl[t + 1] == IGNORE:
                    continue
                hs.append(prefix_h[i, width - p + t] if t < p else cont_h[i, t - p])
                tgts.append(ids[t + 1])
                owner.append(i)
        if hs:
            logp = torch.log_softmax((torch.stack(hs).to(weight.dtype) @ weight.t()).float(), dim=-1)
            tok_lp = logp.gather(-1, torch.tensor(tgts, device=device)[:, None]).squeeze(-1)
            scores[:, j].index_add_(0, torch.tensor(owner, device=device), tok_lp)
    return scores.cpu()


@torch.inference_mode()
def label_scores(
    model: Any,
    tokenizer: Any,
    fmt: ChatFormat,
    prompts: Sequence[list[Message]],
    labels: Sequence[str],
    batch_size: int = 16,
) -> torch.Tensor:
    """Log-likelihood of each label for each prompt: a tensor [len(prompts), len(labels)]. The prompt is
    computed once per prompt, not once per label (see _shared_prompt_scores)."""
    enc = SegmentEncoder(tokenizer)
    device = next(model.parameters()).device
    encoded = [_encode(enc, fmt, msgs, labels) for msgs in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    weight = head_weight(model)  # None: a head that is not a plain linear layer; then full logits
    was_training = model.training
    model.eval()
    try:
        if weight is None or any(p < 1 for _, p in encoded):
            rows = [r for rs, _ in encoded for r in rs]
            return _full_scores(model, rows, pad, device, batch_size).view(len(prompts), len(labels))
        per = max(1, batch_size // len(labels)) * 2  # prompts per batch: each is one row, then short rows
        parts = [
            _shared_prompt_scores(model, weight, encoded[s : s + per], len(labels), pad, device)
            for s in range(0, len(encoded), per)
        ]
        return torch.cat(parts) if parts else torch.empty(0, len(labels))
    finally:
        if was_training:
            model.train()


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
