"""Token ids and labels from template segments, with exact supervision boundaries.

Each segment is tokenized on its own, so no token ever straddles a prompt/answer boundary and the
supervised ids decode back to exactly the assistant text plus its end-of-turn token. Inference builds
prompts with the same encoder, so what the model sees at generation time is what it was trained on.

A segment after the first is tokenized as a continuation: SentencePiece tokenizers would otherwise
prepend a word-boundary marker to every piece of text. We tokenize ``"\\n" + text`` and drop the ids of
``"\\n"``; when that prefix does not survive intact we fall back to tokenizing the text alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from zhtune.text.templates import ChatFormat, Message, Segment

IGNORE = -100


class SegmentEncoder:
    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self._sentinel = self._ids("\n")

    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def encode(self, text: str, first: bool) -> list[int]:
        if first or not text:
            return self._ids(text)
        ids = self._ids("\n" + text)
        n = len(self._sentinel)
        if ids[:n] == self._sentinel:
            return ids[n:]
        return self._ids(text)

    def encode_segments(self, segs: Sequence[Segment]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        for i, (text, supervised) in enumerate(segs):
            part = self.encode(text, first=(i == 0))
            ids += part
            labels += part if supervised else [IGNORE] * len(part)
        return ids, labels

    def prompt_ids(self, fmt: ChatFormat, messages: Sequence[Message]) -> list[int]:
        """Ids of a conversation ending with a user turn, plus the generation prompt."""
        return self.encode_segments(fmt.segments(messages, add_generation_prompt=True))[0]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    status: str  # ok | turns_dropped | response_truncated | too_long | no_labels


def encode_conversation(
    fmt: ChatFormat, enc: SegmentEncoder, messages: list[Message], max_len: int, truncation: str = "auto"
) -> Encoded:
    """Encode a training conversation; over-long ones lose leading turns, then the tail of the last reply."""
    ids, labels = enc.encode_segments(fmt.segments(messages))
    status = "ok"
    if len(ids) > max_len:
        if truncation == "drop":
            return Encoded([], [], "too_long")
        system = messages[:1] if messages[0]["role"] == "system" else []
        body = messages[len(system) :]
        while len(ids) > max_len and len(body) > 2:
            body = body[2:]  # drop the oldest user/assistant pair
            ids, labels = enc.encode_segments(fmt.segments(system + body))
            status = "turns_dropped"
        if len(ids) > max_len:
            first_sup = next((i for i, x in enumerate(labels) if x != IGNORE), len(labels))
            if first_sup >= max_len - 1:
                return Encoded([], [], "too_long")  # not even the prompt and one answer token fit
            ids, labels = ids[:max_len], labels[:max_len]
            status = "response_truncated"
    if not any(x != IGNORE for x in labels):
        return Encoded([], [], "no_labels")
    return Encoded(ids, labels, status)
