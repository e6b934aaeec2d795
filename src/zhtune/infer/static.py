"""The ``static`` backend: one request at a time with the lowest latency per token.

A transformers ``StaticCache`` keeps every tensor at a fixed address, so the one-token decoding step can be
compiled whole with ``torch.compile(mode="reduce-overhead")`` and replayed as a CUDA graph. The host never
waits for the step it just queued: it copies the previous token out (pinned memory, an event) while the GPU
runs the next step, so decoding runs at the speed of the GPU rather than of the Python loop. Stops are
therefore seen one step late; the extra step's token is discarded.

Caches are sized in powers of two (at least 256 tokens) to what a request needs, so attention reads only
that much, and each size compiles once. Sampling (temperature, top-k, top-p, a per-request seed) runs on the
device after the step, after the UTF-8 guard (:mod:`zhtune.infer.utf8`) has masked the tokens that would
break a character; repetition penalty and beam search are left to the ``generate`` backend.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from typing import Any

import torch

from zhtune.config.args import GenerationArgs
from zhtune.infer.stream import Job
from zhtune.infer.utf8 import LOOKBACK, Utf8Guard

log = logging.getLogger(__name__)
MIN_CACHE = 256


def pick(logits: torch.Tensor, g: GenerationArgs) -> torch.Tensor:
    """Next token ids [batch] from logits [batch, vocab]: greedy, or sampled with temperature/top-k/top-p."""
    if not (g.do_sample and g.temperature > 0):
        return logits.argmax(-1)
    logits = logits.float() / g.temperature
    if g.top_k and g.top_k < logits.shape[-1]:
        kth = torch.topk(logits, g.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if g.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > g.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1)[:, 0]


class StaticBackend:
    """Single-stream decoding over a static KV cache; on CUDA with ``compile`` the step is a CUDA graph."""

    name = "static"

    def __init__(
        self, model: Any, tokenizer: Any, stop_ids: Sequence[int], *, context: int, compile: bool = False
    ):
        self.model, self.tok, self.stop_ids = model, tokenizer, set(stop_ids)
        self.context = context
        self.device = next(model.parameters()).device
        self.guard = Utf8Guard.for_tokenizer(tokenizer, always=stop_ids)
        self.compiled = compile and self.device.type == "cuda"
        self.step = (
            torch.compile(self._forward, mode="reduce-overhead", fullgraph=False, dynamic=False)
            if self.compiled
            else self._forward
        )
        self._caches: dict[int, Any] = {}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="zhtune-static", daemon=True)
        self._thread.start()

    @staticmethod
    def unsupported(g: GenerationArgs) -> str | None:
        what = [
            w
            for w, bad in (
                ("num_beams > 1", g.num_beams > 1),
                ("repetition_penalty != 1", g.repetition_penalty != 1.0),
            )
            if bad
        ]
        if what:
            return f"{' and '.join(what)} is not available with the static backend; use --backend generate"
        return None

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def pending(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, cache: Any) -> torch.Tensor:
        out = self.model(
            input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1
        )
        return out.logits[:, -1, :]

    def _guarded(self, recent: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.guard is None else self.guard(recent, logits)

    def _cache(self, need: int) -> Any:
        from transformers import StaticCache

        size = MIN_CACHE
        while size < need:
            size *= 2
        size = min(size, max(self.context, need))
        if size not in self._caches:
            self._caches[size] = StaticCache(config=self.model.config, max_cache_len=size)
        cache = self._caches[size]
        cache.reset()
        return cache

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not job.wants_more():
                continue
            try:
                with torch.no_grad():  # as transformers' generate: compiled graphs and no_grad go together
                    self._run(job)
                job.close()
            except Exception as e:  # noqa: BLE001 - reported to the job's consumer
                log.exception("generation failed")
                job.close(error=f"{type(e).__name__}: {e}")

    def _run(self, job: Job) -> None:
        g: GenerationArgs = job.params
        n = len(job.prompt_ids)
        cache = self._cache(n + job.max_new_tokens)
        if g.seed is not None:
            torch.manual_seed(g.seed)
        ids = torch.tensor([job.prompt_ids], device=self.device)
        logits = self._forward(ids, torch.arange(n, device=self.device)[None], cache)  # prefill, not compiled
        recent = ids[:, -LOOKBACK:]  # the last tokens, for the UTF-8 guard
        tok = pick(self._guarded(recent, logits), g)
        pos = torch.tensor([[n]], device=self.device)
        on_gpu = self.device.type == "cuda"
        host = torch.empty(1, dtype=torch.long, pin_memory=on_gpu)
        copied = torch.cuda.Event() if on_gpu else None
        produced = 0
        while True:
            host.copy_(tok, non_blocking=on_gpu)
            if copied is not None:
                copied.record()
            last = produced + 1 >= job.max_new_tokens
            if not last:  # queue the next step before reading this token back
                if self.compiled:
                    torch.compiler.cudagraph_mark_step_begin()
                recent = torch.cat([recent, tok.view(1, 1)], dim=1)[:, -LOOKBACK:]
                nxt = pick(self._guarded(recent, self.step(tok.view(1, 1), pos, cache)), g)
                pos = pos + 1
            if copied is not None:
                copied.synchronize()
            t = int(host[0])
            produced += 1
            job.add_tokens([t])
            if last or t in self.stop_ids or not job.wants_more():
                return
            tok = nxt
