"""What every column of bench/train_speed.py shares: the cases, the random models, the batches, the timed loop,
the numbers reported (tokens/s, peak memory, MFU) and the profile of one step.

``A`` holds the driver's parsed arguments (set by train_speed.main before any case runs).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

SHAPES = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008, vocab_size=32000),
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
               intermediate_size=5632, vocab_size=32000),
}  # fmt: skip
TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name: (shape, seq, batch, gradient checkpointing, vocab, embed/lm_head trained, 4-bit base)
CASES = {
    "7b_s2048": ("7b", 2048, 2, False, 32000, False, False),
    "7b_s2048_gc": ("7b", 2048, 2, True, 32000, False, False),
    "7b_qlora_s2048": ("7b", 2048, 2, True, 32000, False, True),
    "1b_s2048": ("1b", 2048, 8, False, 32000, False, False),
    "7b_sft_real": ("7b", 2048, 8, False, 32000, False, False),
    "7b_v49953": ("7b", 512, 8, False, 49953, True, False),
}
WARMUP, ITERS, REAL_STEPS = 3, 10, 24
A = None  # argparse.Namespace of train_speed.py


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def case(name: str) -> tuple:
    shape, seq, bs, gc_on, vocab, head, quant = CASES[name]
    return shape, (64 if A.tiny else seq), bs, gc_on, vocab, head, quant


def config(shape: str, vocab: int):
    from transformers import LlamaConfig

    kw = dict(SHAPES[shape])
    if A.tiny:
        kw.update(TINY)
    kw["vocab_size"] = vocab if not A.tiny else min(vocab, 1000) + (vocab % 2)
    return LlamaConfig(**kw, max_position_embeddings=4096, use_cache=False, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, attn_implementation="sdpa")  # fmt: skip


def build(shape: str, vocab: int, rows: int | None = None):
    """Random bf16 model on the device, the same weights for every column (seeded)."""
    import torch
    from transformers import LlamaForCausalLM

    cfg = config(shape, vocab)
    if rows:
        cfg.vocab_size = rows
    torch.manual_seed(0)
    with torch.device(device()):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    return model


def work_dir() -> Path:
    return Path(A.work or os.path.join(tempfile.gettempdir(), "zhtune_bench"))


def disk_model(shape: str, vocab: int, rows: int | None = None) -> Path:
    """``build``'s model saved (once) with a LLaMA-2 tokenizer: what unsloth and the 4-bit loaders read."""
    import torch
    from transformers import AutoTokenizer

    d = work_dir() / f"llama_{shape}_v{rows or vocab}{'_tiny' if A.tiny else ''}"
    if (d / "config.json").is_file():
        return d
    t0 = time.time()
    model = build(shape, vocab, rows)
    tmp = d.with_name(d.name + ".part")
    model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size="4GB")
    AutoTokenizer.from_pretrained(tokenizer_dir()).save_pretrained(str(tmp))
    tmp.rename(d)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log(f"saved {d} in {time.time() - t0:.0f}s")
    return d


def tokenizer_dir() -> str:
    d = Path(tempfile.gettempdir()) / "zhtune_bench_tok"
    d.mkdir(exist_ok=True)
    import shutil

    shutil.copy(A.sp_model, d / "tokenizer.model")
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
    return str(d)


def flops_per_token(cfg, seq: int, head_trained: bool, vocab: int) -> float:
    """4N + 6 L h s (+ 2 V h with a trained head): see train_speed's docstring."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        m = LlamaForCausalLM(cfg)
    n = sum(p.numel() for n_, p in m.named_parameters() if "embed_tokens" not in n_)
    f = 4 * n + 6 * cfg.num_hidden_layers * cfg.hidden_size * seq
    if head_trained:
        f += 2 * vocab * cfg.hidden_size
    return float(f)


def random_blocks(n: int, seq: int, vocab: int, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, seq), generator=g).tolist()


def real_samples(tokenizer: str) -> list[dict]:
    """The shared SFT samples encoded as zhtune encodes them (alpaca template, max 2048 tokens)."""
    import random

    from transformers import AutoTokenizer

    from zhtune.text.encode import SegmentEncoder, encode_conversation
    from zhtune.text.records import read_conversations
    from zhtune.text.templates import get_format

    tok = AutoTokenizer.from_pretrained(tokenizer)
    fmt = get_format(tok, "alpaca")
    enc = SegmentEncoder(tok)
    out = []
    for _f, _l, msgs in read_conversations([Path(p) for p in A.data.split(",")]):
        e = encode_conversation(fmt, enc, msgs, 2048)
        if e.input_ids:
            out.append({"input_ids": e.input_ids, "labels": e.labels})
    random.Random(0).shuffle(out)
    if A.tiny:
        out = [{"input_ids": [t % 1000 for t in s["input_ids"][:64]], "labels": [t if t < 0 else t % 1000 for t in s["labels"][:64]]} for s in out]  # fmt: skip
    return out


def hf_batches(name: str, vocab_rows: int) -> list[dict]:
    """The batches of the HF-loop columns: random blocks, or (real SFT lengths) padded batches of 8."""
    import torch

    shape, seq, bs, gc_on, vocab, head, quant = case(name)
    if name == "7b_sft_real":
        from transformers import AutoTokenizer, DataCollatorForSeq2Seq

        tok = AutoTokenizer.from_pretrained(tokenizer_dir())
        tok.pad_token = tok.unk_token
        col = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100, pad_to_multiple_of=8)
        samples = real_samples(tokenizer_dir())
        n_steps = WARMUP + (4 if A.tiny else REAL_STEPS)
        return [col(samples[i * bs : (i + 1) * bs]) for i in range(n_steps)]
    rows = random_blocks(bs * (WARMUP + ITERS), seq, min(vocab, vocab_rows))
    out = []
    for i in range(WARMUP + ITERS):
        ids = torch.tensor(rows[i * bs : (i + 1) * bs])
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def hf_loop(model, opt, batches: list[dict], rec: dict) -> tuple[list[float], list[int], list[float]]:
    """The plain loop of HF Trainer(bf16=True): autocast forward and loss, backward, optimizer step."""
    import torch

    dev = device()
    tokens, losses, times = [], [], []
    t0 = start = time.perf_counter()
    for i, b in enumerate(batches):
        if A.timing == "step" or i == WARMUP:
            sync()
            t0 = time.perf_counter()
        if i >= WARMUP:
            mask = b.get("attention_mask")  # still on the CPU: counting costs no sync
            tokens.append(int(mask.sum()) if mask is not None else b["input_ids"].numel())
        b = {k: v.to(dev, non_blocking=True) for k, v in b.items()}
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if A.timing == "step":
            losses[-1] = losses[-1].item()
            sync()
            if i >= WARMUP:
                times.append(time.perf_counter() - t0)
        if i == 0:  # model set-up excluded; compilation, autotuning and first allocations included
            sync()
            rec["first_step_s"] = round(time.perf_counter() - start, 2)
    if A.timing == "window":
        sync()
        n = len(batches) - WARMUP
        times = [(time.perf_counter() - t0) / n] * n
    return times, tokens, [float(x) for x in losses]


def finish(rec: dict, times: list[float], tokens: list[int], losses: list[float], cfg, name: str) -> None:
    import torch

    shape, seq, bs, gc_on, vocab, head, quant = case(name)
    rec["losses"] = [round(x, 5) for x in losses]
    rec["peak_gib"] = (
        round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0.0
    )
    if name == "7b_sft_real":
        rec["steps"] = len(times)
        rec["real_tokens_per_step"] = round(statistics.mean(tokens), 1)
        rec["ms_per_step"] = round(1e3 * sum(times) / len(times), 1)
        rec["tokens_per_s"] = round(sum(tokens) / sum(times), 1)  # effective: non-pad tokens
    else:
        med = statistics.median(times)  # window timing: all entries equal, the window's mean
        rec["ms_per_step"] = round(1e3 * med, 1)
        rec["tokens_per_s"] = round(bs * seq / med, 1)
        if A.peak > 0:  # a column run on its own (bench/multi_gpu.py) is given no peak
            rec["mfu"] = round(flops_per_token(cfg, seq, head, vocab) * rec["tokens_per_s"] / A.peak, 4)
    rec["ok"] = True


def measure_peak() -> float:
    import torch

    if not torch.cuda.is_available():
        return 1e12
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    return 2 * 8192**3 / statistics.median(ts)


KERNEL_KINDS = (
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("copy/cast", ("copy", "cast", "convert")),
    ("triton", ("triton",)),
)


def kernel_breakdown(prof) -> dict:
    """Kernel time of one profiled step by kind (ms), kernel count, and the ten costliest kernels."""
    from torch.autograd import DeviceType

    cats: dict[str, float] = {}
    by_name: dict[str, float] = {}
    n = 0
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        n += 1
        us = e.time_range.elapsed_us()
        low = e.name.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(w in low for w in keys)), "other elementwise")
        cats[kind] = cats.get(kind, 0.0) + us / 1e3
        by_name[e.name[:90]] = by_name.get(e.name[:90], 0.0) + us / 1e3
    top = sorted(by_name.items(), key=lambda x: -x[1])[:10]
    return {"kernels": n, "ms_by_kind": {k: round(v, 1) for k, v in sorted(cats.items(), key=lambda x: -x[1])},
            "kernel_ms": round(sum(cats.values()), 1), "top": [(k, round(v, 2)) for k, v in top]}  # fmt: skip


def profile_callback(step: int, rec: dict):
    """A TrainerCallback that profiles one training step (the one after ``step``) into ``rec['profile']``."""
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        def __init__(self):
            self.prof = None

        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            if state.global_step == step and self.prof is None:
                import torch
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                self.prof = profile(activities=acts)
                sync()
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if self.prof is not None and "profile" not in rec:
                sync()
                self.prof.__exit__(None, None, None)
                rec["profile"] = kernel_breakdown(self.prof)
                self.prof = None

    return Profile()
