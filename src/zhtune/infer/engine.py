"""One generation engine: a model (plus adapters), its chat format, and streaming generation that stops.

Prompts are built by the same segment encoder that built the training labels, so a model sees at inference
exactly the token layout it was trained on. Generation stops at the template's end-of-turn strings and the
tokenizer's eos, whether they are single special tokens or plain text.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zhtune.config.args import GenerationArgs, ModelArgs
from zhtune.data.encode import SegmentEncoder
from zhtune.data.templates import ChatFormat, Message, get_format


class StopFlag:
    """A flag another thread (or a Ctrl-C handler) sets to end the current generation early."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


@dataclass
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length | cancelled


class Engine:
    def __init__(self, model: Any, tokenizer: Any, fmt: ChatFormat):
        self.model = model.eval()
        self.tok = tokenizer
        self.fmt = fmt
        self.enc = SegmentEncoder(tokenizer)
        self.device = next(model.parameters()).device
        self.stop_strings = fmt.stop_strings()
        ids: list[int] = []
        for s in self.stop_strings:
            t = tokenizer.convert_tokens_to_ids(s) if s in tokenizer.get_vocab() else None
            if isinstance(t, int) and t != tokenizer.unk_token_id:
                ids.append(t)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        self.stop_ids = sorted(set(ids))

    @classmethod
    def load(
        cls,
        margs: ModelArgs,
        lora_models: Sequence[str] = (),
        template: str | None = None,
    ) -> Engine:
        from zhtune.model.adapters import apply_adapters
        from zhtune.model.loader import load_model, load_tokenizer, resolve

        src = resolve(margs.model_name_or_path, margs.gguf_file, margs.cache_dir)
        # the newest adapter's tokenizer carries the vocabulary and chat template it was trained with
        tok_dir = margs.tokenizer_name_or_path
        if tok_dir is None and lora_models and (Path(lora_models[-1]) / "tokenizer_config.json").is_file():
            tok_dir = lora_models[-1]
        if tok_dir:
            margs = ModelArgs(**{**margs.__dict__, "tokenizer_name_or_path": tok_dir})
        tok = load_tokenizer(margs, src, padding_side="left")
        model = load_model(margs, src)
        if lora_models:
            model = apply_adapters(model, list(lora_models), merge=len(lora_models) > 1)
        fmt = get_format(tok, template, directory=tok_dir or src.path)
        return cls(model, tok, fmt)

    def prompt_ids(self, messages: Sequence[Message], with_template: bool = True) -> list[int]:
        if not with_template:
            text = "\n".join(m["content"] for m in messages if m["role"] != "system")
            return self.enc.encode(text, first=True)
        return self.enc.prompt_ids(self.fmt, messages)

    def _gen_kwargs(self, g: GenerationArgs) -> dict[str, Any]:
        kw: dict[str, Any] = dict(
            max_new_tokens=g.max_new_tokens,
            do_sample=bool(g.do_sample),
            num_beams=g.num_beams,
            repetition_penalty=g.repetition_penalty,
            eos_token_id=self.stop_ids or None,
            pad_token_id=self.tok.pad_token_id,
        )
        if g.do_sample:
            kw.update(temperature=max(g.temperature, 1e-5), top_p=g.top_p, top_k=g.top_k)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        extra = [s for s in (g.stop or []) + self.stop_strings if s]
        if extra:
            kw.update(stop_strings=sorted(set(extra)), tokenizer=self.tok)
        return kw

    def stream(
        self,
        messages: Sequence[Message],
        g: GenerationArgs,
        stop: StopFlag | None = None,
        with_template: bool = True,
        result: dict[str, Any] | None = None,
    ) -> Iterator[str]:
        """Yield text pieces as they are generated; ``result`` receives token counts and finish reason."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        ids = self.prompt_ids(messages, with_template)
        x = torch.tensor([ids], device=self.device)
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=False, timeout=None)
        stop = stop or StopFlag()
        kw = self._gen_kwargs(g)
        out: dict[str, Any] = {}

        def run() -> None:
            if g.seed is not None:
                torch.manual_seed(g.seed)
            try:
                with torch.inference_mode():
                    out["seq"] = self.model.generate(
                        input_ids=x,
                        attention_mask=torch.ones_like(x),
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([stop]),
                        **kw,
                    )
            except BaseException as e:  # noqa: BLE001 - surfaced in the caller's thread
                out["error"] = e
                streamer.end()

        th = threading.Thread(target=run, daemon=True)
        th.start()
        text = ""
        for piece in streamer:
            text += piece
            clean, hit = self._cut_at_stop(text, g)
            emitted = len(text) - len(piece)
            if hit:
                if len(clean) > emitted:
                    yield clean[emitted:]
                stop.event.set()
                break
            yield piece
        th.join()
        if "error" in out:
            raise out["error"]
        seq = out.get("seq")
        n_new = int(seq.shape[1] - x.shape[1]) if seq is not None else 0
        finish = "cancelled" if stop.event.is_set() and not self._cut_at_stop(text, g)[1] else "stop"
        if finish == "stop" and n_new >= g.max_new_tokens and not self._cut_at_stop(text, g)[1]:
            last = int(seq[0, -1]) if seq is not None else None
            finish = "stop" if last in self.stop_ids else "length"
        if result is not None:
            result.update(prompt_tokens=len(ids), completion_tokens=n_new, finish_reason=finish)

    def _cut_at_stop(self, text: str, g: GenerationArgs) -> tuple[str, bool]:
        stops = [s for s in (g.stop or []) + self.stop_strings if s]
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def chat(self, messages: Sequence[Message], g: GenerationArgs, with_template: bool = True) -> Reply:
        info: dict[str, Any] = {}
        text = "".join(self.stream(messages, g, with_template=with_template, result=info))
        return Reply(text.strip(), info["prompt_tokens"], info["completion_tokens"], info["finish_reason"])
