"""LoRA adapters: read one without loading a model, check that it fits, and apply several in order.

An adapter file holds three kinds of tensors, named as peft saves them (``base_model.model.`` + module):

* ``<module>.lora_A.weight`` / ``.lora_B.weight`` (linear) and ``.lora_embedding_A`` / ``_B`` (embedding):
  the low-rank update, scaled by ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA);
* ``<module>.weight`` for ``modules_to_save``: a full replacement, e.g. a resized ``embed_tokens``/``lm_head``;
* ``<module>.base_layer.weight``: a resized base layer peft saved together with a LoRA on it (and, for a
  resized vocabulary, ``.modules_to_save.weight`` / ``.original_module.weight``: the trained copy and the
  untrained base it replaced).

The fit check works on a name -> shape map, so it runs against a loaded model or against safetensors
headers alone (``zhtune merge`` checks every adapter before it reads a single weight).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zhtune.errors import ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
PREFIX = "base_model.model."
VOCAB_PARAMS = ("embed_tokens.weight", "lm_head.weight")

Shapes = dict[str, tuple[int, ...]]


def weights_file(path: str | Path, *, allow_pickle: bool = False) -> Path:
    p = Path(path)
    if (p / ADAPTER_WEIGHTS).is_file():
        return p / ADAPTER_WEIGHTS
    if (p / ADAPTER_PICKLE).is_file():
        if allow_pickle:
            return p / ADAPTER_PICKLE
        raise ConfigError(
            f"{p} has only a pickle {ADAPTER_PICKLE}; pass --allow_pickle to read it "
            "(tensors only, torch.load(weights_only=True)) or convert it to safetensors"
        )
    raise ConfigError(f"{p} has no {ADAPTER_WEIGHTS}")


def read_adapter_config(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    p = Path(path)
    cfg = p / ADAPTER_CONFIG
    if not cfg.is_file():
        raise ConfigError(f"{p} is not a LoRA adapter: it has no {ADAPTER_CONFIG}")
    weights_file(p, allow_pickle=allow_pickle)
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg}: malformed JSON ({e.msg} at line {e.lineno})") from None


def load_adapter_tensors(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """All tensors of an adapter (small next to the model; modules_to_save embeddings included)."""
    f = weights_file(path, allow_pickle=allow_pickle)
    if f.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(f))
    import torch

    return torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)


def adapter_shapes(path: str | Path, *, allow_pickle: bool = False) -> Shapes:
    f = weights_file(path, allow_pickle=allow_pickle)
    if f.suffix != ".safetensors":
        return {k: tuple(v.shape) for k, v in load_adapter_tensors(path, allow_pickle=True).items()}
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as sf:
        return {k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()}


def _strip(key: str) -> str:
    return key[len(PREFIX) :] if key.startswith(PREFIX) else key


@dataclass
class LoraPair:
    module: str  # e.g. model.layers.0.self_attn.q_proj
    a_key: str
    b_key: str
    embedding: bool  # lora_embedding_A/B: A is (r, rows), B is (dim, r)


@dataclass
class AdapterLayout:
    """What an adapter changes, by base parameter name, read from its config and tensor names only."""

    path: Path
    config: dict[str, Any]
    shapes: Shapes
    pairs: dict[str, LoraPair] = field(default_factory=dict)  # param name -> pair
    replace: dict[str, str] = field(default_factory=dict)  # param name -> adapter key (full tensor)
    copies: set[str] = field(default_factory=set)  # replaced as modules_to_save copies (not resized bases)
    unsupported: list[str] = field(default_factory=list)

    def rank(self, pair: LoraPair) -> int:
        return self.shapes[pair.a_key][0]

    def scale(self, pair: LoraPair) -> float:
        """lora_alpha / r (or / sqrt(r) with rsLoRA), honouring per-module alpha_pattern."""
        alpha = float(self.config.get("lora_alpha", 8))
        for pat, val in (self.config.get("alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?{pat}", pair.module):
                alpha = float(val)
                break
        r = self.rank(pair)
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out"))


def read_layout(path: str | Path, *, allow_pickle: bool = False) -> AdapterLayout:
    cfg = read_adapter_config(path, allow_pickle=allow_pickle)
    p = Path(path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{p / ADAPTER_CONFIG}: peft_type {cfg.get('peft_type')}; only LoRA adapters merge")
    lay = AdapterLayout(p, cfg, adapter_shapes(p, allow_pickle=allow_pickle))
    halves: dict[str, dict[str, str]] = {}
    for key in lay.shapes:
        k = _strip(key)
        m = re.fullmatch(r"(.+)\.lora_(A|B)\.weight", k) or re.fullmatch(r"(.+)\.lora_embedding_(A|B)", k)
        if m:
            kind = "E" if ".lora_embedding_" in k else "L"
            halves.setdefault(m.group(1), {})[m.group(2) + kind] = key
        elif k.endswith(".original_module.weight"):
            continue  # the untrained base layer, saved alongside a modules_to_save copy
        elif k.endswith(".base_layer.weight"):
            lay.replace[k.replace(".base_layer.weight", ".weight")] = key
        elif k.endswith(".modules_to_save.weight"):
            name = k.replace(".modules_to_save.weight", ".weight")
            lay.replace.setdefault(name, key)
            lay.copies.add(name)
        elif k.endswith(".weight") and ".lora_" not in k and "token_adapter" not in k:
            lay.replace[k] = key  # modules_to_save, saved under the module's own name
            lay.copies.add(k)
        else:
            lay.unsupported.append(key)
    for mod, h in halves.items():
        emb = "AE" in h
        a, b = h.get("AE" if emb else "AL"), h.get("BE" if emb else "BL")
        if a is None or b is None:
            lay.unsupported.append(f"{mod}: lora_A without lora_B (or the reverse)")
            continue
        lay.pairs[f"{mod}.weight"] = LoraPair(mod, a, b, emb)
    if cfg.get("use_dora"):
        lay.unsupported.append("use_dora: DoRA magnitude vectors")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        lay.unsupported.append(f"bias={cfg.get('bias')!r} / lora_bias: trained biases")
    return lay


def fit_problems(shapes: Mapping[str, tuple[int, ...]], lay: AdapterLayout) -> tuple[list[str], Shapes]:
    """Problems applying ``lay`` to parameters of these shapes, and the shapes after applying it."""
    problems: list[str] = []
    after = dict(shapes)
    for name, key in lay.replace.items():
        shape = lay.shapes[key]
        if name not in shapes:
            problems.append(f"{name}: the adapter replaces it, the model has no such parameter")
            continue
        old = shapes[name]
        if len(old) != len(shape) or (name.endswith(VOCAB_PARAMS) and old[1:] != shape[1:]):
            problems.append(f"{name}: adapter shape {shape}, model {old}")
        elif not name.endswith(VOCAB_PARAMS) and old != shape:
            problems.append(f"{name}: adapter shape {shape}, model {old}")
        after[name] = shape
    for name, pair in lay.pairs.items():
        w = after.get(name)
        if w is None:
            problems.append(
                f"the model has no module {pair.module} (adapter trained on another architecture?)"
            )
            continue
        a, b = lay.shapes[pair.a_key], lay.shapes[pair.b_key]
        if pair.embedding:
            rows, cols = w
            if a[1] != rows:
                problems.append(
                    f"{pair.module}: the adapter's LoRA covers a vocabulary of {a[1]} rows, the model has {rows}"
                )
            if b[0] != cols:
                problems.append(f"{pair.module}: adapter embedding size {b[0]}, model {cols}")
            continue
        out_f, in_f = (w[1], w[0]) if lay.fan_in_fan_out else (w[0], w[1])
        if a[1] != in_f:
            problems.append(f"{pair.module}: adapter input size {a[1]}, model {in_f}")
        if b[0] != out_f:
            problems.append(f"{pair.module}: adapter output size {b[0]}, model {out_f}")
        if a[0] != b[1]:
            problems.append(f"{pair.module}: lora_A rank {a[0]} but lora_B rank {b[1]}")
    for u in lay.unsupported:
        problems.append(f"unsupported adapter content: {u}")
    emb = [after[n] for n in after if n.endswith(VOCAB_PARAMS)]
    if len({s[0] for s in emb}) > 1:
        problems.append(
            "embed_tokens and lm_head end up with different vocabulary sizes: "
            + ", ".join(f"{n} {after[n][0]}" for n in after if n.endswith(VOCAB_PARAMS))
        )
    return problems, after


def vocab_rows(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    for name, s in shapes.items():
        if name.endswith("embed_tokens.weight"):
            return s[0]
    return None


def model_shapes(model: Any) -> Shapes:
    base = model
    if hasattr(model, "peft_config"):  # a PeftModel: look at the wrapped transformers model
        base = model.get_base_model()
    out: Shapes = {}
    for name, p in base.named_parameters(remove_duplicate=False):
        name = name.replace(".base_layer.", ".").replace(".original_module.", ".")
        if ".lora_" in name or ".modules_to_save." in name:
            continue
        out[name] = tuple(p.shape)
    return out


def check_adapter(model: Any, path: str | Path, *, tokenizer_name: str | None = None) -> dict[str, Any]:
    """Raise a clear error when the adapter at ``path`` was trained for a different model or vocabulary."""
    lay = read_layout(path)
    shapes = model_shapes(model)
    problems, _ = fit_problems(shapes, lay)
    rows = vocab_rows(shapes)
    for name, key in lay.replace.items():
        if name.endswith(VOCAB_PARAMS) and name in shapes and lay.shapes[key][0] != shapes[name][0]:
            problems.append(
                f"{name}: the adapter was trained for a vocabulary of {lay.shapes[key][0]} rows, the model has "
                f"{shapes[name][0]}; load the model with the tokenizer the adapter was trained with "
                f"(--tokenizer_name_or_path{' ' + tokenizer_name if tokenizer_name else ''}) so it is resized"
            )
    if problems:
        raise ConfigError(
            f"adapter {path} does not fit the model (embedding rows {rows}):\n  " + "\n  ".join(problems[:8])
        )
    return lay.config


def apply_adapters(model: Any, paths: list[str], *, merge: bool = False, trainable: bool = False) -> Any:
    """Apply LoRA adapters in order. Several adapters are merged one by one (order matters)."""
    from peft import PeftModel

    for i, p in enumerate(paths):
        check_adapter(model, p)
        model = PeftModel.from_pretrained(model, p, is_trainable=trainable and i == len(paths) - 1)
        if merge or i < len(paths) - 1:
            model = model.merge_and_unload()
    return model
