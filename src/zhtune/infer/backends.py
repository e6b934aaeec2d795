"""The engines that run jobs: transformers ``generate`` and transformers continuous batching.

* ``generate``: one worker thread calls ``model.generate`` for one job at a time, or for a padded batch of
  jobs with equal settings (``zhtune generate``). Supports everything ``generate`` does: beam search,
  repetition penalty, a seed per request, and on CUDA a static cache with compiled decoding.
* ``continuous``: ``model.init_continuous_batching()`` (transformers 5): a paged KV cache and a scheduler
  that adds and retires requests between decoding steps, with per-request temperature, top-k and top-p.
  It samples from one shared generator and has no repetition penalty or beam search, so requests asking
  for those are refused with a message naming the ``generate`` backend.

Both report tokens into :class:`zhtune.infer.stream.Job` objects and stop a job when its consumer cancels.
Both mask tokens that would break a UTF-8 character (:mod:`zhtune.infer.utf8`; continuous batching through a
per-request processor, :mod:`zhtune.infer.utf8_continuous`, except with asynchronous batching, where the
detokenizer's holding back of an unfinished last character is the only guard).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from zhtune.config.args import GenerationArgs
from zhtune.infer.stream import Job
from zhtune.infer.utf8 import Utf8Guard

log = logging.getLogger(__name__)


def sampling(g: GenerationArgs) -> dict[str, Any]:
    """generate() keyword arguments for the sampling settings (temperature 0 means greedy)."""
    if g.do_sample and g.temperature > 0:
        return dict(do_sample=True, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k or None)
    return dict(do_sample=False, temperature=None, top_p=None, top_k=None)


class GenerateBackend:
    """transformers ``generate`` in a worker thread; jobs with equal settings may share a padded batch."""

    name = "generate"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        stop_ids: Sequence[int],
        *,
        max_batch_size: int = 1,
        static_cache: bool = False,
    ):
        self.model, self.tok, self.stop_ids = model, tokenizer, list(stop_ids)
        self.max_batch_size = max_batch_size
        self.static_cache = static_cache
        self.device = next(model.parameters()).device
        self.guard = Utf8Guard.for_tokenizer(tokenizer, always=stop_ids)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._held: list[Job] = []  # taken from the queue but waiting for a batch with their settings
        self._thread = threading.Thread(target=self._work, name="zhtune-generate", daemon=True)
        self._thread.start()

    @staticmethod
    def unsupported(g: GenerationArgs) -> str | None:
        return None

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def pending(self) -> int:
        return self._queue.qsize() + len(self._held)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    @staticmethod
    def _key(job: Job) -> tuple:
        g = job.params
        return (
            tuple(sorted(sampling(g).items(), key=str)),
            g.repetition_penalty,
            g.num_beams,
            g.seed,
            job.max_new_tokens,
        )

    def _next_batch(self) -> list[Job] | None:
        first = self._held.pop(0) if self._held else self._queue.get()
        if first is None:
            return None
        batch = [first]
        key = self._key(first)
        rest = []
        for job in self._held:
            (batch if key == self._key(job) and len(batch) < self.max_batch_size else rest).append(job)
        self._held = rest
        while len(batch) < self.max_batch_size:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)
                break
            (batch if self._key(job) == key else self._held).append(job)
        return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            batch = [j for j in batch if j.wants_more()]
            if not batch:
                continue
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 - reported to every consumer of the batch
                log.exception("generation failed")
                for job in batch:
                    job.close(error=f"{type(e).__name__}: {e}")

    def _run(self, jobs: list[Job]) -> None:
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        g: GenerationArgs = jobs[0].params
        width = max(len(j.prompt_ids) for j in jobs)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.stop_ids[0]
        ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs])
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs])
        stop_ids = set(self.stop_ids)

        class Rows(BaseStreamer):
            """Hands each row's new token to its job; the first call carries the prompt."""

            def __init__(self) -> None:
                self.prompt_seen = False
                self.ended = [False] * len(jobs)

            def put(self, value: torch.Tensor) -> None:
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                for i, t in enumerate(value.reshape(-1).tolist()):
                    if not self.ended[i]:
                        jobs[i].add_tokens([t])
                        self.ended[i] = t in stop_ids

            def end(self) -> None:
                pass

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
                flags = [not j.wants_more() for j in jobs] if len(jobs) == input_ids.shape[0] else [False]
                if len(flags) != input_ids.shape[0]:  # beam search: one flag for all rows
                    flags = [all(not j.wants_more() for j in jobs)] * input_ids.shape[0]
                return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)

        beams = g.num_beams > 1
        kw: dict[str, Any] = dict(
            max_new_tokens=jobs[0].max_new_tokens,
            num_beams=g.num_beams,
            repetition_penalty=g.repetition_penalty,
            eos_token_id=self.stop_ids or None,
            pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList([Cancelled()]),
            **sampling(g),
        )
        if self.guard is not None:
            kw["logits_processor"] = LogitsProcessorList([self.guard])
        if not beams:
            kw["streamer"] = Rows()
        if self.static_cache and self.device.type == "cuda":
            kw["cache_implementation"] = "static"
        if g.seed is not None:
            torch.manual_seed(g.seed)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kw
            )
        for i, job in enumerate(jobs):
            if beams:
                job.set_tokens(out[i, width:].tolist(), finished=True)
            else:
                job.close()


class ContinuousBackend:
    """transformers continuous batching: a paged KV cache shared by all running requests."""

    name = "continuous"
    # sampling processors are created once; each request then sets its own values
    BASE = dict(temperature=0.7, top_k=50, top_p=0.9)

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        stop_ids: Sequence[int],
        *,
        max_batch_size: int = 32,
        kv_cache_tokens: int | None = None,
        block_size: int | None = None,
        cuda_graphs: bool | None = None,
        compile_level: int = 0,
        seed: int | None = None,
        options: dict[str, Any] | None = None,
    ):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.model, self.tok, self.stop_ids = model, tokenizer, list(stop_ids)
        self.vocab = model.config.get_text_config().vocab_size
        on_gpu = model.device.type == "cuda"
        if not on_gpu:  # transformers sizes the cache from free GPU memory; on a CPU that would be all RAM
            block_size = block_size or 64
            kv_cache_tokens = kv_cache_tokens or 16384
        cb: dict[str, Any] = dict(
            per_request_processors=True,
            max_requests_per_batch=max_batch_size,
            seed=seed,
            default_compile_level=compile_level,
        )
        if block_size:
            cb["block_size"] = block_size
        if kv_cache_tokens:
            cb["num_blocks"] = math.ceil(kv_cache_tokens / cb.get("block_size", 256))
        if not on_gpu:
            cb["max_batch_tokens"] = 512
        if cuda_graphs is None and on_gpu:
            # measured on an H100, 7B-shaped, 32 requests at once (bench/decode_gpu.py): graphs with the KV
            # padding below 744 tok/s in process and 922-979 through zhtune serve, transformers' own choice
            # 269 through zhtune serve; asynchronous batching added nothing with the UTF-8 guard on (744.4)
            cuda_graphs = True
        if cuda_graphs is not None:
            cb["use_cuda_graph"] = cuda_graphs
        if cuda_graphs and on_gpu:
            # graphs are captured per padded size; transformers pads the KV read to 16384 tokens by default,
            # which makes every decoding step of a short conversation read 16384 tokens of cache
            cb["kv_padding_interval_size"] = 1024
        cb.update(options or {})
        gen = GenerationConfig(
            do_sample=True,
            **self.BASE,
            eos_token_id=self.stop_ids,
            pad_token_id=tokenizer.pad_token_id,
            max_new_tokens=256,
        )
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self.manager = model.init_continuous_batching(
            generation_config=gen, continuous_batching_config=ContinuousBatchingConfig(**cb)
        )
        from zhtune.infer.utf8_continuous import install

        self.utf8_guard = install(self.manager, Utf8Guard.for_tokenizer(tokenizer, always=self.stop_ids))
        if on_gpu and (cuda_graphs or compile_level):
            self.manager.warmup()
        self.manager.start()
        self._stopping = False
        self._router = threading.Thread(target=self._route, name="zhtune-cb-router", daemon=True)
        self._router.start()

    @property
    def capacity_tokens(self) -> int | None:
        """KV cache size in tokens, once the cache exists; a request must fit in it."""
        cfg = self.manager.continuous_batching_config
        if cfg.num_blocks:
            return int(cfg.num_blocks * cfg.block_size)
        return None

    @staticmethod
    def unsupported(g: GenerationArgs) -> str | None:
        what = []
        if g.num_beams > 1:
            what.append("num_beams > 1")
        if g.repetition_penalty != 1.0:
            what.append("repetition_penalty != 1")
        if g.seed is not None:
            what.append("a per-request seed")
        if what:
            return (
                f"{' and '.join(what)} is not available with continuous batching; start the engine with "
                "--backend generate to use it"
            )
        return None

    def _kwargs(self, g: GenerationArgs) -> dict[str, Any]:
        if g.do_sample and g.temperature > 0:
            top_k = g.top_k if g.top_k and g.top_k > 0 else self.vocab
            return dict(
                temperature=float(g.temperature), top_k=int(min(top_k, self.vocab)), top_p=float(g.top_p)
            )
        return dict(temperature=1.0, top_k=1, top_p=1.0)  # greedy: sample among the single best token

    def submit(self, job: Job) -> None:
        if not self.manager.is_running():
            raise RuntimeError("the continuous batching engine has stopped; restart the server")
        with self._lock:
            self._jobs[job.id] = job
        job.on_cancel = self._cancel
        self.manager.add_request(
            job.prompt_ids,
            request_id=job.id,
            max_new_tokens=job.max_new_tokens,
            streaming=True,
            eos_token_id=self.stop_ids,
            **self._kwargs(job.params),
        )

    def _cancel(self, job: Job) -> None:
        with self._lock:
            known = self._jobs.pop(job.id, None)
        if known is not None:
            self.manager.cancel_request(job.id)

    def pending(self) -> int:
        with self._lock:
            return len(self._jobs)

    def _route(self) -> None:
        """Deliver the manager's outputs to their jobs; fail all jobs if the manager dies."""
        while not self._stopping:
            out = self.manager.get_result(timeout=0.1)
            if out is None:
                if not self.manager.is_running() and not self._stopping:
                    err = self.manager.background_thread_status.fatal_error
                    with self._lock:
                        jobs, self._jobs = list(self._jobs.values()), {}
                    for job in jobs:
                        job.close(error=f"generation engine stopped: {err}")
                    if err is not None:
                        log.error("continuous batching stopped: %s", err)
                        return
                    time.sleep(0.1)
                continue
            with self._lock:
                job = self._jobs.get(out.request_id)
                if job is not None and (out.is_finished() or out.error):
                    self._jobs.pop(out.request_id, None)
            if job is not None:
                job.set_tokens(out.generated_tokens, finished=out.is_finished(), error=out.error)

    def close(self) -> None:
        self._stopping = True
        self.manager.stop(block=True, timeout=30)
        self._router.join(timeout=5)
        with self._lock:
            jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            job.close(error="the engine was shut down")
