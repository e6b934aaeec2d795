"""LoRA adapters: check that one fits a model before loading it, and apply several in order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from zhtune.config.parse import ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    cfg = p / ADAPTER_CONFIG
    if not cfg.is_file():
        raise ConfigError(f"{p} is not a LoRA adapter: it has no {ADAPTER_CONFIG}")
    if not (p / ADAPTER_WEIGHTS).is_file():
        legacy = p / "adapter_model.bin"
        hint = (
            " (it has a pickle adapter_model.bin: convert it to safetensors first)"
            if legacy.is_file()
            else ""
        )
        raise ConfigError(f"{p} has no {ADAPTER_WEIGHTS}{hint}")
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg}: malformed JSON ({e.msg} at line {e.lineno})") from None


def adapter_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(Path(path) / ADAPTER_WEIGHTS), framework="pt") as f:
        for k in f.keys():
            out[k] = tuple(f.get_slice(k).get_shape())
    return out


def _strip(key: str) -> str:
    for prefix in ("base_model.model.",):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def check_adapter(model: Any, path: str | Path, *, tokenizer_name: str | None = None) -> dict[str, Any]:
    """Raise a clear error when the adapter at ``path`` was trained for a different model or vocabulary."""
    cfg = read_adapter_config(path)
    base = getattr(model, "base_model", model)
    base = getattr(base, "model", base) if hasattr(model, "peft_config") else model
    params = dict(base.named_parameters())
    vocab_rows = base.get_input_embeddings().weight.shape[0]
    problems: list[str] = []
    for key, shape in adapter_shapes(path).items():
        k = _strip(key)
        if ".lora_A" in k or ".lora_B" in k:
            mod_name = k.split(".lora_")[0]
            try:
                mod = base.get_submodule(mod_name)
            except AttributeError:
                problems.append(
                    f"the model has no module {mod_name} (adapter trained on another architecture?)"
                )
                continue
            base_layer = getattr(mod, "base_layer", mod)
            w = getattr(base_layer, "weight", None)
            if w is None:
                continue
            in_f = getattr(base_layer, "in_features", None) or getattr(base_layer, "num_embeddings", None)
            out_f = getattr(base_layer, "out_features", None) or getattr(base_layer, "embedding_dim", None)
            if ".lora_A" in k and in_f is not None and shape[-1] != in_f and shape[0] != in_f:
                problems.append(f"{mod_name}: adapter input size {shape[-1]}, model {in_f}")
            if ".lora_B" in k and out_f is not None and shape[0] != out_f and shape[-1] != out_f:
                problems.append(f"{mod_name}: adapter output size {shape[0]}, model {out_f}")
        else:
            name = k.replace(".modules_to_save.default", "")
            p = params.get(name)
            if p is None:
                continue
            if tuple(p.shape) != shape:
                if name.endswith(("embed_tokens.weight", "lm_head.weight")):
                    problems.append(
                        f"{name}: the adapter was trained for a vocabulary of {shape[0]} rows, the model has "
                        f"{p.shape[0]}; load the model with the tokenizer the adapter was trained with "
                        f"(--tokenizer_name_or_path{' ' + tokenizer_name if tokenizer_name else ''}) so it is resized"
                    )
                else:
                    problems.append(f"{name}: adapter shape {shape}, model {tuple(p.shape)}")
    if problems:
        raise ConfigError(
            f"adapter {path} does not fit the model (embedding rows {vocab_rows}):\n  "
            + "\n  ".join(problems[:8])
        )
    return cfg


def apply_adapters(model: Any, paths: list[str], *, merge: bool = False, trainable: bool = False) -> Any:
    """Apply LoRA adapters in order. Several adapters are merged one by one (order matters)."""
    from peft import PeftModel

    for i, p in enumerate(paths):
        check_adapter(model, p)
        model = PeftModel.from_pretrained(model, p, is_trainable=trainable and i == len(paths) - 1)
        if merge or i < len(paths) - 1:
            model = model.merge_and_unload()
    return model
