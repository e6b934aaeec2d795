"""Hermetic fixtures: tiny tokenizers trained in-process and tiny random Llama models on disk."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "assets"

ZH = [
    "人民日报发表新年讲话，迈向充满希望的新世纪。",
    "这本书的质量很好，内容也非常精彩，推荐大家购买。",
    "物流太慢了，包装也破损了，非常失望。",
    "北京是中国的首都，有着悠久的历史和灿烂的文化。",
    "今天天气很好，我们一起去公园散步吧。",
    "请用一句话介绍机器学习的基本思想。",
    "机器学习让计算机从数据中学习规律，而不是依靠人工编写的规则。",
    "中文分词是自然语言处理的基础任务之一。",
    "经济发展和社会进步需要科技创新的支撑。",
    "他说：“我们要把工作做得更好！”",
]
EN = [
    "The quick brown fox jumps over the lazy dog.",
    "Machine learning lets computers learn patterns from data.",
    "def add(a, b):\n    return a + b",
    "Write a short poem about the sea, please.",
    "Large language models are trained on a lot of text.",
    "Hello world! This is a tiny corpus for a tiny tokenizer.",
]
CORPUS = ZH * 20 + EN * 20


_DEFAULT_THREADS = None


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models run fastest on one thread (no synchronisation between cores, no oversubscription when
    tests share a machine); tests marked slow run real models and get the machine's default."""
    import torch

    global _DEFAULT_THREADS
    if _DEFAULT_THREADS is None:
        _DEFAULT_THREADS = torch.get_num_threads()
    torch.set_num_threads(_DEFAULT_THREADS if request.node.get_closest_marker("slow") else 1)
    yield


def shared_asset(rel: str) -> Path:
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"shared asset {rel} is absent ({SHARED} is not in this checkout)")
    return p


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def sp_tokenizer_dir(tmp_path_factory, corpus_file) -> Path:
    """A LLaMA-style SentencePiece BPE tokenizer with byte fallback, saved as an HF directory."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("sp_tok")
    spm.SentencePieceTrainer.train(
        input=str(corpus_file),
        model_prefix=str(d / "tokenizer"),
        vocab_size=700,
        model_type="bpe",
        character_coverage=0.9995,
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
            }
        )
    )
    out = tmp_path_factory.mktemp("sp_tok_hf")
    tok = AutoTokenizer.from_pretrained(str(d))
    tok.save_pretrained(out)
    (d / "tokenizer.vocab").unlink(missing_ok=True)
    import shutil

    shutil.copy(d / "tokenizer.model", out / "tokenizer.model")
    return out


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory, corpus_file) -> Path:
    """A byte-level BPE tokenizer (GPT-2/LLaMA-3/Qwen style) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train([str(corpus_file)], trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    d = tmp_path_factory.mktemp("bpe_tok")
    tok.save_pretrained(d)
    return d


def make_tiny_model(
    tok_dir: Path,
    out: Path,
    *,
    seed: int = 0,
    tie: bool = False,
    vocab_size: int | None = None,
    init_std: float = 0.02,
) -> Path:
    """A 2-layer, hidden-32 Llama for ``tok_dir``'s tokenizer. ``init_std`` larger than transformers' 0.02
    lets a frozen head express a peaked distribution, so a LoRA run's loss can fall far in a few steps."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size or len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        initializer_range=init_std,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_sp(tmp_path_factory, sp_tokenizer_dir) -> Path:
    return make_tiny_model(sp_tokenizer_dir, tmp_path_factory.mktemp("tiny_llama_sp"))


@pytest.fixture(scope="session")
def tiny_llama_bpe(tmp_path_factory, bpe_tokenizer_dir) -> Path:
    return make_tiny_model(bpe_tokenizer_dir, tmp_path_factory.mktemp("tiny_llama_bpe"), tie=True)


def write_alpaca(path: Path, n: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        q, a = rng.choice(ZH), rng.choice(ZH + EN)
        recs.append({"instruction": f"{q}（{i}）", "input": "" if i % 2 else "请简要回答。", "output": a})
    path.write_text(json.dumps(recs, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    return write_alpaca(tmp_path / "alpaca.json")
