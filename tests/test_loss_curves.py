"""Pinned loss curves: deterministic tiny runs of every way zhtune trains, each long enough and at a learning
rate where the loss really falls (torchtune's test_lora_finetune_single_device.py does the same).

Each test asserts the exact curve to a tolerance AND that it falls by a margin, so a change that silently
alters what trains (masking, packing, which weights get gradients, the optimizer wiring) fails here, and so
does a change that stops training altogether. Pinned on CPU, one thread (conftest), torch 2.13,
transformers 5.17, peft 0.21; re-pin after upgrading those, checking that the curves still fall.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_tiny_model, write_alpaca
from extended_vocab import made_up_chinese

from zhtune.train.pt import main as pt
from zhtune.train.sft import main as sft

TOL = 1e-4  # summed float32 reductions; a real change moves the curve by far more


def losses(summary) -> list[float]:
    return [round(h["loss"], 6) for h in summary["log_history"] if "loss" in h]


def check(got: list[float], pinned: list[float], falls_by: float) -> None:
    """The curve is the pinned one, and the mean of its last two losses is below the first two by ``falls_by``."""
    assert got == pytest.approx(pinned, abs=TOL), got
    first, last = sum(got[:2]) / 2, sum(got[-2:]) / 2
    assert first - last > falls_by, (first, last)


def sft_cfg(model: Path, data: Path, tmp: Path, **kw) -> dict:
    return {
        "model_name_or_path": str(model),
        "train_files": [str(data)],
        "output_dir": str(tmp / "out"),
        "data_cache_dir": str(tmp / "cache"),
        "max_steps": 12,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "save_steps": 100,
        "learning_rate": 2e-2,
        "lr_scheduler_type": "constant",
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "warmup_ratio": 0.0,
        "max_seq_length": 256,
        "report_to": "none",
        "seed": 123,
        **kw,
    }


def pt_cfg(model: Path, data: Path, tmp: Path, **kw) -> dict:
    return {
        "model_name_or_path": str(model),
        "dataset_dir": str(data),
        "output_dir": str(tmp / "out"),
        "data_cache_dir": str(tmp / "cache"),
        "block_size": 32,
        "max_steps": 10,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "save_steps": 100,
        "lr_scheduler_type": "constant",
        "warmup_ratio": 0.0,
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "report_to": "none",
        "seed": 7,
        **kw,
    }


@pytest.fixture(scope="module")
def sp_wide(tmp_path_factory, sp_tokenizer_dir) -> Path:
    """The SentencePiece tiny model initialised wider (std 0.1): with transformers' 0.02 the frozen head's
    logits stay within about ±1, so no LoRA could move the loss far from uniform."""
    return make_tiny_model(sp_tokenizer_dir, tmp_path_factory.mktemp("sp_wide"), init_std=0.1)


@pytest.fixture(scope="module")
def bpe_wide(tmp_path_factory, bpe_tokenizer_dir) -> Path:
    """The byte-level BPE (ChatML) tiny model, tied, initialised wider (see sp_wide)."""
    return make_tiny_model(bpe_tokenizer_dir, tmp_path_factory.mktemp("bpe_wide"), tie=True, init_std=0.1)


@pytest.fixture
def alpaca(tmp_path) -> Path:
    """Eight samples: twelve steps of four see each one six times, so the loss falls steadily."""
    return write_alpaca(tmp_path / "d.json", 8, seed=5)


@pytest.fixture
def corpus(tmp_path) -> Path:
    d = tmp_path / "text"
    d.mkdir()
    return made_up_chinese(d / "a.txt", n=120, seed=1).parent


CURVES = {
    "sft_lora_sentencepiece_alpaca": [6.759731, 6.385845, 6.163285, 5.885798, 5.796659, 5.491513, 5.209435, 5.470961,
                                      5.29007, 4.957357, 5.014237, 4.762641],
    "sft_lora_bytelevel_chatml": [6.455767, 6.376839, 5.899042, 5.717701, 5.577948, 5.271386, 5.120277, 5.232976,
                                  5.016389, 4.860688, 4.890902, 4.716383],
    "sft_full": [6.5676, 6.427339, 6.127091, 5.980196, 5.825087, 5.586639, 5.376146, 5.301259, 5.072997, 4.856486,
                 4.703467, 4.453958],
    "sft_packing": [6.778405, 6.226963, 5.877763, 6.206296, 5.697147, 5.627404, 5.644838, 5.303338, 4.899515,
                    5.628206, 5.188211, 4.391451],
    "pt_embeddings": [6.41463, 6.315052, 6.05203, 5.698184, 5.452371, 5.113183, 4.700034, 4.50071, 4.38703,
                      4.098237],
    "pt_lora": [6.41463, 6.324849, 6.07861, 5.80909, 5.559003, 5.384631, 5.148465, 5.058185, 4.874898, 4.745679],
}  # fmt: skip


def test_sft_lora_sentencepiece_alpaca(sp_wide, alpaca, tmp_path):
    s = sft(sft_cfg(sp_wide, alpaca, tmp_path, template="alpaca"))
    check(losses(s), CURVES["sft_lora_sentencepiece_alpaca"], falls_by=1.2)


def test_sft_lora_bytelevel_chatml(bpe_wide, alpaca, tmp_path):
    s = sft(sft_cfg(bpe_wide, alpaca, tmp_path, template="chatml"))
    assert s["template"] == "chatml"
    check(losses(s), CURVES["sft_lora_bytelevel_chatml"], falls_by=1.2)


def test_sft_full(tiny_llama_sp, alpaca, tmp_path):
    s = sft(sft_cfg(tiny_llama_sp, alpaca, tmp_path, finetuning_type="full", learning_rate=5e-3))
    check(losses(s), CURVES["sft_full"], falls_by=1.2)


def test_sft_packing(sp_wide, alpaca, tmp_path):
    s = sft(
        sft_cfg(sp_wide, alpaca, tmp_path, packing=True, per_device_train_batch_size=2, max_seq_length=512)
    )
    last = [h for h in s["log_history"] if "loss" in h][-1]
    rows = round(last["step"] * 2 / last["epoch"])  # two rows a step
    assert rows < s["data"]["train_samples"] == 8  # the eight samples were packed into fewer rows
    check(losses(s), CURVES["sft_packing"], falls_by=1.2)


def test_pt_embeddings(tiny_llama_bpe, corpus, tmp_path):
    s = pt(pt_cfg(tiny_llama_bpe, corpus, tmp_path, stage="embeddings", learning_rate=2e-2))
    check(losses(s), CURVES["pt_embeddings"], falls_by=1.5)


def test_pt_lora(tiny_llama_bpe, corpus, tmp_path):
    s = pt(pt_cfg(tiny_llama_bpe, corpus, tmp_path, stage="lora", learning_rate=1e-2))
    check(losses(s), CURVES["pt_lora"], falls_by=1.2)
