"""Padding-free batches: several samples share a row, isolated from each other by their position ids.

A row holds samples back to back; ``position_ids`` restart at 0 where each sample starts. With no
attention mask, transformers (5.x) turns those resets into a block-diagonal causal mask (sdpa, eager,
flex_attention) or variable-length kernels (flash attention), so no token attends across a sample boundary.
The label of every sample's first token is -100, so no token is trained to predict the next sample's start:
each sample's loss is what it would be alone (``tests/test_packing.py`` checks this).

Two levels:

* ``PackingCollator`` (default for SFT): the samples of a batch are laid into as few rows of at most
  ``capacity`` tokens as fit, instead of being padded to the longest. Same samples per step and the same
  loss as padded batches, without computing on padding.
* ``pack_dataset`` (``--packing``): the whole dataset is packed ahead into rows of about ``capacity``
  tokens (first-fit decreasing), so a batch is a fixed number of full rows: more samples per step.

``document_positions`` gives pre-training blocks (documents joined by EOS) the same isolation.
"""

from __future__ import annotations

from typing import Any

IGNORE = -100


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins whose lengths sum to at most ``capacity`` (longest first, first bin that
    fits). Deterministic; bins come out in the order they were opened."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def _sample_starts(feature: dict[str, Any]) -> list[int]:
    pos = feature.get("position_ids")
    if pos is None:
        return [0]
    return [i for i, p in enumerate(pos) if p == 0]


def document_positions(ids: list[int], eos_id: int) -> list[int]:
    """Position ids that restart after every EOS: each document in a pre-training block sees only itself."""
    pos, p = [], 0
    for t in ids:
        pos.append(p)
        p = 0 if t == eos_id else p + 1
    return pos


class PackingCollator:
    """Collate samples (or pre-packed rows) into padding-free rows of at most ``capacity`` tokens.

    Features are dicts with ``input_ids``, optional ``labels`` (default: the inputs) and optional
    ``position_ids`` (a pre-packed row; default 0..n-1). Rows are filled first-fit decreasing and right-padded
    to the longest row (a multiple of ``pad_to_multiple_of``) with ``pad_token_id`` and label -100.
    ``eos_id`` (pre-training) also restarts positions after every EOS inside a sample.
    """

    def __init__(
        self,
        capacity: int,
        pad_token_id: int = 0,
        pad_to_multiple_of: int | None = None,
        eos_id: int | None = None,
    ):
        self.capacity = capacity
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of
        self.eos_id = eos_id

    def rows(self, features: list[dict[str, Any]]) -> list[dict[str, list[int]]]:
        lengths = [len(f["input_ids"]) for f in features]
        out = []
        for group in first_fit_decreasing(lengths, max(self.capacity, max(lengths))):
            ids: list[int] = []
            labels: list[int] = []
            pos: list[int] = []
            for i in sorted(group):
                f = features[i]
                x = list(f["input_ids"])
                y = list(f["labels"]) if f.get("labels") is not None else list(x)
                if f.get("position_ids") is not None:
                    p = list(f["position_ids"])
                elif self.eos_id is not None:
                    p = document_positions(x, self.eos_id)
                else:
                    p = list(range(len(x)))
                for j, q in enumerate(p):
                    if q == 0:
                        y[j] = IGNORE  # never predict a sample's first token from the one before
                ids += x
                labels += y
                pos += p
            out.append({"input_ids": ids, "labels": labels, "position_ids": pos})
        return out

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        rows = self.rows(features)
        width = max(len(r["input_ids"]) for r in rows)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
        for r in rows:
            pad = width - len(r["input_ids"])
            last = r["position_ids"][-1] + 1
            batch["input_ids"].append(r["input_ids"] + [self.pad_token_id] * pad)
            batch["labels"].append(r["labels"] + [IGNORE] * pad)
            # padding continues the last sample's positions: it comes after every real token, so causal
            # attention keeps real tokens from seeing it, and its labels are ignored
            batch["position_ids"].append(r["position_ids"] + list(range(last, last + pad)))
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def pack_dataset(ds: Any, capacity: int, seed: int = 0) -> Any:
    """Pack a tokenized dataset (input_ids, labels) into rows of at most ``capacity`` tokens.

    Returns a ``datasets.Dataset`` with input_ids, labels and position_ids per row; rows are shuffled with
    ``seed`` so long and short samples mix across steps.
    """
    import random

    import datasets

    lengths = [len(x) for x in ds["input_ids"]]
    bins = first_fit_decreasing(lengths, capacity)
    random.Random(seed).shuffle(bins)
    ids_col, lab_col = ds["input_ids"], ds["labels"]
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for group in bins:
        ids, labels, pos = [], [], []
        for i in group:
            ids += list(ids_col[i])
            labels += list(lab_col[i])
            pos += list(range(lengths[i]))
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        rows["position_ids"].append(pos)
    return datasets.Dataset.from_dict(rows)


def packing_report(ds_lengths: list[int], rows: int, capacity: int) -> str:
    tokens = sum(ds_lengths)
    fill = tokens / max(rows * capacity, 1)
    return f"{len(ds_lengths):,} samples packed into {rows:,} rows of {capacity} tokens ({100 * fill:.1f}% filled)"
