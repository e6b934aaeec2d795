"""Perplexity and bits per character of a causal LM on pre-training blocks.

Perplexity is exp(mean loss per predicted token): it depends on the tokenizer, so it cannot compare a model
with its vocabulary-extended self. Bits per character divides the same total loss, in bits, by the
characters those tokens spell (each block's ``n_chars``, see :mod:`zhtune.data.pt`): the cost of the text
itself, whichever way it was cut into tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch


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


def bits_per_char(total_nll_nats: float, chars: int) -> float:
    return total_nll_nats / math.log(2) / chars if chars else float("nan")


@torch.no_grad()
def evaluate_lm(
    model: Any, dataset: Any, *, batch_size: int = 8, desc: str = "evaluating"
) -> dict[str, float]:
    """Total loss over every predicted token of every block; returns loss, perplexity and bits per character."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    nll, tokens, chars = 0.0, 0, 0
    for i in tqdm(range(0, len(dataset), batch_size), desc=desc, leave=False):
        rows = dataset[i : i + batch_size]
        ids = torch.tensor(rows["input_ids"], dtype=torch.long, device=device)
        with autocast_for(model):
            logits = model(input_ids=ids).logits[:, :-1].float()
        target = ids[:, 1:]
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        ).item()
        tokens += target.numel()
        chars += int(sum(rows["n_chars"]))
    if was_training:
        model.train()
    loss = nll / max(tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "bpc": bits_per_char(nll, chars),
        "tokens": tokens,
        "chars": chars,
    }
