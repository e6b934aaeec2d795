"""What vLLM loads for ``--backend vllm``: a model directory as it is, a base plus a LoRA adapter, or a merge.

vLLM reads a Hugging Face directory itself, so zhtune hands it one of three things:

* the model directory as it is, when zhtune would not change its weights: no adapters, and the tokenizer is
  the model's own or the same size (nothing to resize). GGUF files and ``default`` arrive here already
  dequantized to cached safetensors by the loader.
* the base directory plus one LoRA adapter that vLLM applies itself (``LoRARequest``), when the adapter holds
  only low-rank updates of the model's linear layers as they are.
* otherwise (several adapters, an extended tokenizer, ``modules_to_save`` such as a resized ``embed_tokens``,
  LoRA on the embeddings, DoRA, trained biases): the model built exactly as the transformers backends build
  it (embeddings fitted to the tokenizer, adapters merged in order) and saved once to
  ``<cache>/vllm/<name>-<key>``, the key a fingerprint of the base, the adapters, the tokenizer and the
  dtype; later runs reuse it while those are unchanged.

A log line says which of the three it is, and why a merge was needed. The engine keeps a weightless copy of
the model (on the meta device) for its config and vocabulary size; vLLM holds the only weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.config.args import ModelArgs
from zhtune.deps import available, install_hint
from zhtune.errors import ConfigError, MissingDependency

log = logging.getLogger(__name__)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's max_lora_rank choices


@dataclass
class VllmModel:
    """The checkpoint vLLM loads and how it was chosen."""

    path: str  # a model directory (or a hub id)
    dtype: str  # float32, bfloat16, float16
    lora: str | None = None  # an adapter vLLM applies itself
    lora_rank: int = 0
    trust_remote_code: bool = False
    download_dir: str | None = None  # where vLLM puts a hub download
    how: str = ""  # one line for the log

    @property
    def max_lora_rank(self) -> int:
        """The smallest of vLLM's rank slots that holds the adapter's rank."""
        return next(r for r in LORA_RANKS if r >= self.lora_rank)


def fingerprint(parts: list[str]) -> str:
    """A short key for files and directories as they are now (names, sizes, modification times)."""
    h = hashlib.sha1()
    for part in parts:
        p = Path(part)
        h.update(f"|{p.resolve() if p.exists() else part}".encode())
        files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
        for f in files:
            st = f.stat()
            h.update(f"|{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def _tokenizer_changes_weights(margs: ModelArgs, src: Any, tok: Any, rows: int) -> str | None:
    """Why the transformers backends would resize or re-initialise embeddings for this tokenizer, or None."""
    if len(tok) > rows:
        return f"the tokenizer has {len(tok)} tokens and the model {rows} embedding rows"
    if margs.tokenizer_name_or_path is None:
        return None
    from transformers import AutoTokenizer

    try:
        own = len(AutoTokenizer.from_pretrained(src.path, trust_remote_code=margs.trust_remote_code))
    except Exception:  # noqa: BLE001 - no tokenizer of its own: the merge path gives the loader's message
        return (
            f"the model directory {src.path} has no tokenizer to compare {margs.tokenizer_name_or_path} with"
        )
    if own != len(tok):
        return f"the tokenizer {margs.tokenizer_name_or_path} ({len(tok)} tokens) extends the model's ({own})"
    return None


def lora_refusal(base: str, adapter: str, *, allow_pickle: bool = False) -> tuple[str | None, int]:
    """Why vLLM's LoRA support cannot apply ``adapter`` to ``base`` as it is (None: it can), and its rank."""
    from zhtune.model.adapters import fit_problems, read_layout

    lay = read_layout(adapter, allow_pickle=allow_pickle)
    if lay.replace:
        names = ", ".join(sorted(lay.replace)[:3])
        return f"it replaces whole weights ({names}: modules_to_save or a resized vocabulary)", 0
    if lay.unsupported:
        return f"it holds {lay.unsupported[0]}", 0
    rank = max((lay.rank(p) for p in lay.pairs.values()), default=0)
    for p in lay.pairs.values():
        if p.embedding or p.module.endswith(("embed_tokens", "lm_head")):
            return f"it has a LoRA on {p.module} (vLLM applies LoRA to linear layers)", rank
    if rank > LORA_RANKS[-1]:
        return f"its rank {rank} is above vLLM's largest ({LORA_RANKS[-1]})", rank
    if (Path(base) / "config.json").is_file():
        from zhtune.model.tensors import Checkpoint

        problems, _ = fit_problems(Checkpoint(base, allow_pickle=allow_pickle).shapes, lay)
        if problems:
            return f"it does not fit the model as it is ({problems[0]})", rank
    return None, rank


def merged_dir(margs: ModelArgs, src: Any, lora: list[str], dtype: str) -> Path:
    from zhtune.model.default import cache_root

    parts = [src.path, *lora, margs.tokenizer_name_or_path or "", margs.new_token_init, dtype]
    name = Path((lora or [src.path])[-1].rstrip("/")).name or "model"
    return cache_root(margs.cache_dir) / "vllm" / f"{name}-{fingerprint(parts)}"


def merge_to(out: Path, margs: ModelArgs, src: Any, tok: Any, lora: list[str], dtype: Any) -> None:
    """Build the model as Engine.load does for the transformers backends and save it to ``out``, atomically."""
    from zhtune.atomic import atomic_dir
    from zhtune.model.adapters import apply_adapters
    from zhtune.model.embeddings import fit_embeddings
    from zhtune.model.loader import load_model
    from zhtune.text.templates import save_tokenizer

    model = load_model(margs, src, dtype=dtype, device="cpu")
    fit_embeddings(
        model,
        tok,
        model_path=src.path,
        tokenizer_name=margs.tokenizer_name_or_path,
        init=margs.new_token_init,
    )
    if lora:
        model = apply_adapters(model, lora, merge=True)
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tok, tmp)
        what = {"base": src.origin, "lora_models": lora, "tokenizer": margs.tokenizer_name_or_path}
        (tmp / "zhtune_source.json").write_text(json.dumps(what, indent=2) + "\n", encoding="utf-8")
    del model


def weightless(path: str, margs: ModelArgs, dtype: Any) -> Any:
    """The model's module tree on the meta device: its config and shapes, no memory for weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path, trust_remote_code=margs.trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=margs.trust_remote_code)


def prepare(margs: ModelArgs, src: Any, tok: Any, lora: list[str]) -> tuple[Any, VllmModel]:
    """The weightless model for the engine and the checkpoint vLLM loads (merging into the cache if needed)."""
    from transformers import AutoConfig

    from zhtune.model.loader import pick_device, pick_dtype

    if not available("vllm"):  # before any merge is written for it
        raise MissingDependency(
            f"vllm is needed for --backend vllm but is not installed: {install_hint('vllm')}"
        )
    if margs.load_in_8bit or margs.load_in_4bit:
        raise ConfigError(
            "--load_in_8bit/--load_in_4bit are bitsandbytes options of the transformers backends; vLLM loads "
            "the model in --dtype (or a checkpoint quantized for vLLM, such as AWQ or GPTQ, as it is)"
        )
    dtype = pick_dtype(margs.dtype, pick_device(margs.device))
    name = str(dtype).removeprefix("torch.")
    rows = AutoConfig.from_pretrained(src.path, trust_remote_code=margs.trust_remote_code)
    rows = rows.get_text_config().vocab_size
    common = dict(dtype=name, trust_remote_code=margs.trust_remote_code)
    if src.kind == "hub" and margs.cache_dir:
        common["download_dir"] = str(Path(margs.cache_dir) / "hub")
    why = _tokenizer_changes_weights(margs, src, tok, rows)
    if why is None and not lora:
        served = VllmModel(src.path, **common, how=f"vLLM loads {src.path} as it is")
    elif why is None and len(lora) == 1:
        why, rank = lora_refusal(src.path, lora[0], allow_pickle=margs.allow_pickle)
        served = VllmModel(
            src.path,
            **common,
            lora=lora[0],
            lora_rank=rank,
            how=f"vLLM applies the LoRA adapter {lora[0]} itself",
        )
    else:
        why = why or f"{len(lora)} adapters are applied in order (vLLM applies one at a time)"
    if why is not None:
        out = merged_dir(margs, src, lora, name)
        if (out / "config.json").is_file():
            how = f"reusing the merged copy {out}"
        else:
            log.info("vLLM cannot load this model as given (%s): merging it into %s (once)", why, out)
            merge_to(out, margs, src, tok, lora, dtype)
            how = f"merged into {out}"
        served = VllmModel(str(out), **common, how=f"vLLM loads a merge ({why}): {how}")
    log.info("%s", served.how)
    return weightless(served.path, margs, dtype), served
