"""The OpenAI API shapes the server speaks: request bodies (validated by pydantic, published in the OpenAPI
schema), response and stream-chunk builders, and error objects with their status codes.

Fields OpenAI defines but zhtune cannot honour (``n`` > 1, logprobs, penalties other than 0, ``suffix``) are
refused with a 400 naming the field rather than silently ignored. ``top_k``, ``repetition_penalty`` and
``num_beams`` are accepted as extensions, as vLLM does.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from zhtune.deps import require

require("fastapi", "zhtune serve")  # the serve extra; a clear message instead of a bare ImportError

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error returned to the client as ``{"error": {...}}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Settings shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate (default: what the context leaves)."
    )
    temperature: float | None = Field(
        None, ge=0, le=2, description="Sampling temperature; 0 is greedy. Default 1."
    )
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass. Default 1.")
    n: int = Field(1, ge=1, description="Choices per prompt; only 1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end the reply.")
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: bool | int | None = None
    user: str | None = None
    top_k: int | None = Field(None, ge=0, description="Extension: sample among the k most likely tokens.")
    repetition_penalty: float | None = Field(None, gt=0, description="Extension: HF repetition penalty.")
    num_beams: int | None = Field(None, ge=1, description="Extension: beam search width (generate backend).")

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop sequences are allowed", param="stop")
        return [s for s in stops if s]

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        if self.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(
                    400,
                    f"{name} is not supported; use repetition_penalty (with --backend generate)",
                    param=name,
                )


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name for max_tokens.")


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt is empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class ChatShape:
    """The bodies of one chat completion: a ``chat.completion``, or the ``chat.completion.chunk`` events."""

    def __init__(self, model: str):
        self.id, self.model, self.created = new_id("chatcmpl"), model, int(time.time())

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def opening(self) -> list[dict[str, Any]]:
        """Events before the first token: the assistant's role."""
        return [self.chunk({"role": "assistant", "content": ""})]

    def delta(self, index: int, piece: str) -> dict[str, Any]:
        return self.chunk({"content": piece})

    def finish(self, index: int, reason: str) -> dict[str, Any]:
        return self.chunk({}, reason)

    def usage(self, prompt: int, completion: int) -> dict[str, Any]:
        """The last event when the client asked for ``stream_options.include_usage``: no choices, the usage."""
        end = self.chunk({})
        end["choices"], end["usage"] = [], usage(prompt, completion)
        return end

    def body(self, texts: list[str], finishes: list[str], prompt: int, completion: int) -> dict[str, Any]:
        """The whole reply, without streaming."""
        message = {"role": "assistant", "content": texts[0]}
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finishes[0]}],
            "usage": usage(prompt, completion),
        }


class CompletionShape:
    """The bodies of a text completion (one choice per prompt); ``echo``: the prompts' text, to repeat first."""

    def __init__(self, model: str, echo: list[str] | None = None):
        self.id, self.model, self.created = new_id("cmpl"), model, int(time.time())
        self.echo = echo

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    @staticmethod
    def choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    def opening(self) -> list[dict[str, Any]]:
        """Events before the first token: the echoed prompts."""
        return [self.chunk([self.choice(i, t, None)]) for i, t in enumerate(self.echo or [])]

    def delta(self, index: int, piece: str) -> dict[str, Any]:
        return self.chunk([self.choice(index, piece, None)])

    def finish(self, index: int, reason: str) -> dict[str, Any]:
        return self.chunk([self.choice(index, "", reason)])

    def usage(self, prompt: int, completion: int) -> dict[str, Any]:
        return {**self.chunk([]), "usage": usage(prompt, completion)}

    def body(self, texts: list[str], finishes: list[str], prompt: int, completion: int) -> dict[str, Any]:
        echo = self.echo or [""] * len(texts)
        choices = [self.choice(i, echo[i] + t, f) for i, (t, f) in enumerate(zip(texts, finishes))]
        return {**self.chunk(choices), "usage": usage(prompt, completion)}


Shape = ChatShape | CompletionShape
