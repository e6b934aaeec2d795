"""Perplexity and bits per character of a causal LM on text files.

Every document (a line of a .txt file, or the text field of a .jsonl record) is scored whole: its tokens
follow one start token (the tokenizer's BOS where it adds one, else its bos or eos token), so each token of
the text is predicted, the first one included. A document longer than the window is scored in windows
that overlap by ``window - stride`` tokens of context, each token counted once.

* perplexity = exp(total loss / predicted tokens): depends on the tokenizer.
* bits per character = total loss in bits / characters of text: the cost of the text itself however it is
  cut into tokens, so it compares a model with its vocabulary-extended self.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zhtune.errors import DataError


@dataclass
class TextOptions:
    files: list[str]
    text_field: str = "text"
    max_documents: int | None = None
    max_seq_length: int = 1024
    stride: int | None = None
    batch_size: int = 8


def iter_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents of a .txt (one a line) or .jsonl (``text_field`` of each record) file, as the vocabulary
    tools read them (malformed lines are errors naming file:line)."""
    from zhtune.text.documents import iter_documents as numbered

    if not path.is_file():
        raise DataError(path, None, "text file does not exist")
    for _, text in numbered(path, text_field):
        yield text


def start_token(tok: Any) -> int | None:
    """The id that starts a document when the tokenizer adds none itself."""
    for t in (tok.bos_token_id, tok.eos_token_id):
        if t is not None:
            return t
    return None


def document_ids(tok: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each document, always beginning with a start token that is not scored."""
    enc = tok(list(texts), add_special_tokens=True)["input_ids"]
    special = set(tok.all_special_ids)
    first = start_token(tok)
    out = []
    for ids in enc:
        ids = list(ids)
        if (not ids or ids[0] not in special) and first is not None:
            ids = [first] + ids
        out.append(ids)
    return out


def windows(ids: list[int], size: int, stride: int) -> list[tuple[list[int], int]]:
    """(window ids, index of its first scored token): every token after the first scored exactly once."""
    if len(ids) <= size:
        return [(ids, 1)]
    out, done = [], 1  # tokens [0, done) are already scored (the start token needs none)
    begin = 0
    while done < len(ids):
        end = min(begin + size, len(ids))
        out.append((ids[begin:end], done - begin))
        done = end
        begin = end - (size - stride) if end < len(ids) else end
    return out


@torch.inference_mode()
def autocast_for(model: Any):
    """Autocast to the model's half-precision dtype when it mixes dtypes (a bf16 base with fp32 trainable
    embeddings, as LoRA + modules_to_save training leaves it); a no-op for a single-dtype model."""
    import contextlib

    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    half = [d for d in (torch.bfloat16, torch.float16) if d in dtypes]
    if not half or len(dtypes) == 1:
        return contextlib.nullcontext()
    device = next(p.device for p in model.parameters())
    return torch.autocast(device_type=device.type, dtype=half[0])


def _batches(
    model: Any, items: Sequence[tuple[list[int], int]], batch_size: int, desc: str
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(item indices, float logits [rows, width - 1, vocab], targets [rows, width - 1] with -100 where a token
    is not scored) for right-padded batches of items, longest first."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = head.weight.shape[0] if head is not None else 32000
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    was_training = model.training
    model.eval()
    pos = 0
    bar = tqdm(total=len(order), desc=desc, leave=False, unit="window")
    try:
        while pos < len(order):
            width = len(items[order[pos]][0])
            # keep the float logits of one batch under ~256 MB
            rows = max(1, min(batch_size, (64 * 2**20) // max(1, width * vocab)))
            idx = order[pos : pos + rows]
            x = torch.zeros((len(idx), width), dtype=torch.long)
            mask = torch.zeros_like(x)
            target = torch.full_like(x, -100)
            for r, i in enumerate(idx):
                ids, first = items[i]
                x[r, : len(ids)] = torch.tensor(ids)
                mask[r, : len(ids)] = 1
                target[r, first : len(ids)] = torch.tensor(ids[first:])
            kw = (
                {} if bool(mask.all()) else {"attention_mask": mask.to(device)}
            )  # a mask only where there is padding
            with torch.no_grad(), autocast_for(model):
                logits = model(input_ids=x.to(device), **kw).logits[:, :-1].float()
            yield idx, logits, target[:, 1:].to(device)
            pos += len(idx)
            bar.update(len(idx))
    finally:
        bar.close()
        if was_training:
            model.train()


def window_nll(
    model: Any, items: Sequence[tuple[list[int], int]], batch_size: int = 8, desc: str = "scoring text"
) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of the scored tokens of every window, and their number."""
    total, count = 0.0, 0
    for _, logits, tgt in _batches(model, items, batch_size, desc):
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="sum"
        ).item()
        count += int((tgt != -100).sum())
    return total, count


def sequence_nll(
    model: Any, items: Sequence[tuple[list[int], int]], batch_size: int = 8, desc: str = "scoring"
) -> torch.Tensor:
    """Negative log-likelihood (nats) of the scored tokens of each item on its own: a tensor [len(items)]."""
    out = torch.zeros(len(items), dtype=torch.float64)
    for idx, logits, tgt in _batches(model, items, batch_size, desc):
        tok = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), tgt, ignore_index=-100, reduction="none"
        )  # [rows, width - 1], 0 where not scored
        out[torch.tensor(idx)] = tok.sum(-1).double().cpu()
    return out


def bits_per_char(total_nll_nats: float, chars: int) -> float:
    return total_nll_nats / math.log(2) / chars if chars else float("nan")


def metrics(nll: float, tokens: int, chars: int, documents: int) -> dict[str, Any]:
    loss = nll / max(tokens, 1)
    return {
        "bpc": bits_per_char(nll, chars),
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "loss": loss,
        "tokens": tokens,
        "chars": chars,
        "tokens_per_char": tokens / chars if chars else float("nan"),
        "documents": documents,
    }


def evaluate(model: Any, tok: Any, opts: TextOptions) -> dict[str, Any]:
    """Bits per character and perplexity per file and over all files."""
    size = opts.max_seq_length
    stride = opts.stride or size // 2
    if not 0 < stride < size:
        raise ValueError(f"stride {stride} must be in (0, {size}): each window needs one token of context")
    per_file: dict[str, dict[str, Any]] = {}
    all_nll, all_tokens, all_chars, all_docs = 0.0, 0, 0, 0
    for name in opts.files:
        path = Path(name)
        texts = []
        for text in iter_documents(path, opts.text_field):
            texts.append(text)
            if opts.max_documents and len(texts) >= opts.max_documents:
                break
        if not texts:
            raise DataError(path, None, "no documents")
        items = [w for ids in document_ids(tok, texts) for w in windows(ids, size, stride)]
        nll, tokens = window_nll(model, items, opts.batch_size, desc=f"scoring {path.name}")
        chars = sum(len(t) for t in texts)
        per_file[str(path)] = metrics(nll, tokens, chars, len(texts))
        all_nll, all_tokens, all_chars, all_docs = (
            all_nll + nll,
            all_tokens + tokens,
            all_chars + chars,
            all_docs + len(texts),
        )
    out = metrics(all_nll, all_tokens, all_chars, all_docs)
    if len(per_file) > 1:
        out["files"] = per_file
    return out
