"""The ``vllm`` backend: jobs run in vLLM's own engine (``AsyncLLMEngine``), paged KV cache and all.

One engine serves every consumer: ``zhtune generate`` and eval submit many jobs at once, the server submits
them as clients come, chat one at a time; vLLM batches whatever is running. The engine lives on an asyncio
loop in a thread of its own (its model runs in vLLM's engine-core process).

Prompts go in as token ids from zhtune's encoder (``TokensPrompt``), so every backend sees the same prompt
with the template saved with the model. Token ids come back (vLLM is not asked to detokenize) and the job
decodes them and applies stop strings exactly as for the other backends. Replies end at the engine's stop
tokens (the template's end-of-turn and the tokenizer's eos, as the transformers backends do; vLLM is told not
to add the model's own eos). A job its consumer cancels (a client that went away, a stop string) cancels its
request task, which aborts the request in vLLM and frees its KV blocks.

Sampling runs in vLLM's sampler: greedy at temperature 0, else temperature, top-k and top-p, with the
repetition penalty and a per-request seed, after the UTF-8 guard the transformers backends apply
(:mod:`zhtune.infer.vllm_utf8`: tokens that would break a character are masked), so every backend writes the
same greedy replies. Beam search is refused with a pointer to ``--backend generate``.
On a CPU the KV cache gets ``--kv_cache_tokens`` (16384 by default, as continuous batching) instead of a
share of all memory, and the model runs eagerly (no compile at start).

vLLM's engine-core process does not end with ours: only :meth:`VllmBackend.close` ends it. So close() also
runs at exit, and SIGTERM or SIGHUP (where nothing else handles them) end the process through SystemExit,
which runs the callers' ``finally`` blocks and the exit hooks, instead of killing it on the spot.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import signal
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from zhtune.config.args import GenerationArgs
from zhtune.deps import require
from zhtune.errors import ConfigError
from zhtune.infer.stream import Job
from zhtune.infer.vllm_model import VllmModel

log = logging.getLogger(__name__)
CPU_KV_TOKENS = 16384
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM's CPU attention kernels
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SPARE_TOKENS = 256  # vLLM keeps one block of the cache (at most 256 tokens) for itself


def head_size(config: Any) -> int:
    c = config.get_text_config()
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def kv_bytes_per_token(config: Any, dtype: str) -> int:
    """Bytes of K and V cache one token takes in every layer."""
    c = config.get_text_config()
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_size(config) * DTYPE_BYTES.get(dtype, 4)


def engine_args(
    model: VllmModel, config: Any, *, max_batch_size: int, kv_cache_tokens: int | None, on_cpu: bool
) -> dict[str, Any]:
    """Keyword arguments of vLLM's ``AsyncEngineArgs`` for this model and engine settings."""
    context = getattr(config.get_text_config(), "max_position_embeddings", None) or 2048
    kw: dict[str, Any] = dict(
        model=model.path,
        dtype=model.dtype,
        trust_remote_code=model.trust_remote_code,
        download_dir=model.download_dir,
        max_num_seqs=max_batch_size,
        skip_tokenizer_init=True,  # token ids in and out: zhtune encodes and decodes
        generation_config="vllm",  # sampling settings come with each request, not from the model's file
        distributed_executor_backend="uni",  # one device: the model runs in the engine-core process
        enforce_eager=on_cpu,
        disable_log_stats=True,
    )
    tokens = kv_cache_tokens or (CPU_KV_TOKENS if on_cpu else None)
    if tokens:
        kw["kv_cache_memory_bytes"] = (tokens + SPARE_TOKENS) * kv_bytes_per_token(config, model.dtype)
        context = min(context, tokens)
    kw["max_model_len"] = context
    if model.lora:
        kw.update(enable_lora=True, max_loras=1, max_lora_rank=model.max_lora_rank)
    return kw


def sampling_params(job: Job, utf8_tables: str | None = None) -> Any:
    """vLLM's SamplingParams for a job: its settings, its stop tokens, token deltas out; ``utf8_tables``: the
    UTF-8 guard's tables (:func:`zhtune.infer.vllm_utf8.save_tables`) for the logits processor."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    g: GenerationArgs = job.params
    greedy = not (g.do_sample and g.temperature > 0)
    return SamplingParams(
        max_tokens=job.max_new_tokens,
        temperature=0.0 if greedy else float(g.temperature),
        top_p=1.0 if greedy else float(g.top_p),
        top_k=0 if greedy or not g.top_k or g.top_k < 0 else int(g.top_k),
        repetition_penalty=float(g.repetition_penalty),
        seed=g.seed,
        stop_token_ids=sorted(job.stop_ids),
        ignore_eos=True,  # stop where the other backends stop: at the engine's stop tokens only
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
        extra_args={"zhtune_utf8_tables": utf8_tables} if utf8_tables else None,
    )


def _exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def exit_on_signals() -> dict[int, Any]:
    """SIGTERM and SIGHUP raise SystemExit where they would kill the process; returns what was replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    replaced = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            replaced[sig] = signal.signal(sig, _exit)
    return replaced


def restore_signals(replaced: dict[int, Any]) -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, before in replaced.items():
        if signal.getsignal(sig) is _exit:
            signal.signal(sig, before)


class VllmBackend:
    """vLLM's AsyncLLMEngine on an event loop thread; jobs become its requests."""

    name = "vllm"

    def __init__(
        self,
        model: VllmModel,
        config: Any,
        stop_ids: Sequence[int],
        *,
        tokenizer: Any = None,
        max_batch_size: int = 32,
        kv_cache_tokens: int | None = None,
    ):
        """``tokenizer``: the served tokenizer, whose token bytes the UTF-8 guard reads (None: no guard)."""
        require("vllm", "--backend vllm")
        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if on_cpu and head_size(config) not in CPU_HEAD_SIZES:
            raise ConfigError(
                f"{model.path}: attention head size {head_size(config)}; vLLM's CPU kernels take "
                f"{', '.join(map(str, CPU_HEAD_SIZES))}. Use another backend (--backend continuous) for this model"
            )
        kw = engine_args(
            model, config, max_batch_size=max_batch_size, kv_cache_tokens=kv_cache_tokens, on_cpu=on_cpu
        )
        self.capacity_tokens: int = kw["max_model_len"]
        self.stop_ids = list(stop_ids)
        self._tmp = tempfile.TemporaryDirectory(prefix="zhtune-vllm-")
        self.utf8_tables = self._utf8_tables(tokenizer)
        if self.utf8_tables:
            from zhtune.infer.vllm_utf8 import FQCN

            kw["logits_processors"] = [FQCN]
        self._lora = None
        if model.lora:
            from vllm.lora.request import LoRARequest

            self._lora = LoRARequest("adapter", 1, model.lora)
        self._lock = threading.Lock()
        self._running: dict[str, tuple[Job, Future]] = {}
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="zhtune-vllm", daemon=True)
        self._thread.start()
        self._signals = exit_on_signals()
        log.info(
            "starting vLLM on %s: context %d tokens, KV cache %s",
            model.path,
            self.capacity_tokens,
            f"{kw['kv_cache_memory_bytes'] / 2**20:.0f} MiB"
            if "kv_cache_memory_bytes" in kw
            else "vLLM's choice",
        )
        try:
            self.engine = self._call(self._create(AsyncEngineArgs(**kw)))
        except BaseException:
            restore_signals(self._signals)
            self._stop_loop()
            self._tmp.cleanup()
            raise
        atexit.register(self.close)

    def _utf8_tables(self, tokenizer: Any) -> str | None:
        if tokenizer is None:
            return None
        from zhtune.infer.utf8 import Utf8Guard
        from zhtune.infer.vllm_utf8 import save_tables

        guard = Utf8Guard.for_tokenizer(tokenizer, always=self.stop_ids)
        return save_tables(guard, self._tmp.name) if guard is not None else None

    @staticmethod
    async def _create(args: Any) -> Any:
        from vllm import AsyncLLMEngine

        return AsyncLLMEngine.from_engine_args(args)  # inside the loop: its output handler runs there

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @staticmethod
    def unsupported(g: GenerationArgs) -> str | None:
        if g.num_beams > 1:
            return (
                "num_beams > 1 is not available with the vllm backend; start the engine with --backend generate "
                "to use it"
            )
        return None

    def submit(self, job: Job) -> None:
        if self._closed or self.engine.errored:
            raise RuntimeError("the vLLM engine has stopped; restart the server")
        job.on_cancel = self._cancel
        with self._lock:  # held until the entry exists, so the request's own cleanup finds it
            fut = asyncio.run_coroutine_threadsafe(self._run(job), self._loop)
            self._running[job.id] = (job, fut)

    def _cancel(self, job: Job) -> None:
        with self._lock:
            entry = self._running.pop(job.id, None)
        if entry is not None:
            entry[1].cancel()  # cancels the request's task; vLLM aborts the request

    def pending(self) -> int:
        with self._lock:
            return len(self._running)

    async def _run(self, job: Job) -> None:
        from vllm import TokensPrompt

        try:
            reason = None
            prompt = TokensPrompt(prompt_token_ids=job.prompt_ids)
            async for out in self.engine.generate(
                prompt, sampling_params(job, self.utf8_tables), request_id=job.id, lora_request=self._lora
            ):
                done = out.outputs[0]
                if done.token_ids:
                    job.add_tokens(list(done.token_ids))
                reason = done.finish_reason
            job.close(error=None if reason in ("stop", "length") else f"vLLM ended the request ({reason})")
        except asyncio.CancelledError:
            job.close()
            raise
        except Exception as e:  # noqa: BLE001 - reported to the job's consumer
            log.exception("generation failed")
            job.close(error=f"{type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._running.pop(job.id, None)

    async def _shutdown(self) -> None:
        self.engine.shutdown()
        self.engine = None  # shut down now, not again by its finaliser at interpreter exit

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        restore_signals(self._signals)
        with self._lock:
            running, self._running = list(self._running.values()), {}
        for job, fut in running:
            fut.cancel()
            job.close(error="the engine was shut down")
        try:
            self._call(self._shutdown(), timeout=60)
        except Exception as e:  # noqa: BLE001 - shutting down anyway
            log.warning("vLLM did not shut down cleanly: %s", e)
        self._stop_loop()
        self._tmp.cleanup()
