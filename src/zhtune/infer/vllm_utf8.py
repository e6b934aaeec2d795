"""The UTF-8 guard of :mod:`zhtune.infer.utf8` inside vLLM's sampler, as a vLLM logits processor.

vLLM builds its logits processors in its engine-core process from a class name, with no arguments of ours,
so the guard's tables travel as a file: :func:`save_tables` writes them (safetensors, in a folder the backend
owns) and each request names that file in ``SamplingParams.extra_args[KEY]``. :class:`Utf8LogitsProcessor`
loads a file once, tracks which rows of vLLM's persistent batch hold guarded requests (added, removed and
moved as vLLM reports them), and before each token masks, per guarded row, the tokens that cannot validly
follow the reply's last bytes: the same tables and the same state (the last three tokens, the prompt's
included) as the transformers backends, so greedy replies are the same token for token. Requests without
the key are left alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from zhtune.infer.utf8 import LOOKBACK, Utf8Guard

KEY = "zhtune_utf8_tables"
FQCN = "zhtune.infer.vllm_utf8:Utf8LogitsProcessor"


def save_tables(guard: Utf8Guard, folder: str | Path) -> str:
    """The guard's tables in ``folder``/utf8_tables.safetensors (written to a temporary name, then renamed)."""
    from safetensors.torch import save_file

    path = Path(folder) / "utf8_tables.safetensors"
    tmp = path.with_name(".tmp-" + path.name)
    save_file({"allowed": guard.allowed.to(torch.uint8), "nxt": guard.nxt.to(torch.int32)}, str(tmp))
    tmp.replace(path)
    return str(path)


def load_tables(path: str) -> Utf8Guard:
    from safetensors.torch import load_file

    t = load_file(path)
    return Utf8Guard(t["allowed"].bool(), t["nxt"].long())


def __getattr__(name: str) -> Any:
    """``Utf8LogitsProcessor`` is made on first use, so this module imports without vLLM (only its engine
    core, which has vLLM, asks for the class)."""
    if name == "Utf8LogitsProcessor":
        cls = _processor_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def _processor_class() -> type:
    from vllm.v1.sample.logits_processor import LogitsProcessor

    return type("Utf8LogitsProcessor", (_Utf8Masking, LogitsProcessor), {"__module__": __name__})


class _Utf8Masking:
    """Masks, in the rows of requests that ask for it, the tokens that would break a UTF-8 character."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.guards: dict[str, Utf8Guard] = {}  # tables file -> guard
        self.rows: dict[
            int, tuple[list[int], list[int], str]
        ] = {}  # batch row -> (prompt tail, output, file)

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token is likeliest

    def _guard(self, path: str) -> Utf8Guard:
        if path not in self.guards:
            self.guards[path] = load_tables(path)
        return self.guards[path]

    def update_state(self, batch_update: Any) -> None:
        from vllm.v1.sample.logits_processor import MoveDirectionality

        if batch_update is None:
            return
        for index in batch_update.removed:  # in the order vLLM documents: removed, added, moved
            self.rows.pop(index, None)
        for index, params, prompt, output in batch_update.added:
            path = (getattr(params, "extra_args", None) or {}).get(KEY)
            if path:
                self._guard(path)
                self.rows[index] = (list(prompt or [])[-LOOKBACK:], output, path)
            else:
                self.rows.pop(index, None)
        for a, b, kind in batch_update.moved:
            ea, eb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ea is not None:
                self.rows[b] = ea
            if eb is not None and kind == MoveDirectionality.SWAP:
                self.rows[a] = eb

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        by_path: dict[str, tuple[list[int], list[int]]] = {}
        for index, (prompt, output, path) in self.rows.items():
            if index < logits.shape[0]:  # the output is vLLM's live list of this request's tokens
                rows, states = by_path.setdefault(path, ([], []))
                rows.append(index)
                states.append(self.guards[path].host_state(prompt, output))
        for path, (rows, states) in by_path.items():
            idx = torch.tensor(rows, device=logits.device)
            logits[idx] = self.guards[path].mask(logits[idx], torch.tensor(states, device=logits.device))
        return logits
