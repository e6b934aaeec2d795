"""zhtune merge: adapters folded in order, resized vocabularies, checks before writing, atomic output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ZH
from lora_helpers import logits, make_adapter, reference_model

from zhtune.cli import main as zhtune
from zhtune.errors import ConfigError

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NEW_WORDS = ["人民日报", "机器学习", "自然语言处理", "北京", "公园散步", "科技创新"]


def load_plain(d: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(
        str(d), dtype=torch.float32
    ).eval(), AutoTokenizer.from_pretrained(str(d))


def run_merge(base: Path, adapters: list[Path], out: Path, *extra: str) -> int:
    args = ["merge", "--base_model", str(base), "--lora_model", ",".join(map(str, adapters))]
    return zhtune(args + ["--output_dir", str(out), "--dtype", "float32", *extra])


@pytest.fixture(scope="module")
def zh_tok(tmp_path_factory, sp_tokenizer_dir) -> Path:
    """The SentencePiece fixture extended with whole Chinese words and a chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(sp_tokenizer_dir))
    tok.add_tokens(NEW_WORDS)
    d = tmp_path_factory.mktemp("zh_tok")
    tok.save_pretrained(str(d))
    return d


def test_one_adapter_matches_peft(tmp_path, tiny_llama_sp):
    ad = make_adapter(tiny_llama_sp, tmp_path / "a", seed=1, targets=ALL)
    assert run_merge(tiny_llama_sp, [ad], tmp_path / "out") == 0
    model, tok = load_plain(tmp_path / "out")
    ids = tok(ZH[0])["input_ids"]
    ref = logits(reference_model(tiny_llama_sp, [ad]), ids)
    got = logits(model, ids)
    base = logits(reference_model(tiny_llama_sp), ids)
    assert (got - base).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    saved = (tmp_path / "out" / "zhtune_merge.yaml").read_text(encoding="utf-8")
    assert "transformers:" in saved and str(ad) in saved


def test_two_adapters_in_order_and_order_matters(tmp_path, tiny_llama_sp):
    # A replaces embed_tokens in full; B puts a LoRA on embed_tokens: A then B keeps B's update, B then A loses it
    a = make_adapter(
        tiny_llama_sp, tmp_path / "a", seed=2, targets=["q_proj"], modules_to_save=["embed_tokens"]
    )
    b = make_adapter(tiny_llama_sp, tmp_path / "b", seed=3, targets=["embed_tokens", "v_proj"])
    ids = make_ids(tiny_llama_sp)
    results = {}
    for order in ("ab", "ba"):
        chain = [a, b] if order == "ab" else [b, a]
        assert run_merge(tiny_llama_sp, chain, tmp_path / order) == 0
        got = logits(load_plain(tmp_path / order)[0], ids)
        torch.testing.assert_close(
            got, logits(reference_model(tiny_llama_sp, chain), ids), atol=1e-5, rtol=1e-5
        )
        results[order] = got
    assert (results["ab"] - results["ba"]).abs().max() > 1e-2


def make_ids(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return tok(ZH[3] + ZH[5])["input_ids"]


def test_resized_vocab_plus_style_chain(tmp_path, tiny_llama_sp, zh_tok):
    """Chinese-LLaMA-Plus then Alpaca-Plus: both resize the vocabulary and save embed_tokens/lm_head."""
    from transformers import AutoTokenizer

    pt = make_adapter(
        tiny_llama_sp,
        tmp_path / "pt",
        seed=4,
        targets=ALL,
        modules_to_save=["embed_tokens", "lm_head"],
        tokenizer_dir=zh_tok,
    )
    sft_tok = AutoTokenizer.from_pretrained(str(zh_tok))
    sft_tok.add_special_tokens({"pad_token": "[PAD]"})  # Alpaca-Plus has one row more than LLaMA-Plus
    sft_tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    sft_tok.save_pretrained(str(tmp_path / "sft_tok"))
    sft = make_adapter(
        tiny_llama_sp,
        tmp_path / "sft",
        seed=5,
        targets=["q_proj", "v_proj"],
        modules_to_save=["embed_tokens", "lm_head"],
        tokenizer_dir=tmp_path / "sft_tok",
        base_adapters=[pt],
    )
    assert run_merge(tiny_llama_sp, [pt, sft], tmp_path / "out", "--max_shard_size", "40KB") == 0
    out = tmp_path / "out"
    model, tok = load_plain(out)
    assert len(tok) == len(sft_tok) == model.get_input_embeddings().weight.shape[0]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(sft_tok)
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    assert tok.chat_template == sft_tok.chat_template
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    assert (out / "generation_config.json").is_file()
    text = "人民日报说机器学习和自然语言处理很重要。"
    ids = tok(text)["input_ids"]
    assert any(i >= 700 for i in ids)  # the new Chinese words are single tokens
    torch.testing.assert_close(
        logits(model, ids), logits(reference_model(tiny_llama_sp, [pt, sft]), ids), atol=1e-5, rtol=1e-5
    )


def test_bf16_output_within_tolerance(tmp_path, tiny_llama_bpe):
    ad = make_adapter(tiny_llama_bpe, tmp_path / "a", seed=6, targets=ALL)
    assert run_merge(tiny_llama_bpe, [ad], tmp_path / "out", "--dtype", "bfloat16") == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is True
    model, tok = load_plain(tmp_path / "out")
    ids = tok(ZH[1])["input_ids"]
    # peft's merge in float32, rounded to bfloat16 once: what zhtune writes
    ref = logits(reference_model(tiny_llama_bpe, [ad]).to(torch.bfloat16).float(), ids)
    # rounding may land one bfloat16 step apart where float32 sums differ in order: allow ~1% of the range
    assert (logits(model, ids) - ref).abs().max() < 0.01 * ref.abs().max()


def test_vocab_mismatch_names_files_and_sizes(tmp_path, tiny_llama_sp, zh_tok):
    # trained on the extended vocabulary but saved no embeddings: the tokenizer cannot fit the base
    ad = make_adapter(
        tiny_llama_sp, tmp_path / "a", seed=7, targets=["q_proj"], tokenizer_dir=zh_tok, save_embeddings=False
    )
    with pytest.raises(ConfigError) as e:
        from zhtune.merge.merge import main

        main({"base_model": str(tiny_llama_sp), "lora_model": str(ad), "output_dir": str(tmp_path / "out")})
    msg = str(e.value)
    assert "adapter_model.safetensors" in msg and str(ad) in msg
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(str(zh_tok)))
    assert n > 700 and f"has {n} tokens" in msg and "700 embedding rows" in msg
    assert not (tmp_path / "out").exists()


def test_architecture_mismatch_is_reported(tmp_path, sp_tokenizer_dir, tiny_llama_sp):
    from conftest import make_tiny_model

    from zhtune.model.merged import plan_merge

    other = tmp_path / "wide"
    make_tiny_model(sp_tokenizer_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(hidden_size=64, num_hidden_layers=3)
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "dtype")})
    ).save_pretrained(other)
    ad = make_adapter(other, tmp_path / "a", seed=8, targets=["q_proj", "down_proj"])
    with pytest.raises(ConfigError) as e:
        plan_merge(tiny_llama_sp, [str(ad)])
    msg = str(e.value)
    assert "hidden_size 64 vs 32" in msg and str(other) in msg
    # with the trained-on path hidden, the shape check still names modules and sizes
    acfg = json.loads((ad / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = None
    (ad / "adapter_config.json").write_text(json.dumps(acfg))
    with pytest.raises(ConfigError) as e:
        plan_merge(tiny_llama_sp, [str(ad)])
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj: adapter input size 64, model 32" in msg
    assert "has no module model.layers.2" in msg


def test_failure_mid_write_leaves_nothing(tmp_path, tiny_llama_sp, monkeypatch):
    import safetensors.torch

    ad = make_adapter(tiny_llama_sp, tmp_path / "a", seed=9, targets=ALL)
    calls = []
    real = safetensors.torch.save_file

    def flaky(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        run_merge(tiny_llama_sp, [ad], tmp_path / "out", "--max_shard_size", "40KB")
    assert len(calls) == 2
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


KILL_SCRIPT = """
import sys, time, pathlib, safetensors.torch
real = safetensors.torch.save_file
def slow(tensors, path, metadata=None):
    real(tensors, path, metadata=metadata)
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(60)
safetensors.torch.save_file = slow
from zhtune.cli import main
main(["merge", "--base_model", sys.argv[2], "--lora_model", sys.argv[3], "--output_dir", sys.argv[4],
      "--max_shard_size", "40KB"])
"""


def test_killed_merge_leaves_no_output(tmp_path, tiny_llama_sp):
    ad = make_adapter(tiny_llama_sp, tmp_path / "a", seed=10, targets=ALL)
    marker, out = tmp_path / "one-shard-written", tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(marker), str(tiny_llama_sp), str(ad), str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while not marker.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert marker.exists(), "the merge never wrote a shard"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-out")]
    assert leftovers and any(
        leftovers[0].glob("*.safetensors")
    )  # the partial work sat under a temporary name
    # a rerun succeeds and leaves the complete model
    assert run_merge(tiny_llama_sp, [ad], out) == 0
    assert (out / "config.json").is_file()


MEM_SCRIPT = """
import sys, threading, time
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
from zhtune.merge.merge import main
import torch, transformers, safetensors.torch, peft  # import cost before the baseline
peak = [0]
stop = False
def watch():
    while not stop:
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)
base = anon()
t = threading.Thread(target=watch); t.start()
main({"base_model": sys.argv[1], "lora_model": sys.argv[2], "output_dir": sys.argv[3], "max_shard_size": "8MB"})
stop = True; t.join()
print(peak[0] - base)
"""


def test_merge_memory_stays_near_one_shard(tmp_path, sp_tokenizer_dir):
    """A 112 MB fp32 model merges with well under one model's worth of extra anonymous memory (8 MB shards).

    About 10-15 MB of the extra is fixed (tokenizer, adapter, allocator), so the model must be large next to it.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=700, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8
    )
    base = tmp_path / "base"
    LlamaForCausalLM(cfg).save_pretrained(base, max_shard_size="20MB")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(sp_tokenizer_dir)).save_pretrained(base)
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    assert model_bytes > 100e6
    ad = make_adapter(base, tmp_path / "a", seed=11, targets=ALL, r=8)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    res = subprocess.run(
        [sys.executable, "-c", MEM_SCRIPT, str(base), str(ad), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    extra = int(res.stdout.strip().splitlines()[-1])
    print(f"merge of a {model_bytes / 1e6:.0f} MB model: peak extra anonymous memory {extra / 1e6:.1f} MB")
    assert extra < 0.4 * model_bytes


@pytest.mark.parametrize("how", ["modules_to_save", "lora"])
def test_tied_embeddings_follow_peft(tmp_path, tiny_llama_bpe, how):
    """A tied model (lm_head shares embed_tokens) with an adapter on embed_tokens merges as peft does."""
    kw = {"modules_to_save": ["embed_tokens"]} if how == "modules_to_save" else {}
    targets = ["q_proj"] + (["embed_tokens"] if how == "lora" else [])
    ad = make_adapter(tiny_llama_bpe, tmp_path / "a", seed=12, targets=targets, **kw)
    assert run_merge(tiny_llama_bpe, [ad], tmp_path / "out") == 0
    model, tok = load_plain(tmp_path / "out")
    ids = tok(ZH[6])["input_ids"]
    torch.testing.assert_close(
        logits(model, ids), logits(reference_model(tiny_llama_bpe, [ad]), ids), atol=1e-5, rtol=1e-5
    )
