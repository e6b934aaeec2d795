"""Speed settings shared by every training command (``zhtune sft``, ``zhtune pt``), applied by ZhTrainer.

What it decides, and why each keeps the loss curve of the plain path (within bf16 rounding):

* Adapter inputs stay bf16 under mixed precision. peft casts each LoRA layer's input to the fp32 adapter
  dtype and autocast casts it straight back for the matmul: two full activation copies per layer, about
  2,000 conversion kernels a step at 7B. Turning peft's cast off (its documented ``cast_input_dtype_enabled``
  switch) feeds autocast the same bf16 values, so the arithmetic is unchanged; only the copies go.
* Liger kernels (``pip install 'zhtune[gpu]'``): fused RMSNorm, RoPE, SwiGLU and fused linear cross-entropy,
  applied through transformers' own ``use_liger_kernel`` integration when the model type is supported.
* The loss (train.loss) is computed from hidden states a chunk at a time when Liger's fused loss is not in
  use, so full-vocabulary fp32 logits are never held.
* Gradient checkpointing when asked, or (``--gradient_checkpointing`` unset) only when the estimated memory
  of a step would not fit the GPU.
* Fused LoRA (train.fused_lora, ``--fused_lora``, on by default for LoRA on a GPU): each adapted projection
  runs as one autograd function whose full-size tensors are touched only by GEMMs, instead of peft's scale
  and add in forward and their gradients (and autograd's sum of the two input gradients) in backward. A
  self-check against peft's arithmetic on one layer of each kind runs before it is used; if it fails, the
  plain path is kept and the summary says why.
* FP8 base (train.fp8, ``--fp8_base true``, off by default): the frozen projections under LoRA kept and
  multiplied in FP8 e4m3 with row-wise scales on GPUs with FP8 tensor cores; it changes the arithmetic (the
  loss curve is not bf16's), so it is asked for, never chosen.
* Regional ``torch.compile`` of the decoder layers (``--compile_layers true``): one compiled graph reused by
  every layer; it fuses the norms, RoPE, SwiGLU and LoRA's scale-and-add and cuts the Python work per step.
  Off by default, measured: on an H100 (bench/results/h100_run4) the default path (fused LoRA + Liger) ran
  13,889 tok/s at 7B seq 2048 against 13,605 compiled, and 67,855 against 63,418 at 1.1B, with no compile
  (the first step compiled for 20 s at 7B). Earlier runs, before fused LoRA, had compile ahead (1.38x against
  1.22x at 7B). Fused LoRA stays off under it unless asked for (the compiled graph fuses the same
  element-wise work; fused LoRA traced inside it measured slower, 11,392). Compiled kernels are cached on
  disk (inductor's FX graph cache and AOTAutograd's, both on by default) under ~/.cache/zhtune/torchinductor
  unless TORCHINDUCTOR_CACHE_DIR says otherwise (torch's own default, /tmp, is lost at reboot): at 7B a
  second process's first step took 4.3 s instead of 21.3 s. bench/train_speed.py records ``first_step_s``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class SpeedPlan:
    mixed_precision: str | None = None
    adapter_input_casts_removed: int = 0
    liger: bool = False
    loss: str = "plain"  # plain | chunked | liger
    compiled_layers: int = 0
    fused_lora: int = 0
    fp8_layers: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"precision {self.mixed_precision or 'fp32'}"]
        if self.adapter_input_casts_removed:
            parts.append(
                f"adapter inputs kept {self.mixed_precision} ({self.adapter_input_casts_removed} layers)"
            )
        parts.append("Liger kernels" if self.liger else "no Liger kernels")
        parts.append(
            {"plain": "plain loss", "chunked": "chunked loss", "liger": "fused linear CE loss"}[self.loss]
        )
        if self.fp8_layers:
            parts.append(f"FP8 base ({self.fp8_layers} layers)")
        if self.fused_lora:
            parts.append(f"fused LoRA ({self.fused_lora} layers)")
        if self.compiled_layers:
            parts.append(f"{self.compiled_layers} compiled layers")
        return "; ".join(parts + self.notes)


def base_model(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def liger_support(model: Any) -> str | None:
    """None when Liger can patch this model, else why not."""
    from zhtune.deps import available

    if not torch.cuda.is_available():
        return "no CUDA device"
    if not available("liger_kernel"):
        return "liger-kernel is not installed (pip install 'zhtune[gpu]')"
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception as e:  # noqa: BLE001 - a broken install is reported, not fatal
        return f"liger-kernel failed to import ({type(e).__name__}: {e})"
    model_type = getattr(getattr(base_model(model), "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"Liger has no kernels for model type {model_type!r}"
    return None


def keep_adapter_inputs(model: Any) -> int:
    """Stop peft from casting LoRA inputs to the fp32 adapter dtype (autocast computes in half precision
    anyway). Only valid under autocast: call it when training with --bf16/--fp16."""
    n = 0
    for mod in model.modules():
        if hasattr(mod, "cast_input_dtype_enabled") and hasattr(mod, "lora_A"):
            mod.cast_input_dtype_enabled = False
            n += 1
    return n


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    base = base_model(model)
    dec = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(dec, "layers", None)
    return list(layers) if layers is not None else []


def compile_cache_dir() -> str:
    """Where inductor caches compiled kernels: TORCHINDUCTOR_CACHE_DIR if set, else set to a directory that
    survives a reboot (``$XDG_CACHE_HOME/zhtune/torchinductor``)."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        from zhtune.model.default import cache_root

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "torchinductor")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def compile_layers(model: Any) -> int:
    """Compile each decoder layer in place (regional compilation: identical layers share one graph)."""
    compile_cache_dir()
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


def estimate_step_bytes(model: Any, tokens_per_step: int, checkpointing: bool, full: bool = False) -> int:
    """Rough peak memory of a training step: weights, trainable state (fp32 weight, grad, Adam moments)
    and saved activations. Activations per token and layer: about 34h + 6i bytes in bf16 without
    checkpointing (h hidden size, i MLP size; fits the measured 7B figure), 2h with it plus one layer."""
    cfg = getattr(base_model(model), "config", None)
    h = getattr(cfg, "hidden_size", 0) or 0
    i = getattr(cfg, "intermediate_size", 4 * h) or 4 * h
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # full fine-tuning: fp32 weight + grad + two Adam moments; LoRA adapters are small enough to ignore
    trainable = sum(p.numel() for p in model.parameters()) * 12 if full else 0
    per_layer = tokens_per_step * (34 * h + 6 * i)
    acts = tokens_per_step * layers * 2 * h + per_layer if checkpointing else per_layer * layers
    return int(weights + trainable + acts)


def needs_checkpointing(
    model: Any, tokens_per_step: int, device: str, full: bool = False
) -> tuple[bool, str]:
    """Whether gradient checkpointing is needed for the step to fit this GPU, with the reason."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False, "off (not on a GPU)"
    dev = torch.device(device)
    _free, total = torch.cuda.mem_get_info(dev)
    need = estimate_step_bytes(model, tokens_per_step, checkpointing=False, full=full)
    gib = 2**30
    if need < 0.9 * total:
        return False, f"off (estimated {need / gib:.1f} GiB of {total / gib:.0f} GiB)"
    return True, f"on (estimated {need / gib:.1f} GiB without it, GPU has {total / gib:.0f} GiB)"


def fuse_lora(
    model: Any, mixed: str | None, want: bool | None, compiled: bool, sharded: bool
) -> tuple[int, str]:
    """Fused LoRA where asked (``want`` True) or by default (None: on a GPU, not compiled, not sharded).
    Returns the number of fused layers and a note for the summary."""
    from zhtune.errors import ConfigError
    from zhtune.train import fused_lora

    if want is False:
        return 0, ""
    if sharded:
        if want:
            raise ConfigError(
                "--fused_lora true cannot be combined with --fsdp/--deepspeed (sharded weights)"
            )
        return 0, ""
    on_gpu = any(p.device.type == "cuda" for p in model.parameters())
    if want is None and (compiled or not on_gpu):
        return 0, ""
    n = fused_lora.fuse(model)
    if not n:
        return 0, "no LoRA layer to fuse" if want else ""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed or "")
    why = fused_lora.self_check(model, dtype)
    if why:
        fused_lora.unfuse(model)
        if want:
            raise ConfigError(f"--fused_lora true: the self-check failed: {why}")
        log.warning("fused LoRA off: %s", why)
        return 0, f"fused LoRA off ({why})"
    return n, ""


def plan(model: Any, args: Any, t: Any | None, attn_requested: str | None = None) -> SpeedPlan:
    """Decide and apply the speed settings for a model about to be trained with TrainingArguments ``args``
    (``t``: the zhtune TrainArgs, or None for defaults; ``attn_requested``: --attn_implementation)."""
    from zhtune.errors import ConfigError
    from zhtune.score.loss import head_weight

    p = SpeedPlan()
    mixed = "bf16" if args.bf16 else ("fp16" if args.fp16 else None)
    p.mixed_precision = mixed
    if getattr(base_model(model), "config", None) is not None:
        base_model(model).config.use_cache = False  # a KV cache in training also hides packed sequences
    if mixed:
        p.adapter_input_casts_removed = keep_adapter_inputs(model)

    sharded = bool(getattr(args, "fsdp", None)) or bool(getattr(args, "deepspeed", None))
    want_compile = bool(getattr(t, "compile_layers", False)) if t is not None else False
    want_liger = getattr(t, "use_liger_kernel", None) if t is not None else None
    if want_liger is None:
        want_liger = bool(getattr(args, "use_liger_kernel", False)) or None
    if want_liger is None and want_compile:
        want_liger = (
            False  # inductor fuses norms, RoPE and SwiGLU itself; dynamo cannot trace Liger's launches
        )
    if want_liger is not False:
        why_not = liger_support(model)
        if why_not is None:
            p.liger = True
            args.use_liger_kernel = True
            kc = {**(getattr(args, "liger_kernel_config", None) or {})}
            kc["fused_linear_cross_entropy"] = head_weight(model) is not None and not sharded
            if want_compile:  # compiled layers: Liger only for the loss
                kc.update(rope=False, rms_norm=False, swiglu=False)
            args.liger_kernel_config = kc
        elif want_liger:
            raise ConfigError(f"--use_liger_kernel true: {why_not}")
        else:
            args.use_liger_kernel = False
            p.notes.append(f"Liger off: {why_not}")
    want_chunked = getattr(t, "chunked_loss", None) if t is not None else None
    if p.liger and args.liger_kernel_config.get("fused_linear_cross_entropy"):
        p.loss = "liger"
    elif want_chunked is not False and head_weight(model) is not None and not sharded:
        p.loss = "chunked"
    elif want_chunked:
        raise ConfigError(
            "--chunked_loss true needs a plain linear output head and an unsharded model (no --fsdp/--deepspeed)"
        )
    if (
        t is not None
        and getattr(t, "packing", False)
        and attn_requested is None
        and torch.cuda.is_available()
        and getattr(getattr(base_model(model), "config", None), "_attn_implementation", None) == "sdpa"
    ):
        # rows of several samples: flex attention skips the blocks between samples, where sdpa computes a
        # dense masked square (3.46x against 2.77x the padded baseline on the real SFT lengths, on an H100)
        base_model(model).set_attn_implementation("flex_attention")
        p.notes.append("flex attention for packed rows")
    if t is not None and getattr(t, "fp8_base", False):
        from zhtune.train import fp8

        device = str(next(model.parameters()).device)
        p.fp8_layers = fp8.convert_for_training(model, sharded, device)
    want_fused = getattr(t, "fused_lora", None) if t is not None else None
    p.fused_lora, note = fuse_lora(model, mixed, want_fused, want_compile, sharded)
    if note:
        p.notes.append(note)
    if want_compile:
        p.compiled_layers = compile_layers(model)
    return p
