"""Weights read one tensor at a time: a checkpoint's shards, or the same with LoRA adapters merged in.

Nothing here holds a whole model. :class:`Checkpoint` opens safetensors shards (memory-mapped) and hands
out one tensor on request; :class:`MergedTensors` computes each merged tensor when it is asked for, from
the base tensor and the adapters, in order. Writers (HF shards, GGUF) pull tensors through the same
interface, so a merge never needs a second copy of the model in memory, nor even a first one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from zhtune.errors import ConfigError
from zhtune.model.adapters import AdapterLayout, Shapes, load_adapter_tensors

ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class Checkpoint:
    """The weights of an HF model directory, tensor by tensor, in file order."""

    def __init__(self, directory: str | Path, *, allow_pickle: bool = False):
        self.dir = Path(directory)
        self.config: dict[str, Any] = _read_json(self.dir / "config.json")
        self._where: dict[str, Path] = {}
        self.shapes: Shapes = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._handles: dict[Path, Any] = {}
        files = self._shard_files(allow_pickle)
        for f in files:
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                h = safe_open(str(f), framework="pt")
                self._handles[f] = h
                for k in h.keys():
                    sl = h.get_slice(k)
                    self._note(k, f, tuple(sl.get_shape()), ST_DTYPES.get(sl.get_dtype(), torch.float32))
            else:  # tensors only, memory-mapped: no code runs and no copy is made
                sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
                self._handles[f] = sd
                for k, v in sd.items():
                    self._note(k, f, tuple(v.shape), v.dtype)
        self.files = files

    def _note(self, key: str, f: Path, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self._where[key] = f
        self.shapes[key] = shape
        self.dtypes[key] = dtype

    def _shard_files(self, allow_pickle: bool) -> list[Path]:
        d = self.dir
        for index, single in (
            ("model.safetensors.index.json", "model.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin"),
        ):
            if single.endswith(".bin") and not allow_pickle:
                if (d / index).is_file() or (d / single).is_file():
                    raise ConfigError(
                        f"{d} has only pickle (.bin) weights; pass --allow_pickle to read them "
                        "(tensors only, torch.load(weights_only=True)) or convert them to safetensors"
                    )
                continue
            if (d / index).is_file():
                wm = _read_json(d / index).get("weight_map") or {}
                names = sorted(set(wm.values()))
                missing = [n for n in names if not (d / n).is_file()]
                if missing:
                    raise ConfigError(f"{d / index} lists shards that are missing: {', '.join(missing[:4])}")
                return [d / n for n in names]
            if (d / single).is_file():
                return [d / single]
        raise ConfigError(f"{d} holds no model weights (model.safetensors or an index of shards)")

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        f = self._where[name]
        h = self._handles[f]
        return h.get_tensor(name) if hasattr(h, "get_tensor") else h[name]

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False)) or (
            "lm_head.weight" not in self.shapes and "model.embed_tokens.weight" in self.shapes
        )

    @property
    def dtype(self) -> torch.dtype:
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        if isinstance(name, str) and hasattr(torch, name):
            return getattr(torch, name)
        floats = [d for d in self.dtypes.values() if d.is_floating_point]
        return max(set(floats), key=floats.count) if floats else torch.float32


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None


EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


class MergedTensors:
    """Base weights with adapters applied in order, computed one tensor at a time (in float32)."""

    def __init__(self, base: Checkpoint, adapters: list[AdapterLayout], shapes: Shapes, tied: bool):
        self.base = base
        self.adapters = adapters
        self.shapes = shapes  # after every adapter
        self.tied = tied  # the output ties lm_head to embed_tokens (no lm_head tensor is written)
        self._tensors: list[dict[str, torch.Tensor] | None] = [None] * len(adapters)
        names = [n for n in base.names if n in shapes]
        if not tied and HEAD not in names and HEAD in shapes:
            names.append(HEAD)  # an untied head made from a tied base
        self.names = names if not tied else [n for n in names if n != HEAD]

    def _adapter(self, i: int) -> dict[str, torch.Tensor]:
        if self._tensors[i] is None:
            self._tensors[i] = load_adapter_tensors(self.adapters[i].path, allow_pickle=True)
        return self._tensors[i]  # type: ignore[return-value]

    def _apply(self, i: int, name: str, w: torch.Tensor) -> torch.Tensor:
        """Adapter ``i``'s change to parameter ``name``: a full replacement, then a LoRA update."""
        lay = self.adapters[i]
        if name in lay.replace:
            w = self._adapter(i)[lay.replace[name]].to(torch.float32, copy=True)
        pair = lay.pairs.get(name)
        if pair is not None:
            t = self._adapter(i)
            delta = (t[pair.b_key].float() @ t[pair.a_key].float()) * lay.scale(pair)
            if pair.embedding or lay.fan_in_fan_out:
                delta = delta.T
            w += delta
        return w

    def get(self, name: str) -> torch.Tensor:
        if name == HEAD and HEAD not in self.base.shapes:
            w = self._tied_head()
        else:
            w = self.base.get(name).to(torch.float32, copy=True)
            for i in range(len(self.adapters)):
                w = self._apply(i, name, w)
        if tuple(w.shape) != self.shapes[name]:  # checked before any writing; this guards the math
            raise RuntimeError(f"{name}: merged shape {tuple(w.shape)}, planned {self.shapes[name]}")
        return w

    def _tied_head(self) -> torch.Tensor:
        """lm_head of a tied base, as peft leaves it: it shares embed_tokens (and its LoRA updates) until an
        adapter gives either one a modules_to_save copy of its own."""
        w = self.base.get(EMBED).to(torch.float32, copy=True)
        shared = True
        for i, lay in enumerate(self.adapters):
            if shared and EMBED in lay.copies:
                shared = False  # embed_tokens got its own copy; the head keeps the shared weight
            if shared and (EMBED in lay.replace or EMBED in lay.pairs):
                w = self._apply(i, EMBED, w)
            if HEAD in lay.replace or HEAD in lay.pairs:
                shared = False
                w = self._apply(i, HEAD, w)
        return w


def plain(base: Checkpoint) -> MergedTensors:
    """A checkpoint seen through the same interface, with no adapter."""
    shapes = dict(base.shapes)
    return MergedTensors(base, [], shapes, tied=base.tied)
