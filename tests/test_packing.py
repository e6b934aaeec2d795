"""Padding-free packing: samples sharing a row do not see each other, and the loss is unchanged."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from zhtune.train.packing import (
    IGNORE,
    PackingCollator,
    document_positions,
    first_fit_decreasing,
    pack_dataset,
)


def tiny(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, use_cache=False, attn_implementation=attn,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def samples(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(5, 40)
        ids = [rng.randrange(3, 300) for _ in range(k)]
        prompt = rng.randint(1, k - 2)
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def sample_loss(model, ids, labels, pos=None) -> torch.Tensor:
    """Sum of next-token losses over labelled tokens (no reduction over the batch)."""
    kw = {"position_ids": pos} if pos is not None else {}
    logits = model(input_ids=ids, **kw).logits.float()
    tgt = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="sum")


def test_first_fit_decreasing_respects_capacity_and_keeps_everything():
    rng = random.Random(1)
    lengths = [rng.randint(1, 100) for _ in range(200)]
    bins = first_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) <= 1.25 * sum(lengths) / 128 + 1  # FFD is near-optimal on such data


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_each_sample_has_the_same_loss_packed_and_alone(attn):
    model = tiny(attn)
    feats = samples(5)
    batch = PackingCollator(capacity=256)(feats)
    assert batch["input_ids"].shape[0] == 1  # all five share one row
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits.float()
        start = 0
        for f in feats:
            n = len(f["input_ids"])
            alone = model(input_ids=torch.tensor([f["input_ids"]])).logits.float()[0]
            packed = logits[0, start : start + n]
            assert torch.allclose(packed, alone, atol=2e-5), (attn, (packed - alone).abs().max())
            start += n
        # and the loss of the packed row is the sum of the samples' own losses
        packed_sum = sample_loss(model, batch["input_ids"], batch["labels"], batch["position_ids"])
        alone_sum = sum(
            sample_loss(model, torch.tensor([f["input_ids"]]), torch.tensor([f["labels"]])) for f in feats
        )
        assert packed_sum.item() == pytest.approx(alone_sum.item(), rel=1e-5)
        # control: without position resets the later samples would see the earlier ones
        flat = torch.arange(batch["input_ids"].shape[1])[None]
        leaky = sample_loss(model, batch["input_ids"], batch["labels"], flat)
        assert abs(leaky.item() - alone_sum.item()) > 1e-2


def test_labels_never_cross_a_sample_boundary():
    feats = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    b = PackingCollator(capacity=16, pad_token_id=0, pad_to_multiple_of=8)(feats)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    # the first token of each sample is never a target (8 is not predicted from 7), padding is ignored
    assert b["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9, IGNORE, IGNORE, IGNORE]]


def test_rows_hold_at_most_capacity_and_padded_batches_give_the_same_mean_loss():
    model = tiny("sdpa")
    feats = samples(12, seed=3)
    col = PackingCollator(capacity=64)
    b = col(feats)
    assert b["input_ids"].shape[0] > 1 and all(len(r["input_ids"]) <= 64 for r in col.rows(feats))
    # the same samples padded to the longest, with an attention mask (what DataCollatorForSeq2Seq builds)
    width = max(len(f["input_ids"]) for f in feats)
    ids = torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in feats])
    lab = torch.tensor([f["labels"] + [IGNORE] * (width - len(f["labels"])) for f in feats])
    mask = (torch.arange(width)[None] < torch.tensor([len(f["input_ids"]) for f in feats])[:, None]).long()
    assert b["input_ids"].numel() < ids.numel()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        got = model(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"]).loss
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_document_positions_restart_after_eos():
    assert document_positions([1, 5, 6, 2, 1, 7, 2, 9], eos_id=2) == [0, 1, 2, 3, 0, 1, 2, 0]
    b = PackingCollator(capacity=8, eos_id=2)([{"input_ids": [1, 5, 6, 2, 1, 7, 2, 9]}])
    assert b["labels"].tolist() == [[IGNORE, 5, 6, 2, IGNORE, 7, 2, IGNORE]]


def test_pack_dataset_keeps_every_token_and_isolates_samples():
    import datasets

    feats = samples(40, seed=7)
    ds = datasets.Dataset.from_list(feats)
    packed = pack_dataset(ds, capacity=96, seed=0)
    assert len(packed) < len(ds)
    assert sum(len(r) for r in packed["input_ids"]) == sum(len(f["input_ids"]) for f in feats)
    assert all(len(r) <= 96 for r in packed["input_ids"])
    n_starts = sum(p.count(0) for p in packed["position_ids"])
    assert n_starts == len(feats)
    b = PackingCollator(capacity=96)([packed[0], packed[1]])
    assert b["input_ids"].shape[0] == 2  # full rows are not merged
