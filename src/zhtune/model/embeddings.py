"""Fit a model to a longer tokenizer that extends its own: resize the embeddings, initialise the new rows.

The input embeddings and the output head grow to the tokenizer's length rounded up to a multiple of 64
(the same size ``model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)`` gives, so an adapter
saved after resizing loads onto a base resized that way). Tied embeddings stay tied. Each new token's row
is initialised from the base-tokenizer pieces that spell it (``--new_token_init``):

* ``mean`` (default): the mean of those pieces' rows, in embed_tokens and in lm_head. The new token's
  logit is then exactly the mean of its pieces' logits, and feeding it looks like feeding its pieces.
* ``subtoken``: a copy of the first piece's rows (the new token starts as its first piece).
* ``random``: normal(0, initializer_range), as a freshly built layer.

Rows past the tokenizer (the padding to 64) get the mean of the old rows. ``mean`` and ``subtoken`` are
deterministic, so a model resized again later (for inference, or to load an adapter) gets the same rows.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch

from zhtune.errors import ConfigError

log = logging.getLogger(__name__)
PAD_MULTIPLE = 64


@dataclass
class Resize:
    old_rows: int
    new_rows: int
    base_vocab: int
    vocab: int
    initialised: int
    init: str
    tied: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def padded(n: int, multiple: int = PAD_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def check_extends(base_tok: Any, tok: Any, base_name: str, tok_name: str) -> None:
    """Raise unless every token of ``base_tok`` has the same id in ``tok``."""
    new_vocab = tok.get_vocab()
    for token, i in sorted(base_tok.get_vocab().items(), key=lambda x: x[1]):
        if new_vocab.get(token) != i:
            where = f"id {new_vocab[token]}" if token in new_vocab else "absent"
            raise ConfigError(
                f"the tokenizer {tok_name} ({len(tok)} tokens) does not extend the model's own tokenizer {base_name} "
                f"({len(base_tok)} tokens): {token!r} is id {i} there and {where} here. Build it with "
                "'zhtune vocab merge' from the model's tokenizer, or pass the tokenizer the model was trained with"
            )


def subtoken_ids(base_tok: Any, token: str) -> list[int]:
    """Ids of the base pieces that spell ``token`` (a vocabulary string, e.g. '▁白' or 'é»Ħæ²³')."""
    backend = getattr(base_tok, "backend_tokenizer", None)
    if backend is not None:
        ids = [t.id for t in backend.model.tokenize(token)]
        if ids:
            return ids
    text = base_tok.convert_tokens_to_string([token])
    return base_tok.encode(text, add_special_tokens=False)


@torch.no_grad()
def init_rows(model: Any, base_tok: Any, tok: Any, start: int, end: int, mode: str) -> None:
    """Initialise rows [start, end) of the input embeddings and (if untied) the output head."""
    emb = model.get_input_embeddings().weight
    head_mod = model.get_output_embeddings()
    head = head_mod.weight if head_mod is not None and head_mod.weight is not emb else None
    mats = [emb] + ([head] if head is not None else [])
    if mode == "random":
        std = getattr(model.config, "initializer_range", 0.02)
        for w in mats:
            w[start:end] = torch.randn(end - start, w.shape[1], dtype=torch.float32).to(w) * std
        return
    tokens = tok.convert_ids_to_tokens(list(range(start, end)))
    for i, token in zip(range(start, end), tokens):
        ids = subtoken_ids(base_tok, token)
        pick = ids[:1] if mode == "subtoken" else ids
        for w in mats:
            w[i] = w[pick].float().mean(0).to(w.dtype)


def _own_tokenizer(model_path: str | None) -> Any | None:
    if not model_path:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except Exception:  # noqa: BLE001 - a model directory without a tokenizer
        return None


def fit_embeddings(
    model: Any,
    tok: Any,
    *,
    model_path: str | None,
    tokenizer_name: str | None,
    init: str = "mean",
    base_tok: Any | None = None,
) -> Resize | None:
    """Resize and initialise when ``tok`` extends the model's tokenizer; clear errors for mismatches.

    Returns what was done, or None when the model already fits the tokenizer.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    n = len(tok)
    if base_tok is None:
        base_tok = tok if tokenizer_name is None else _own_tokenizer(model_path)
    tname = tokenizer_name or model_path
    if base_tok is None:
        if n > rows:
            raise ConfigError(
                f"the tokenizer ({tname}) has {n} tokens but the model ({model_path}) has only {rows} embedding rows, "
                "and the model directory has no tokenizer of its own to initialise new rows from"
            )
        if rows > padded(n):
            raise ConfigError(
                f"the tokenizer {tname} has {n} tokens but the model {model_path} has {rows} embedding rows "
                f"(more than {n} padded to a multiple of {PAD_MULTIPLE}): it was trained with a longer vocabulary; "
                "pass that tokenizer with --tokenizer_name_or_path"
            )
        return None
    nb = len(base_tok)
    if n < nb:
        raise ConfigError(
            f"the tokenizer {tname} has {n} tokens, fewer than the {nb} of the model's own tokenizer ({model_path}, "
            f"{rows} embedding rows): ids {n}..{nb - 1} would never be produced. Pass the tokenizer the model was "
            "trained with (--tokenizer_name_or_path), or none to use the model's own"
        )
    if n == nb:
        if n > rows:  # the model's own tokenizer: nothing to initialise new rows from
            raise ConfigError(
                f"the tokenizer ({tname}) has {n} tokens but the model ({model_path}) has only {rows} embedding "
                "rows: the checkpoint does not match its tokenizer; pass the tokenizer it was trained with"
            )
        return None
    check_extends(base_tok, tok, model_path or "(model)", tname or "(tokenizer)")
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    new_rows = rows
    if n > rows:
        new_rows = padded(n)
        model.resize_token_embeddings(new_rows, mean_resizing=False)
        pad_from = n
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            head = model.get_output_embeddings()
            for w in [emb] + ([head.weight] if head is not None and head.weight is not emb else []):
                w[pad_from:] = w[:rows].float().mean(0).to(w.dtype)
    init_rows(model, base_tok, tok, nb, n, init)
    res = Resize(rows, new_rows, nb, n, n - nb, init, tied)
    log.info(
        "embeddings: %d -> %d rows for %d tokens (%d new, initialised by %s%s)",
        rows, new_rows, n, n - nb, init, ", tied" if tied else "",
    )  # fmt: skip
    return res
