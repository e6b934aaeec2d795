"""Check that a base model, its tokenizer and a chain of adapters agree, before anything is written.

Everything here reads configs and tensor headers only. Adapters are checked in order against the shapes
the model has at that point (an adapter may replace embed_tokens/lm_head with a resized vocabulary, and
the next adapter must fit that). A mismatch raises one error naming the files and sizes involved.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zhtune.errors import ConfigError
from zhtune.model.adapters import ADAPTER_CONFIG, AdapterLayout, fit_problems, read_layout, vocab_rows
from zhtune.model.tensors import EMBED, HEAD, Checkpoint, MergedTensors

ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass
class MergePlan:
    base: Checkpoint
    adapters: list[AdapterLayout]
    tensors: MergedTensors
    rows: int | None  # embedding rows of the merged model
    tokenizer_dir: str  # where the merged model's tokenizer comes from
    template_dir: str  # where a zhtune chat-template sidecar may be
    tokenizer: Any

    def summary(self) -> dict[str, Any]:
        return {
            "base": str(self.base.dir),
            "adapters": [str(a.path) for a in self.adapters],
            "vocab_rows": self.rows,
            "tokenizer": self.tokenizer_dir,
            "tokenizer_size": len(self.tokenizer),
            "tied_embeddings": self.tensors.tied,
        }


def has_tokenizer(d: str | Path) -> bool:
    return (Path(d) / "tokenizer_config.json").is_file() or (Path(d) / "tokenizer.json").is_file()


def _check_arch(base: Checkpoint, lay: AdapterLayout) -> None:
    """When the adapter names a local base model, its architecture must match ours."""
    named = lay.config.get("base_model_name_or_path")
    if not named or not (Path(named) / "config.json").is_file():
        return
    theirs = json.loads((Path(named) / "config.json").read_text(encoding="utf-8"))
    diff = [
        f"{k} {theirs.get(k)} vs {base.config.get(k)}"
        for k in ARCH_KEYS
        if k in theirs and k in base.config and theirs[k] != base.config[k]
    ]
    if diff:
        raise ConfigError(
            f"adapter {lay.path} was trained on {named}, whose architecture differs from the base model "
            f"{base.dir} ({'; '.join(diff)}); merge it into the model it was trained on"
        )


def _tokenizer_size(d: Path) -> int | None:
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(str(d)))
    except Exception:  # noqa: BLE001 - an unreadable tokenizer is reported where it is used
        return None


def plan_merge(
    base_dir: str | Path,
    adapters: list[str],
    *,
    tokenizer_dir: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> MergePlan:
    base = Checkpoint(base_dir, allow_pickle=allow_pickle)
    shapes = dict(base.shapes)
    if base.tied and HEAD not in shapes and EMBED in shapes:
        shapes[HEAD] = shapes[EMBED]
    layouts: list[AdapterLayout] = []
    where = f"the base model {base.dir}"
    for p in adapters:
        if not (Path(p) / ADAPTER_CONFIG).is_file():
            raise ConfigError(f"--lora_model {p}: not a LoRA adapter directory (no {ADAPTER_CONFIG})")
        lay = read_layout(p, allow_pickle=allow_pickle)
        _check_arch(base, lay)
        problems, after = fit_problems(shapes, lay)
        rows_now = vocab_rows(after)
        if has_tokenizer(p) and rows_now is not None:
            n = _tokenizer_size(Path(p))
            if n is not None and n > rows_now:
                problems.append(
                    f"its tokenizer ({p}) has {n} tokens but after it the model has {rows_now} embedding rows: "
                    "the adapter does not carry embed_tokens/lm_head (modules_to_save) for its vocabulary"
                )
        if problems:
            wfile = next(
                (
                    Path(p) / f
                    for f in ("adapter_model.safetensors", "adapter_model.bin")
                    if (Path(p) / f).is_file()
                ),
                Path(p),
            )
            raise ConfigError(
                f"adapter {wfile} does not fit {where} (embedding rows {vocab_rows(shapes)}):\n  "
                + "\n  ".join(problems[:10])
            )
        shapes = after
        layouts.append(lay)
        where = f"{base.dir} with {', '.join(str(x.path) for x in layouts)} applied"

    # peft unties a tied head when either side gets a modules_to_save copy (LoRA updates the shared weight)
    untied = any(HEAD in lay.replace or HEAD in lay.pairs or EMBED in lay.copies for lay in layouts)
    tied = base.tied and not untied
    if tied:
        shapes.pop(HEAD, None)
    tensors = MergedTensors(base, layouts, shapes, tied)

    tok_src = (
        tokenizer_dir or next((p for p in reversed(adapters) if has_tokenizer(p)), None) or str(base.dir)
    )
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tok_src, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise ConfigError(f"could not load the tokenizer at {tok_src}: {e}") from e
    rows = vocab_rows(shapes)
    if rows is not None and len(tok) > rows:
        raise ConfigError(
            f"the tokenizer at {tok_src} has {len(tok)} tokens but the merged model has {rows} embedding rows "
            f"({base.dir}: {vocab_rows(base.shapes)} rows"
            + "".join(f", {lay.path}: {_rows_of(lay)}" for lay in layouts)
            + "); pass the tokenizer the adapters were trained with (--tokenizer_name_or_path)"
        )
    template_dir = tok_src
    return MergePlan(base, layouts, tensors, rows, str(tok_src), str(template_dir), tok)


def _rows_of(lay: AdapterLayout) -> str:
    for name, key in lay.replace.items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            return f"{lay.shapes[key][0]} rows"
    return "no embeddings"


def plan_for(m: Any, lora_models: list[str] | None, command: str) -> tuple[Any, MergePlan]:
    """The model source of ``m`` (ModelArgs: a local directory, a GGUF file or the default) and the plan for
    merging ``lora_models`` into it in order; a hub id is an error, since ``command`` reads local shards."""
    from zhtune.model.loader import resolve

    src = resolve(m.model_name_or_path, m.gguf_file, m.cache_dir)
    if src.kind == "hub":
        raise ConfigError(
            f"{m.model_name_or_path}: {command} reads a local model directory; download it first"
        )
    plan = plan_merge(
        src.path,
        list(lora_models or []),
        tokenizer_dir=m.tokenizer_name_or_path,
        allow_pickle=m.allow_pickle,
        trust_remote_code=m.trust_remote_code,
    )
    return src, plan


def merged_config(plan: MergePlan, dtype: torch.dtype) -> dict[str, Any]:
    cfg = dict(plan.base.config)
    if plan.rows is not None:
        cfg["vocab_size"] = plan.rows
    cfg["tie_word_embeddings"] = plan.tensors.tied
    cfg["dtype"] = DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))
    cfg.pop("torch_dtype", None)
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    return cfg
