"""The columns of bench/train_speed.py, each run in its own process (Liger and unsloth patch transformers globally):

  baseline  HF+PEFT: the setup HF Trainer(bf16=True) + peft runs (trainable tensors fp32, autocast bf16 forward
            and loss, torch AdamW fused, HF checkpointing with use_reentrant=False, sdpa);
  liger     the same after ``apply_liger_kernel_to_llama()`` (RoPE, RMSNorm, SwiGLU, fused linear
            cross-entropy): what ``use_liger_kernel: true`` gives LLaMA-Factory and axolotl users;
  unsloth   ``FastLanguageModel.from_pretrained`` + ``get_peft_model`` on the same weights saved to disk, in the
            same loop (its kernels live in the model's forward and backward); checkpointing is its own
            ``use_gradient_checkpointing="unsloth"``, the setting its documentation recommends;
  zhtune    the real training path: prepare_for_training, ZhTrainer with its default speed settings.

4-bit cases load the saved model with NF4, double quantization and bf16 compute on every column (zhtune's
defaults), through peft's ``prepare_model_for_kbit_training`` on the HF columns.
"""

from __future__ import annotations

import tempfile
import time

import speed_common as C


def lora_config(head: bool):
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=C.TARGETS, task_type="CAUSAL_LM",
                      modules_to_save=["embed_tokens", "lm_head"] if head else None)  # fmt: skip


def hf_model(name: str):
    """The HF+PEFT model of a case (the liger column patched transformers before this is called)."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    shape, seq, bs, gc_on, vocab, head, quant = C.case(name)
    if quant:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        path = C.disk_model(shape, vocab)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            quantization_config=q,
            dtype=torch.bfloat16,
            device_map={"": C.device()},
            attn_implementation="sdpa",
        )
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc_on, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        model = C.build(shape, vocab)
        if gc_on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(head))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def unsloth_model(name: str, max_seq: int | None = None):
    """unsloth's model of a case; ``max_seq``: the longest sequence it will see (its RoPE cache is sized by it)."""
    import torch
    from unsloth import FastLanguageModel

    shape, seq, bs, gc_on, vocab, head, quant = C.case(name)
    path = C.disk_model(shape, vocab)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    gc_mode = "unsloth" if gc_on else False
    model, _tok = FastLanguageModel.from_pretrained(
        model_name=str(path), max_seq_length=max_seq or seq, dtype=torch.bfloat16, load_in_4bit=quant,
        load_in_16bit=not quant, use_gradient_checkpointing=gc_mode,
    )  # fmt: skip
    model = FastLanguageModel.get_peft_model(
        model, r=8, lora_alpha=32, lora_dropout=0.0, target_modules=C.TARGETS, bias="none",
        use_gradient_checkpointing=gc_mode, random_state=0,
        modules_to_save=["embed_tokens", "lm_head"] if head else None,
    )  # fmt: skip
    FastLanguageModel.for_training(model, use_gradient_checkpointing=gc_mode)
    return model


def hf_case(side: str, name: str) -> dict:
    """One case on a HF-loop column (baseline, liger, unsloth)."""
    import torch

    shape, seq, bs, gc_on, vocab, head, quant = C.case(name)
    rec = {"side": side, "case": name, "batch": bs, "seq": seq, "gradient_checkpointing": gc_on}
    if side == "unsloth" and gc_on:
        rec["gradient_checkpointing"] = "unsloth"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model = unsloth_model(name) if side == "unsloth" else hf_model(name)
    cfg = model.config
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=C.device() == "cuda")
    model.train()
    batches = C.hf_batches(name, cfg.vocab_size)
    times, tokens, losses = C.hf_loop(model, opt, batches, rec)
    C.finish(rec, times, tokens, losses, cfg, name)
    del model, opt, params
    return rec


def zhtune_model(name: str, variant: dict, rows_bs: int):
    """The model, the zhtune config and the TrainArgs of a case, prepared by zhtune's own set-up."""
    import torch

    from zhtune.train.setup import prepare_for_training
    from zhtune.train.sft import SftConfig

    shape, seq, bs, gc_on, vocab, head, quant = C.case(name)
    out = tempfile.mkdtemp(prefix="zhtune_bench_")
    real = name == "7b_sft_real"
    n_steps = C.WARMUP + ((4 if C.A.tiny else C.REAL_STEPS) if real else C.ITERS)
    flat = {
        "output_dir": out, "per_device_train_batch_size": rows_bs, "max_steps": n_steps,
        "logging_steps": 1 if C.A.timing == "step" else 1000,
        "save_steps": 10**6, "learning_rate": 1e-4, "lr_scheduler_type": "constant", "warmup_ratio": 0.0,
        "weight_decay": 0.0, "max_grad_norm": 0.0, "report_to": "none", "bf16": True,
        "lora_rank": 8, "lora_alpha": 32, "lora_dropout": 0.0, "trainable": C.TARGETS, "seed": 42,
        "gradient_checkpointing": gc_on, "modules_to_save": ["embed_tokens", "lm_head"] if head else None,
        "train_sampling_strategy": "sequential", "dataloader_num_workers": 0, "disable_tqdm": True,
        "packing": real,
    }  # fmt: skip
    if quant:
        flat.update(model_name_or_path=str(C.disk_model(shape, vocab)), load_in_4bit=True)
    flat.update(variant.get("opts", {}))
    zc = SftConfig.of(flat)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if quant:
        from zhtune.model.loader import load_model

        model = load_model(zc.model, dtype=torch.bfloat16, device="cuda", place=False)
    else:
        # a vocabulary extension in zhtune pads the embedding rows to a multiple of 64
        padded = -(-C.config(shape, vocab).vocab_size // 64) * 64 if head else None
        model = C.build(shape, vocab, rows=padded)
    if variant.get("attn"):
        model.set_attn_implementation(variant["attn"])
    model = prepare_for_training(
        model, zc.model, zc.lora, zc.train, tokens_per_step=rows_bs * seq, device=C.device()
    )
    return model, zc, n_steps


def zhtune_dataset(name: str, n_steps: int, rows_bs: int):
    shape, seq, bs, gc_on, vocab, head, quant = C.case(name)
    if name == "7b_sft_real":
        import datasets

        from zhtune.train.packing import pack_dataset

        samples = C.real_samples(C.tokenizer_dir())
        return pack_dataset(datasets.Dataset.from_list(samples), seq, seed=0)
    ids = C.random_blocks(bs * n_steps, seq, min(vocab, C.config(shape, vocab).vocab_size))
    return [{"input_ids": r, "labels": r} for r in ids]


def zhtune_case(name: str, variant: dict) -> dict:
    import torch
    from transformers import TrainerCallback

    from zhtune.train.args import build_training_arguments
    from zhtune.train.packing import PackingCollator
    from zhtune.train.trainer import ZhTrainer

    shape, seq, bs, gc_on, vocab, head, quant = C.case(name)
    if quant and not torch.cuda.is_available():
        raise RuntimeError("zhtune's --load_in_4bit needs CUDA")
    tag = variant.get("tag", "")
    real = name == "7b_sft_real"
    rows_bs = 2 if real else bs
    rec = {"side": "zhtune" + (f"[{tag}]" if tag else ""), "case": name, "seq": seq, "batch": rows_bs,
           "gradient_checkpointing": gc_on}  # fmt: skip
    model, zc, n_steps = zhtune_model(name, variant, rows_bs)
    args = build_training_arguments(zc.train, has_eval=False, device=C.device())
    ds = zhtune_dataset(name, n_steps, rows_bs)
    if real:
        rec["packed_rows"] = len(ds)
    col = PackingCollator(seq, pad_token_id=0, pad_to_multiple_of=64 if C.device() == "cuda" else None)

    class Clock(TrainerCallback):
        """--timing window: synchronises when the timed window opens (after the warm-up steps) and when
        training ends. --timing step: at every step end (step times between consecutive step ends)."""

        def __init__(self):
            self.t0 = self.t1 = 0.0
            self.ends: list[float] = []

        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            if state.global_step == 0 and "first_step_s" not in rec:
                self.start = time.perf_counter()
            if state.global_step == C.WARMUP and not self.t0:
                C.sync()
                self.t0 = time.perf_counter()
                self.ends.append(self.t0)

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if state.global_step == 1 and "first_step_s" not in rec:
                C.sync()
                rec["first_step_s"] = round(time.perf_counter() - self.start, 2)
            if C.A.timing == "step" and self.t0:
                C.sync()
                self.ends.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kw):  # noqa: ANN001
            C.sync()
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
    if name in C.A.profile.split(",") and tag == "profile":
        # only the run tagged "profile" (last in its process): once profiled, a process dispatches slower for
        # the rest of its life (an eager 7B step measured 406 ms after a profiled run, 295 ms in a fresh one).
        # step timing: the 2nd timed step (its median absorbs it); window timing: the last warm-up step
        callbacks.append(C.profile_callback(C.WARMUP + 1 if C.A.timing == "step" else C.WARMUP - 1, rec))
    Trainer.step_losses = []
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=col, callbacks=callbacks,
                      zh_config=zc)  # fmt: skip
    rec["speed"] = trainer.speed.summary()
    cfg = model.config
    trainer.train()
    n = n_steps - C.WARMUP
    if C.A.timing == "step":
        times = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    else:
        times = [(clock.t1 - clock.t0) / n] * n
    # the sampler is sequential: step i trains rows i*b .. i*b+b-1 (real tokens only; no padding in them)
    lens = [len(ds[i]["input_ids"]) for i in range(min(len(ds), rows_bs * n_steps))]
    tokens = [sum(lens[i * rows_bs : (i + 1) * rows_bs]) for i in range(C.WARMUP, C.WARMUP + len(times))]
    losses = [x.item() for x in Trainer.step_losses]
    C.finish(rec, times, tokens, losses, cfg, name)
    del trainer, model
    return rec
