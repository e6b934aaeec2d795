"""Training speed and memory: the plain Hugging Face + peft path against zhtune's, on one GPU, in one run.

Cases (LLaMA shapes, random-initialised weights, bf16 base, LoRA r8 alpha 32 dropout 0 on all seven projections):

  7b_s2048        7B, seq 2048, batch 2
  7b_s2048_gc     the same with gradient checkpointing
  1b_s2048        1.1B (TinyLlama shape), seq 2048, batch 8
  7b_v49953       7B, seq 512, batch 8, embed_tokens + lm_head trained in full, a 49,953-token vocabulary
                  (zhtune's vocabulary resize pads it to 50,048 rows, a multiple of 64)
  7b_sft_real     7B on the real length distribution of alpaca_zh_demo + the ShareGPT sample, tokenized with
                  the LLaMA-2 tokenizer and zhtune's alpaca template: the baseline pads batches of 8 samples to
                  their longest (DataCollatorForSeq2Seq); zhtune packs rows of 2048 tokens, batch 2.
                  Reported: effective (non-pad) tokens/s.
  qlora           7B through the real ``zhtune sft`` CLI with a 4-bit and an 8-bit base, seq 512: peak memory.

The baseline is the setup HF Trainer(bf16=True) + peft runs: trainable parameters in fp32, forward and loss
under torch.autocast(bf16), torch AdamW (fused), HF gradient checkpointing (use_reentrant=False), sdpa.
zhtune runs its own training path: prepare_for_training, ZhTrainer (a transformers Trainer) with its default
speed settings, its collators and packing. Both sides: constant lr 1e-4, no weight decay, no gradient clipping,
the same initial weights and batches (so the first step's loss must agree).

Timing (--timing): 3 warm-up steps, then
  step    (default; the method of the results in bench/results and of the HF+PEFT reference measurements)
          10 steps each ended by torch.cuda.synchronize() (and a loss read), the median step reported;
  window  the same steps timed as one window, synchronised only when it opens and closes: the throughput of a
          run that does not read the loss every step (zhtune's Trainer no longer does; HF's NaN filter does).
The real-length case covers 24 steps and reports total real tokens over total time. zhtune's steps are whole
Trainer steps: data loading, collation, the optimizer and callbacks included. Peak memory:
torch.cuda.max_memory_allocated() over the case, weights included.

MFU = flops per token x tokens/s / peak, peak = the bf16 8192^3 matmul rate measured at the start of the run.
flops per token = 4N + 6 L h s: N = parameters taking part in matmuls (all but the input embedding),
4N = forward 2N + activation-gradient backward 2N (frozen base weights get no weight gradient), 6 L h s =
causal attention forward (2 s h per layer) plus backward (twice that); recomputation under checkpointing is
not counted; +2 V h for the lm_head weight gradient when lm_head trains. LoRA's own flops are ignored (<0.5%).

Each side runs in its own process (Liger patches transformers' Llama module globally). Usage:

    python bench/train_speed.py --out DIR --sp_model llama2_sp32k.model \\
        --data alpaca_zh_demo.json,sharegpt_dummy_conversation.json [--cases ...] [--tiny]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
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
# name: (shape, seq, batch, gradient checkpointing, vocab, embed/lm_head trained)
CASES = {
    "7b_s2048": ("7b", 2048, 2, False, 32000, False),
    "7b_s2048_gc": ("7b", 2048, 2, True, 32000, False),
    "1b_s2048": ("1b", 2048, 8, False, 32000, False),
    "7b_v49953": ("7b", 512, 8, False, 49953, True),
    "7b_sft_real": ("7b", 2048, 8, False, 32000, False),
}
WARMUP, ITERS, REAL_STEPS = 3, 10, 24
A: argparse.Namespace


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def config(shape: str, vocab: int):
    from transformers import LlamaConfig

    kw = dict(SHAPES[shape])
    if A.tiny:
        kw.update(TINY)
    kw["vocab_size"] = vocab if not A.tiny else min(vocab, 1000) + (vocab % 2)
    return LlamaConfig(**kw, max_position_embeddings=4096, use_cache=False, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, attn_implementation="sdpa")  # fmt: skip


def build(shape: str, vocab: int, rows: int | None = None):
    """Random bf16 model on the device, the same weights for both sides (seeded)."""
    import torch
    from transformers import LlamaForCausalLM

    cfg = config(shape, vocab)
    if rows:
        cfg.vocab_size = rows
    torch.manual_seed(0)
    with torch.device(device()):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    return model


def flops_per_token(cfg, seq: int, head_trained: bool, vocab: int) -> float:
    n = sum(
        p.numel() for n_, p in _meta_params(cfg) if "embed_tokens" not in n_
    )  # all but the input embedding
    f = 4 * n + 6 * cfg.num_hidden_layers * cfg.hidden_size * seq
    if head_trained:
        f += 2 * vocab * cfg.hidden_size
    return float(f)


def _meta_params(cfg):
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        m = LlamaForCausalLM(cfg)
    return list(m.named_parameters())


def random_blocks(n: int, seq: int, vocab: int, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, seq), generator=g).tolist()


def real_samples(tokenizer_dir: str) -> list[dict]:
    """The shared SFT samples encoded as zhtune encodes them (alpaca template, max 2048 tokens)."""
    from transformers import AutoTokenizer

    from zhtune.text.encode import SegmentEncoder, encode_conversation
    from zhtune.text.records import read_conversations
    from zhtune.text.templates import get_format

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    fmt = get_format(tok, "alpaca")
    enc = SegmentEncoder(tok)
    out = []
    for _f, _l, msgs in read_conversations([Path(p) for p in A.data.split(",")]):
        e = encode_conversation(fmt, enc, msgs, 2048)
        if e.input_ids:
            out.append({"input_ids": e.input_ids, "labels": e.labels})
    import random

    random.Random(0).shuffle(out)
    if A.tiny:
        out = [{"input_ids": [t % 1000 for t in s["input_ids"][:64]], "labels": [t if t < 0 else t % 1000 for t in s["labels"][:64]]} for s in out]  # fmt: skip
    return out


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


def finish(
    rec: dict, times: list[float], tokens: list[int], losses: list[float], peak: float, cfg, name: str
):
    shape, seq, bs, gc_on, vocab, head = case(name)
    rec["losses"] = [round(x, 5) for x in losses]
    rec["peak_gib"] = round(peak / 2**30, 2)
    if name == "7b_sft_real":
        rec["steps"] = len(times)
        rec["real_tokens_per_step"] = round(statistics.mean(tokens), 1)
        rec["ms_per_step"] = round(1e3 * sum(times) / len(times), 1)
        rec["tokens_per_s"] = round(sum(tokens) / sum(times), 1)  # effective: non-pad tokens
    else:
        med = statistics.median(times)  # window timing: all entries equal, the window's mean
        rec["ms_per_step"] = round(1e3 * med, 1)
        rec["tokens_per_s"] = round(bs * seq / med, 1)
        rec["mfu"] = round(flops_per_token(cfg, seq, head, vocab) * rec["tokens_per_s"] / A.peak, 4)
    rec["ok"] = True


# ----------------------------------------------------------------------------------------------- baseline


def case(name: str) -> tuple:
    shape, seq, bs, gc_on, vocab, head = CASES[name]
    return shape, (64 if A.tiny else seq), bs, gc_on, vocab, head


def baseline_case(name: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    shape, seq, bs, gc_on, vocab, head = case(name)
    rec = {"side": "baseline", "case": name, "batch": bs, "seq": seq, "gradient_checkpointing": gc_on}
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    model = build(shape, vocab)
    cfg = model.config
    if gc_on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lcfg = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM",
                      modules_to_save=["embed_tokens", "lm_head"] if head else None)  # fmt: skip
    model = get_peft_model(model, lcfg)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=device() == "cuda")
    model.train()
    dev = device()
    if name == "7b_sft_real":
        from transformers import AutoTokenizer, DataCollatorForSeq2Seq

        tok = AutoTokenizer.from_pretrained(tokenizer_dir())
        tok.pad_token = tok.unk_token
        col = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100, pad_to_multiple_of=8)
        samples = real_samples(tokenizer_dir())
        n_steps = WARMUP + (4 if A.tiny else REAL_STEPS)
        batches = [col(samples[i * bs : (i + 1) * bs]) for i in range(n_steps)]
    else:
        rows = random_blocks(bs * (WARMUP + ITERS), seq, min(vocab, cfg.vocab_size))
        batches = []
        for i in range(WARMUP + ITERS):
            ids = torch.tensor(rows[i * bs : (i + 1) * bs])
            batches.append({"input_ids": ids, "labels": ids.clone()})
    tokens, losses, times = [], [], []
    t0 = 0.0
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
    if A.timing == "window":
        sync()
        n = len(batches) - WARMUP
        times = [(time.perf_counter() - t0) / n] * n
    losses = [float(x) for x in losses]
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    finish(rec, times, tokens, losses, peak, cfg, name)
    del model, opt, params
    return rec


# ----------------------------------------------------------------------------------------------- zhtune


def zhtune_case(name: str, variant: dict) -> dict:
    import torch
    from transformers import TrainerCallback

    from zhtune.train.args import build_training_arguments
    from zhtune.train.packing import PackingCollator, pack_dataset
    from zhtune.train.setup import prepare_for_training
    from zhtune.train.sft import SftConfig
    from zhtune.train.trainer import ZhTrainer

    shape, seq, bs, gc_on, vocab, head = case(name)
    tag = variant.get("tag", "")
    rec = {
        "side": "zhtune" + (f"[{tag}]" if tag else ""),
        "case": name,
        "seq": seq,
        "gradient_checkpointing": gc_on,
    }
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    real = name == "7b_sft_real"
    rows_bs = 2 if real else bs
    rec["batch"] = rows_bs
    # a vocabulary extension in zhtune pads the embedding rows to a multiple of 64
    padded = -(-config(shape, vocab).vocab_size // 64) * 64 if head else None
    model = build(shape, vocab, rows=padded)
    if variant.get("attn"):
        model.set_attn_implementation(variant["attn"])
    cfg = model.config
    out = tempfile.mkdtemp(prefix="zhtune_bench_")
    n_steps = WARMUP + ((4 if A.tiny else REAL_STEPS) if real else ITERS)
    flat = {
        "output_dir": out, "per_device_train_batch_size": rows_bs, "max_steps": n_steps,
        "logging_steps": 1 if A.timing == "step" else 1000,
        "save_steps": 10**6, "learning_rate": 1e-4, "lr_scheduler_type": "constant", "warmup_ratio": 0.0,
        "weight_decay": 0.0, "max_grad_norm": 0.0, "report_to": "none", "bf16": True,
        "lora_rank": 8, "lora_alpha": 32, "lora_dropout": 0.0, "trainable": TARGETS, "seed": 42,
        "gradient_checkpointing": gc_on, "modules_to_save": ["embed_tokens", "lm_head"] if head else None,
        "train_sampling_strategy": "sequential", "dataloader_num_workers": 0, "disable_tqdm": True,
        "packing": real,
    }  # fmt: skip
    flat.update(variant.get("opts", {}))
    zc = SftConfig.of(flat)
    t = zc.train
    model = prepare_for_training(model, zc.model, zc.lora, t, tokens_per_step=rows_bs * seq, device=device())
    args = build_training_arguments(t, has_eval=False, device=device())
    if real:
        import datasets

        samples = real_samples(tokenizer_dir())
        ds = pack_dataset(datasets.Dataset.from_list(samples), seq, seed=0)
        rec["packed_rows"] = len(ds)
    else:
        ids = random_blocks(bs * n_steps, seq, min(vocab, config(shape, vocab).vocab_size))
        ds = [{"input_ids": r, "labels": r} for r in ids]
    col = PackingCollator(seq, pad_token_id=0, pad_to_multiple_of=64 if device() == "cuda" else None)

    class Clock(TrainerCallback):
        """--timing window: synchronises only when the timed window opens (after the warm-up steps) and when
        training ends. --timing step: at every step end (step times between consecutive step ends)."""

        def __init__(self):
            self.t0 = self.t1 = 0.0
            self.ends: list[float] = []

        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            if state.global_step == WARMUP and not self.t0:
                sync()
                self.t0 = time.perf_counter()
                self.ends.append(self.t0)

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if A.timing == "step" and self.t0:
                sync()
                self.ends.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kw):  # noqa: ANN001
            sync()
            self.t1 = time.perf_counter()

    class Trainer(ZhTrainer):
        """Keeps each step's loss as a tensor (read once at the end: no per-step sync)."""

        step_losses: list = []

        def training_step(self, *a, **kw):  # noqa: ANN002, ANN003
            loss = super().training_step(*a, **kw)
            self.step_losses.append(loss)
            return loss

    clock = Clock()
    callbacks = [clock]
    if name in A.profile.split(",") and not tag:
        # step timing: the 2nd timed step (its median absorbs it); window timing: the last warm-up step
        callbacks.append(Profile(WARMUP + 1 if A.timing == "step" else WARMUP - 1, rec))
    Trainer.step_losses = []
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=col, callbacks=callbacks,
                        zh_config=zc)  # fmt: skip
    rec["speed"] = trainer.speed.summary()
    trainer.train()
    n = n_steps - WARMUP
    if A.timing == "step":
        times = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    else:
        times = [(clock.t1 - clock.t0) / n] * n
    # the sampler is sequential: step i trains rows i*b .. i*b+b-1 (real tokens only; no padding in them)
    lens = [len(ds[i]["input_ids"]) for i in range(min(len(ds), rows_bs * n_steps))]
    tokens = [sum(lens[i * rows_bs : (i + 1) * rows_bs]) for i in range(WARMUP, WARMUP + len(times))]
    losses = [x.item() for x in Trainer.step_losses]
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    finish(rec, times, tokens, losses, peak, cfg, name)
    del trainer, model
    return rec


# ----------------------------------------------------------------------------------------------- profile

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


def _profile_callback():
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        """Profiles one training step (the one after ``step``) and stores its kernel breakdown in ``rec``."""

        def __init__(self, step: int, rec: dict):
            self.step, self.rec, self.prof = step, rec, None

        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            if state.global_step == self.step and self.prof is None:
                import torch
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                self.prof = profile(activities=acts)
                sync()
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if self.prof is not None and "profile" not in self.rec:
                sync()
                self.prof.__exit__(None, None, None)
                self.rec["profile"] = kernel_breakdown(self.prof)
                self.prof = None

    return Profile


def Profile(step: int, rec: dict):  # noqa: N802 - builds the callback lazily (transformers imported late)
    return _profile_callback()(step, rec)


# ----------------------------------------------------------------------------------------------- driver


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


def run_side(side: str, cases: list[str], variants: list[dict]) -> None:
    import torch

    results = []
    path = Path(A.out) / f"{A.label or side}.json"
    # variants outer: Liger patches transformers' Llama classes for the rest of the process, so variants
    # without it must come first
    for v in variants if side == "zhtune" else [{}]:
        for name in cases:
            if name not in v.get("only", [name]):
                continue
            if A.budget and time.time() - A.t_start > A.budget:
                log(f"skipped {name} {v.get('tag', '')}: past the --budget of {A.budget:.0f}s")
                continue
            t0 = time.time()
            try:
                rec = baseline_case(name) if side == "baseline" else zhtune_case(name, v)
            except Exception as e:  # noqa: BLE001 - recorded, the next case runs
                rec = {"side": side + (f"[{v.get('tag')}]" if v.get("tag") else ""), "case": name, "ok": False,
                       "error": f"{type(e).__name__}: {e}"[:1500], "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
            rec["wall_s"] = round(time.time() - t0, 1)
            log(json.dumps({k: v2 for k, v2 in rec.items() if k != "traceback"})[:600])
            results.append(rec)
            path.write_text(json.dumps(results, indent=2))
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def qlora(out: Path) -> list[dict]:
    """4-bit and 8-bit base through the real CLI, reusing bench/qlora_gpu.py's model and data builders."""
    sys.path.insert(0, str(HERE))
    import qlora_gpu

    work = Path(os.environ.get("BENCH_WORK", "/tmp/zhtune_bench"))
    model, data = work / "llama7b", work / "long_alpaca.jsonl"
    t0 = time.time()
    qlora_gpu.build_model(model, A.sp_model)
    log(f"7B model on disk in {time.time() - t0:.0f}s")
    qlora_gpu.make_data(data, A.data.split(",")[0])
    runs = []
    with open(out / "qlora_log.txt", "w") as fh:
        for mode in ("int4", "int8"):
            r = qlora_gpu.run_mode(mode, model, data, work, 512, 8, fh)
            res = work / f"run_{mode}" / "train_results.json"
            if r["rc"] == 0 and res.is_file():
                r["load_peak_mem_gib"] = json.loads(res.read_text())["metrics"].get("load_peak_mem_gib")
            log(json.dumps(r))
            runs.append(r)
    return runs


def table(recs: list[dict], peak: float) -> str:
    base = {r["case"]: r for r in recs if r["side"] == "baseline" and r.get("ok")}
    lines = [
        f"bf16 matmul peak measured: {peak / 1e12:.1f} TFLOP/s",
        "| case | side | batch x seq | tok/s | ms/step | peak GiB | MFU | x baseline tok/s | first loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in recs:
        if not r.get("ok"):
            lines.append(f"| {r['case']} | {r['side']} | failed: {r.get('error', '')[:80]} | | | | | | |")
            continue
        b = base.get(r["case"])
        ratio = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}" if b else ""
        mfu = f"{r['mfu']:.3f}" if "mfu" in r else ""
        unit = " (effective)" if r["case"] == "7b_sft_real" else ""
        lines.append(
            f"| {r['case']} | {r['side']} | {r['batch']} x {r['seq']} | {r['tokens_per_s']:.0f}{unit} | {r['ms_per_step']} "
            f"| {r['peak_gib']} | {mfu} | {ratio} | {r['losses'][0]:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    global A
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sp_model", required=True, help="LLaMA-2 SentencePiece model (llama2_sp32k.model)")
    ap.add_argument(
        "--data", required=True, help="SFT files for the real length distribution, comma separated"
    )
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--variants", default="default", help="zhtune variants: JSON list of {tag, opts, only}")
    ap.add_argument("--side", default="both", choices=["both", "baseline", "zhtune"])
    ap.add_argument("--qlora", action="store_true", help="also measure 4-bit and 8-bit QLoRA through the CLI")
    ap.add_argument(
        "--profile", default="", help="zhtune cases whose 4th step is profiled (kernel time by kind)"
    )
    ap.add_argument(
        "--budget", type=float, default=0.0, help="skip cases that would start after this many seconds"
    )
    ap.add_argument("--timing", default="step", choices=["step", "window"], help="see the module docstring")
    ap.add_argument("--t_start", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--peak", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--label", default="", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (checks the script's logic)")
    A = ap.parse_args()
    A.t_start = A.t_start or time.time()
    out = Path(A.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = [c for c in A.cases.split(",") if c]
    variants = [{}] if A.variants == "default" else json.loads(A.variants)
    if A.side != "both":
        run_side(A.side, cases, variants)
        return
    if not any(not v.get("tag") for v in variants):
        variants.insert(0, {})  # zhtune's defaults always run
    import torch

    t0 = time.time()
    A.peak = measure_peak()
    meta = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "peak_flops": A.peak, "cases": CASES, "started": time.strftime("%F %T")}  # fmt: skip
    try:
        import liger_kernel  # noqa: F401

        meta["liger_kernel"] = True
    except ImportError:
        meta["liger_kernel"] = False
    log("meta", json.dumps(meta))
    recs: list[dict] = []
    qruns = qlora(out) if A.qlora and torch.cuda.is_available() else None  # first: memory only, ~90 s
    # Liger patches transformers' Llama classes for the rest of a process: variants without it run apart
    plain = [v for v in variants if v.get("opts", {}).get("use_liger_kernel") is False]
    liger = [v for v in variants if v not in plain]
    groups = [
        ("baseline", "baseline", [{}]),
        ("zhtune", "zhtune", liger),
        ("zhtune", "zhtune_noliger", plain),
    ]
    for side, label, vs in groups:
        if not vs:
            continue
        cmd = [sys.executable, __file__, "--out", A.out, "--sp_model", A.sp_model, "--data", A.data, "--cases",
               A.cases, "--variants", json.dumps(vs), "--side", side, "--label", label, "--peak", str(A.peak),
               "--budget", str(A.budget), "--t_start", str(A.t_start), "--profile", A.profile, "--timing", A.timing] + (["--tiny"] if A.tiny else [])  # fmt: skip
        subprocess.run(cmd, check=False)
        p = out / f"{label}.json"
        recs += json.loads(p.read_text()) if p.exists() else []
    result = {"meta": meta, "results": recs}
    if qruns is not None:
        result["qlora"] = qruns
    result["meta"]["wall_s"] = round(time.time() - t0, 1)
    (out / "train_speed.json").write_text(json.dumps(result, indent=2))
    t = table(recs, A.peak)
    for q in result.get("qlora", []):
        t += (
            f"\nQLoRA {q['mode']} 7B seq 512 batch 1: training peak {q.get('peak_mem_gib')} GiB, "
            f"loading peak {q.get('load_peak_mem_gib')} GiB, rc {q['rc']}"
        )
    (out / "table.md").write_text(t + "\n")
    print(t)


if __name__ == "__main__":
    main()
