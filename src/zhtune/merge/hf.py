"""Write a merged model as a Hugging Face directory: sharded safetensors, config, tokenizer + chat template.

Shards are planned from shapes before any tensor is computed, so their names (``-of-N``) are known up
front; tensors are then computed one at a time and a shard is saved as soon as it is full. Memory holds at
most one shard (``--max_shard_size``) plus the tensor being merged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from zhtune.errors import ConfigError
from zhtune.model.merged import DTYPE_NAMES, MergePlan, merged_config


def parse_size(size: str | int) -> int:
    """'2GB', '500MB', '10KiB' or a byte count."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        return int(convert_file_size_to_int(size))
    except ValueError:
        raise ConfigError(
            f"--max_shard_size {size!r}: use a size such as 2GB, 500MB or a byte count"
        ) from None


def plan_shards(names: list[str], shapes: dict, itemsize: int, max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        nbytes = itemsize
        for d in shapes[n]:
            nbytes *= d
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    return shards


def write_weights(
    plan: MergePlan, out: Path, dtype: torch.dtype, max_bytes: int, progress: bool = True
) -> dict:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    t = plan.tensors
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards(t.names, t.shapes, itemsize, max_bytes)
    n = len(shards)
    files = (
        ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    weight_map: dict[str, str] = {}
    total = 0
    with tqdm(total=len(t.names), desc="merging", unit="tensor", disable=not progress) as bar:
        for fname, names in zip(files, shards):
            buf: dict[str, torch.Tensor] = {}
            for name in names:
                buf[name] = t.get(name).to(dtype).contiguous()
                total += buf[name].numel() * itemsize
                weight_map[name] = fname
                bar.update(1)
            save_file(buf, str(out / fname), metadata={"format": "pt"})
            del buf
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return {"shards": n, "bytes": total}


def write_model_files(plan: MergePlan, out: Path, dtype: torch.dtype, template: str | None) -> str:
    """config.json, generation_config.json, tokenizer (with chat template) and remote code files."""
    from zhtune.text.templates import SIDECAR, attach, get_format, save_tokenizer, write_sidecar

    base = plan.base.dir
    (out / "config.json").write_text(
        json.dumps(merged_config(plan, dtype), indent=2) + "\n", encoding="utf-8"
    )
    tok = plan.tokenizer
    gen_file = base / "generation_config.json"
    gen = json.loads(gen_file.read_text(encoding="utf-8")) if gen_file.is_file() else {}
    for key, tid in (("bos_token_id", tok.bos_token_id), ("eos_token_id", tok.eos_token_id)):
        if gen.get(key) is None and tid is not None:
            gen[key] = tid
    if gen.get("pad_token_id") is None and tok.pad_token_id is not None:
        gen["pad_token_id"] = tok.pad_token_id
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    if plan.base.config.get("auto_map"):  # remote-code models need their modelling files
        for f in base.glob("*.py"):
            shutil.copy2(f, out / f.name)

    tdir = Path(plan.template_dir)
    fmt_name = "the tokenizer's own"
    if template or (tdir / SIDECAR).is_file():
        fmt = get_format(tok, template, directory=tdir)
        attach(fmt, tok)
        write_sidecar(fmt, out)
        fmt_name = fmt.name
    elif not getattr(tok, "chat_template", None):
        fmt_name = "none"
    save_tokenizer(tok, out)
    sp = Path(plan.tokenizer_dir) / "tokenizer.model"
    if sp.is_file() and not (out / "tokenizer.model").is_file():
        shutil.copy2(sp, out / "tokenizer.model")
    return fmt_name


def check_dtype(name: str, base_dtype: torch.dtype) -> torch.dtype:
    if name == "auto":
        return base_dtype if base_dtype in DTYPE_NAMES else torch.float16
    return getattr(torch, name)
