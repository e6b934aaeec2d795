"""Training state without pickle: optimizer, scheduler, gradient scaler and RNG states as safetensors + JSON.

Hugging Face Trainer writes these with ``torch.save`` (``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``,
``rng_state.pth``): pickles, which can run code when loaded. zhtune writes each state as ``<name>.json`` (the
structure, with every non-tensor value: ints, floats, strings, tuples, dict keys of any of those) plus
``<name>.safetensors`` (the tensors the JSON points to). Both round-trip exactly: tensors bit for bit, floats
through their shortest repr, tuples as tuples, so a resumed run continues bitwise where it stopped.

Reading a legacy pickle file needs an explicit ``allow_pickle`` (``--allow_pickle``) and is then done with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from zhtune.errors import ConfigError

FORMAT = "zhtune-state-1"
# the pickle files Hugging Face Trainer would write in a checkpoint, by the state they hold
LEGACY = {
    "optimizer": ("optimizer.pt", "optimizer.bin"),
    "scheduler": ("scheduler.pt",),
    "scaler": ("scaler.pt",),
    "rng_state": ("rng_state.pth",),
}


class StateFormatError(ConfigError):
    """A state file that is missing, malformed, or of a type zhtune does not write."""


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        # safetensors stores contiguous tensors that share no memory: clone every one
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": name}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if type(obj).__module__ == "numpy":
        import numpy as np

        if isinstance(obj, np.ndarray):
            name = f"t{len(tensors)}"
            tensors[name] = torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj.copy())
            return {"__ndarray__": name, "dtype": str(obj.dtype)}
        if isinstance(obj, np.generic):
            return _encode(obj.item(), path, tensors)
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(x, f"{path}[{i}]", tensors) for i, x in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(x, f"{path}[{i}]", tensors) for i, x in enumerate(obj)]
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [_encode(k, f"{path} key", tensors), _encode(v, f"{path}[{k!r}]", tensors)]
                for k, v in obj.items()
            ]
        }
    raise TypeError(f"cannot save {type(obj).__name__} at {path or 'the top level'} without pickle")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(x, tensors) for x in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(_decode(x, tensors) for x in obj["__tuple__"])
    if "__dict__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    raise StateFormatError(f"unknown entry {sorted(obj)[:3]} in a zhtune state file")


def save_state(obj: Any, directory: str | os.PathLike, name: str) -> list[Path]:
    """Write ``obj`` as ``name.json`` (+ ``name.safetensors`` when it holds tensors). Returns the files."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, "", tensors)
    files = []
    if tensors:
        save_file(tensors, str(d / f"{name}.safetensors"), metadata={"format": FORMAT})
        files.append(d / f"{name}.safetensors")
    with open(d / f"{name}.json", "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "tensors": bool(tensors), "state": tree}, f, ensure_ascii=False)
    files.append(d / f"{name}.json")
    return files


def has_state(directory: str | os.PathLike, name: str) -> bool:
    return (Path(directory) / f"{name}.json").is_file()


def load_state(directory: str | os.PathLike, name: str, *, map_location: str = "cpu") -> Any:
    """Read what :func:`save_state` wrote."""
    from safetensors.torch import load_file

    d = Path(directory)
    meta_file = d / f"{name}.json"
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StateFormatError(f"{meta_file} is missing: the checkpoint is incomplete") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateFormatError(f"{meta_file} is not valid JSON ({e}); the checkpoint is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StateFormatError(f"{meta_file} is not a {FORMAT} file")
    tensors: dict[str, torch.Tensor] = {}
    if meta.get("tensors"):
        st = d / f"{name}.safetensors"
        if not st.is_file():
            raise StateFormatError(f"{st} is missing: the checkpoint is incomplete")
        tensors = load_file(str(st), device=map_location)
    try:
        return _decode(meta["state"], tensors)
    except KeyError as e:
        raise StateFormatError(f"{meta_file} names tensor {e} that {name}.safetensors lacks") from None


def legacy_file(directory: str | os.PathLike, name: str) -> Path | None:
    """The pickle file Hugging Face Trainer wrote for this state, if the checkpoint has one."""
    for fname in LEGACY.get(name, ()):
        p = Path(directory) / fname
        if p.is_file():
            return p
    return None


def load_legacy(path: Path, *, allow_pickle: bool, map_location: str = "cpu") -> Any:
    """A pickle state file, read only with ``allow_pickle`` and then as tensors only (weights_only)."""
    if not allow_pickle:
        raise ConfigError(
            f"{path} is a pickle (written by plain transformers or an older zhtune); pass --allow_pickle to "
            "read it with torch.load(weights_only=True), only for checkpoints you trust"
        )
    return torch.load(str(path), map_location=map_location, weights_only=True)


def rng_states(cuda_all: bool) -> dict[str, Any]:
    """The random states a resumed run needs (python, numpy, torch CPU and CUDA)."""
    import random

    import numpy as np

    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = (
            torch.cuda.random.get_rng_state_all() if cuda_all else torch.cuda.random.get_rng_state()
        )
    return states


def set_rng_states(states: dict[str, Any], cuda_all: bool) -> None:
    import random

    import numpy as np

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.random.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        if cuda_all:
            torch.cuda.random.set_rng_state_all(states["cuda"])
        else:
            torch.cuda.random.set_rng_state(states["cuda"])
