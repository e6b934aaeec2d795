"""Model-family quirks as a small table, looked up by ``config.model_type``.

A family names the modules LoRA targets by default, and whether the checkpoint needs its own code.
Everything else is plain transformers/peft.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zhtune.errors import ConfigError

LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    lora_targets: tuple[str, ...]
    remote_code: bool = False
    note: str = ""


FAMILIES: dict[str, Family] = {
    "llama": Family(LLAMA_STYLE),
    "mistral": Family(LLAMA_STYLE),
    "qwen2": Family(LLAMA_STYLE),
    "qwen3": Family(LLAMA_STYLE),
    "yi": Family(LLAMA_STYLE),
    "gemma": Family(LLAMA_STYLE),
    "gemma2": Family(LLAMA_STYLE),
    "baichuan": Family(
        ("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"),
        remote_code=True,
        note="Baichuan fuses q, k and v into one W_pack projection",
    ),
    "qwen": Family(("c_attn", "c_proj", "w1", "w2"), remote_code=True),
    "chatglm": Family(("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"), remote_code=True),
    "internlm2": Family(("wqkv", "wo", "w1", "w2", "w3"), remote_code=True),
    "phi3": Family(("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "falcon": Family(("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
    "gpt2": Family(("c_attn", "c_proj", "c_fc")),
}


def family_of(model_type: str | None) -> Family | None:
    return FAMILIES.get((model_type or "").lower())


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the linear layers LoRA could target (the output head excluded)."""
    names: set[str] = set()
    for full, mod in model.named_modules():
        leaf = full.rsplit(".", 1)[-1]
        is_linear = isinstance(mod, torch.nn.Linear) or type(mod).__name__ in ("Linear8bitLt", "Linear4bit")
        if is_linear and leaf not in ("lm_head", "output", "embed_out"):
            names.add(leaf)
    return sorted(names)


def lora_targets(model: torch.nn.Module, requested: list[str] | None) -> list[str] | str:
    """The modules to put LoRA on: what was asked (checked to exist) or the family's default."""
    present = set(linear_module_names(model))
    if requested:
        if requested == ["all-linear"] or requested == ["all"]:
            return "all-linear"
        missing = [r for r in requested if r not in present]
        if missing:
            raise ConfigError(
                f"--trainable names {', '.join(missing)}, which this model does not have; "
                f"its linear layers are: {', '.join(sorted(present))}"
            )
        return list(requested)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    fam = family_of(model_type)
    if fam is not None:
        chosen = [t for t in fam.lora_targets if t in present]
        if chosen:
            return chosen
    if "W_pack" in present:  # Baichuan checkpoints loaded under another model_type
        return [t for t in FAMILIES["baichuan"].lora_targets if t in present]
    return "all-linear"
