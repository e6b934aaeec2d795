"""Turn a loaded model into what is trained: LoRA (fresh or continued), QLoRA/8-bit, or full weights."""

from __future__ import annotations

import logging
from typing import Any

import torch

from zhtune.config.args import LoraArgs, ModelArgs, TrainArgs
from zhtune.model.adapters import check_adapter
from zhtune.model.families import lora_targets

log = logging.getLogger(__name__)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def resolve_checkpointing(
    model: Any, largs: LoraArgs, targs: TrainArgs, tokens_per_step: int | None, device: str | None
) -> bool:
    """--gradient_checkpointing as given, or (unset) on only when a step would not fit the GPU's memory.
    The decision is written back into ``targs`` so the saved config records it."""
    if targs.gradient_checkpointing is None:
        from zhtune.train.speed import needs_checkpointing

        on, why = needs_checkpointing(
            model, tokens_per_step or 0, device or "cpu", full=largs.finetuning_type == "full"
        )
        log.info("gradient checkpointing %s", why)
        targs.gradient_checkpointing = on
    return bool(targs.gradient_checkpointing)


def enable_checkpointing(model: Any, targs: TrainArgs) -> None:
    """Gradient checkpointing of every decoder layer, its saved activations in pinned host memory with
    --gradient_checkpointing_offload (transformers' ``offload``) where the model is on an accelerator."""

    offload = bool(targs.gradient_checkpointing_offload)
    if offload and next(model.parameters()).device.type == "cpu":
        log.info("--gradient_checkpointing_offload: the model is in host memory already; nothing to offload")
        offload = False
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}, offload=offload
    )
    model.config.use_cache = False


def freeze_4bit_base(model: Any) -> None:
    """QLoRA: every base weight frozen, the weights that are not 4-bit (norms, embeddings, lm_head) left in the
    dtype they were loaded in, as TRL and unsloth leave them. peft's ``prepare_model_for_kbit_training`` casts
    those to fp32; an fp32 norm weight makes each norm's output, and so the residual stream and the activations
    checkpointing saves, fp32, which cost memory and conversions in every layer while the 4-bit GEMMs compute in
    bf16 anyway (on an H100, QLoRA DPO of a 7B: TRL 5,034 tok/s at 5.65 GiB, zhtune with the cast 3,919 at 7.69).
    8-bit (LLM.int8, Chinese-Vicuna's recipe) keeps peft's preparation."""
    model.requires_grad_(False)


def prepare_for_training(
    model: Any,
    margs: ModelArgs,
    largs: LoraArgs,
    targs: TrainArgs,
    *,
    tokens_per_step: int | None = None,
    device: str | None = None,
) -> Any:
    """``tokens_per_step`` and ``device`` let an unset --gradient_checkpointing be decided by memory."""
    quantized = margs.load_in_4bit or margs.load_in_8bit
    resolve_checkpointing(model, largs, targs, tokens_per_step, device)
    if largs.finetuning_type == "full":
        if quantized:
            from zhtune.errors import ConfigError

            raise ConfigError(
                "a quantized base cannot be fully fine-tuned; use --finetuning_type lora (QLoRA)"
            )
        model.requires_grad_(True)
        if targs.gradient_checkpointing:
            enable_checkpointing(model, targs)
        return model

    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if margs.load_in_8bit:  # (its own checkpointing call knows no offload: ours below replaces it)
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=targs.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif quantized:
        freeze_4bit_base(model)
    if targs.gradient_checkpointing:
        if not margs.load_in_8bit or targs.gradient_checkpointing_offload:
            enable_checkpointing(model, targs)
        if not margs.load_in_8bit:
            model.enable_input_require_grads()
        model.config.use_cache = False

    if largs.peft_path:
        check_adapter(model, largs.peft_path)
        model = PeftModel.from_pretrained(model, largs.peft_path, is_trainable=True)
        log.info("continuing adapter %s", largs.peft_path)
    else:
        model = get_peft_model(model, lora_config(model, largs))
    # trainable weights in fp32 (adapters, and modules_to_save copies) while the frozen base stays low-precision
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    return model


def lora_config(model: Any, largs: LoraArgs) -> Any:
    """The peft LoraConfig of a fresh adapter: --lora_rank/alpha/dropout on the family's (or the given)
    projections, plus --modules_to_save trained in full."""
    from peft import LoraConfig

    # a tied model keeps its trained embed_tokens/lm_head copies tied (one tensor, saved for both)
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    return LoraConfig(
        ensure_weight_tying=tied and bool(largs.modules_to_save),
        r=largs.lora_rank,
        lora_alpha=largs.lora_alpha,
        lora_dropout=largs.lora_dropout,
        target_modules=lora_targets(model, largs.trainable),
        modules_to_save=list(largs.modules_to_save) if largs.modules_to_save else None,
        use_rslora=largs.use_rslora,
        use_dora=largs.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
