"""The longest sequence a 7B QLoRA trains in a 16 GB card, emulated on a larger one.

``torch.cuda.set_per_process_memory_fraction`` caps the process at ``--mem_gib`` GiB (allocations past it raise
an out-of-memory error, as on the small card); one training step (forward, backward, optimizer) at batch 1 is
tried at 2048, 4096, 8192, ... tokens until one fails, then the gap is halved down to ``--mem_step`` tokens.
Each column keeps its settings of the ``7b_qlora_s2048`` case (4-bit NF4 base, LoRA r8 on all seven
projections, gradient checkpointing: HF's for HF+PEFT and zhtune, unsloth's own for unsloth); zhtune runs
its real Trainer for every step tried. Peak memory is torch.cuda.max_memory_allocated(), weights included.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import speed_common as C

CASE = "7b_qlora_s2048"


def attempt(step: Callable[[int], None], seq: int) -> tuple[bool, float, str]:
    """One step at ``seq`` tokens: (fits, peak GiB, error)."""
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    err = ""
    try:
        step(seq)
        C.sync()
        ok = True
    except torch.OutOfMemoryError as e:
        ok, err = False, str(e).split("\n")[0][:160]
    peak = torch.cuda.max_memory_allocated() / 2**30
    gc.collect()  # the failed step's frames are gone once the except clause has ended
    torch.cuda.empty_cache()
    return ok, round(peak, 2), err


def search(step: Callable[[int], None], start: int, most: int, resolution: int) -> dict:
    probes: list[dict] = []

    def fits(seq: int) -> bool:
        t0 = time.time()
        ok, peak, err = attempt(step, seq)
        probes.append(
            {"seq": seq, "fits": ok, "peak_gib": peak, "s": round(time.time() - t0, 1), "error": err}
        )
        C.log(f"  seq {seq}: {'fits' if ok else 'out of memory'} (peak {peak} GiB)")
        return ok

    good, bad = 0, None
    seq = start
    while seq <= most:
        if not fits(seq):
            bad = seq
            break
        good, seq = seq, seq * 2
    while bad is not None and bad - good > resolution:
        mid = (good + bad) // 2 // resolution * resolution
        if mid <= good:
            break
        if fits(mid):
            good = mid
        else:
            bad = mid
    return {"longest_seq": good, "first_failing_seq": bad, "probes": probes}


def hf_stepper(side: str) -> Callable[[int], None]:
    import torch
    from speed_sides import hf_model, unsloth_model

    model = unsloth_model(CASE, C.A.mem_max_seq) if side == "unsloth" else hf_model(CASE)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    vocab = model.config.vocab_size

    def step(seq: int) -> None:
        try:
            ids = torch.randint(3, vocab, (1, seq), device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
        finally:
            opt.zero_grad(set_to_none=True)

    return step


def zhtune_stepper(opts: dict | None = None) -> Callable[[int], None]:
    import torch
    from speed_sides import zhtune_model

    from zhtune.train.args import build_training_arguments
    from zhtune.train.packing import PackingCollator
    from zhtune.train.trainer import ZhTrainer

    model, zc, _n = zhtune_model(CASE, {"opts": opts or {}}, 1)
    zc.train.max_steps = 1
    vocab = model.config.vocab_size

    def step(seq: int) -> None:
        ids = torch.randint(3, vocab, (seq,)).tolist()
        args = build_training_arguments(zc.train, has_eval=False, device="cuda")
        trainer = ZhTrainer(model=model, args=args, train_dataset=[{"input_ids": ids, "labels": ids}],
                            data_collator=PackingCollator(seq, pad_token_id=0), zh_config=zc)  # fmt: skip
        try:
            trainer.train()
        finally:
            model.zero_grad(set_to_none=True)
            del trainer

    return step


def longest_seq(side: str) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("the memory cap and the 4-bit base need CUDA")
    rec = {"side": side, "case": "longest_seq_7b_qlora", "mem_gib": C.A.mem_gib}
    t0 = time.time()
    if side == "zhtune_offload":
        step = zhtune_stepper({"gradient_checkpointing_offload": True})
    else:
        step = zhtune_stepper() if side == "zhtune" else hf_stepper(side)
    rec["load_s"] = round(time.time() - t0, 1)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, C.A.mem_gib * 2**30 / total))
    try:
        start = 256 if C.A.tiny else 2048
        rec.update(search(step, start, C.A.mem_max_seq, C.A.mem_step))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    rec["ok"] = True
    return rec
