"""Decoding that never writes a broken character: a logits processor that keeps replies valid UTF-8.

LLaMA-family vocabularies hold byte tokens (SentencePiece's ``<0xE5>`` byte fallback, byte-level BPE's 256
single bytes and the byte fragments of its merges). A model that emits the first byte of a three-byte
character and then anything but its two continuation bytes has written invalid UTF-8, shown as U+FFFD.
:class:`Utf8Guard` masks, before each token is chosen, every token whose bytes cannot validly follow what
the reply holds so far: inside a character only its continuation bytes may come, between characters no
token may start with a stray continuation byte or hold an impossible byte. Tokens of valid text are never
touched, so a model that writes valid UTF-8 decodes exactly as without the guard. Special tokens (no bytes)
may come between characters; the stop tokens may come at any point, and the incremental detokenizer
(:mod:`zhtune.infer.stream`) then holds the unfinished character back instead of printing U+FFFD.

The state of the reply is the UTF-8 decoder state after its last three tokens (a character has at most
four bytes, so an unfinished one started within the last three), found by table lookups on the device:
no host synchronisation, no per-request memory, correct under beam search's reordering of rows.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

# decoder states: 0 = between characters; else (continuation bytes still needed, range of the next one)
STATES = [
    (0, 0, 0),
    (1, 0x80, 0xBF),
    (2, 0x80, 0xBF),
    (2, 0xA0, 0xBF),  # after E0: no overlong forms
    (2, 0x80, 0x9F),  # after ED: no surrogates
    (3, 0x80, 0xBF),
    (3, 0x90, 0xBF),  # after F0: no overlong forms
    (3, 0x80, 0x8F),  # after F4: nothing above U+10FFFF
]
GROUND = 0
LOOKBACK = 3
PROBE = "北京是中国的首都，Hello 世界！😀 ½ café done\n新世纪"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def lead_state(b: int) -> int | None:
    """The state after lead byte ``b``: GROUND for ASCII, None for a byte no character starts with."""
    if b < 0x80:
        return GROUND
    if 0xC2 <= b <= 0xDF:
        return 1
    if b == 0xE0:
        return 3
    if b == 0xED:
        return 4
    if 0xE1 <= b <= 0xEF:
        return 2
    if b == 0xF0:
        return 6
    if 0xF1 <= b <= 0xF3:
        return 5
    if b == 0xF4:
        return 7
    return None


def step(state: int, b: int) -> int | None:
    """The state after byte ``b``, or None where ``b`` is invalid there."""
    need, lo, hi = STATES[state]
    if need == 0:
        return lead_state(b)
    if not lo <= b <= hi:
        return None
    return GROUND if need == 1 else (1 if need == 2 else 2)


def run(data: bytes, state: int = GROUND) -> tuple[bool, int]:
    """(valid, state after) of ``data`` from ``state``; past an invalid byte the decoder starts over, as a
    decoder writing U+FFFD does (a continuation byte between characters is skipped)."""
    ok = True
    for b in data:
        nxt = step(state, b)
        if nxt is None:
            ok = False
            nxt = step(GROUND, b) if state != GROUND else None
            nxt = GROUND if nxt is None else nxt
        state = nxt
    return ok, state


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The bytes each token id adds to decoded text; None for special tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(tokenizer.all_special_ids)
    added = {i: t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and "ByteLevel" in type(backend.decoder).__name__ + repr(backend.decoder)
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    out: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        tok_added = added.get(i)
        if i in special or (tok_added is not None and tok_added.special) or piece is None:
            out.append(None)
        elif tok_added is not None:
            out.append(tok_added.content.encode("utf-8"))
        elif m := _BYTE_TOKEN.fullmatch(piece):
            out.append(bytes([int(m.group(1), 16)]))
        elif byte_level and all(c in to_byte for c in piece):
            out.append(bytes(to_byte[c] for c in piece))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


def check_bytes(tokenizer: Any, table: list[bytes | None], text: str = PROBE) -> bool:
    """Whether the table's bytes of ``text``'s tokens decode to what the tokenizer decodes them to."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if any(i >= len(table) or table[i] is None for i in ids):
        return False
    ours = b"".join(table[i] for i in ids).decode("utf-8", "replace")  # type: ignore[misc]
    theirs = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return ours == theirs or ours.lstrip(" ") == theirs.lstrip(" ")


def tables(table: list[bytes | None], always: Iterable[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(allowed [states, vocab] bool, next state [states, vocab] long) for the token bytes ``table``."""
    n_states, vocab = len(STATES), len(table)
    allowed = [[False] * vocab for _ in range(n_states)]
    nxt = [[GROUND] * vocab for _ in range(n_states)]
    keep = set(always)
    for i, data in enumerate(table):
        if data is None:  # special: between characters, or a stop token anywhere
            for s in range(n_states):
                allowed[s][i] = s == GROUND or i in keep
        elif not data:
            for s in range(n_states):
                allowed[s][i], nxt[s][i] = True, s
        elif not 0x80 <= data[0] <= 0xBF:  # no token can follow a partial character: one run decides
            allowed[GROUND][i], after = run(data)
            for s in range(n_states):
                nxt[s][i] = after
        else:  # starts inside a character: the states differ
            for s in range(n_states):
                allowed[s][i], nxt[s][i] = run(data, s)
    return torch.tensor(allowed, dtype=torch.bool), torch.tensor(nxt, dtype=torch.long)


class Utf8Guard:
    """Masks the logits of tokens that would make the reply invalid UTF-8 (see the module docstring).

    Call it as a transformers logits processor, ``guard(input_ids [batch, seq], scores [batch, vocab])``,
    with the ids so far (prompt included). ``Utf8Guard.for_tokenizer`` returns None when the tokenizer's
    bytes cannot be read back exactly (then nothing is masked).
    """

    def __init__(self, allowed: torch.Tensor, nxt: torch.Tensor):
        self.allowed, self.nxt = allowed, nxt
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._nxt_rows: list[list[int]] | None = None  # nxt as lists, for host_state

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, always: Iterable[int] = ()) -> Utf8Guard | None:
        table = token_bytes(tokenizer)
        if not check_bytes(tokenizer, table):
            log.warning("cannot read this tokenizer's tokens as bytes; replies are not checked for UTF-8")
            return None
        return cls(*tables(table, always))

    def _tables(self, device: torch.device, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on:
            allowed, nxt = self.allowed, self.nxt
            if vocab > allowed.shape[1]:  # rows past the tokenizer (padded embeddings): left alone
                extra = vocab - allowed.shape[1]
                allowed = torch.cat([allowed, torch.ones(len(STATES), extra, dtype=torch.bool)], 1)
                same = torch.arange(len(STATES))[:, None].expand(-1, extra)
                nxt = torch.cat([nxt, same], 1)
            self._on[device] = (allowed.to(device), nxt.to(device))
        return self._on[device]

    def state(self, input_ids: torch.Tensor, vocab: int) -> torch.Tensor:
        """Decoder state [batch] after the last tokens of each row."""
        _, nxt = self._tables(input_ids.device, vocab)
        state = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        for j in range(max(0, input_ids.shape[1] - LOOKBACK), input_ids.shape[1]):
            state = nxt[state, input_ids[:, j].clamp(0, nxt.shape[1] - 1)]
        return state

    def host_state(self, prompt: Sequence[int], reply: Sequence[int]) -> int:
        """The decoder state after the last tokens of ``prompt`` + ``reply``, on the host (for engines that
        prepare each request's arguments in Python: vLLM's and transformers' continuous batching)."""
        if self._nxt_rows is None:
            self._nxt_rows = self.nxt.tolist()
        rows = self._nxt_rows
        tail = list(reply[-LOOKBACK:])
        if len(tail) < LOOKBACK:
            tail = list(prompt[-(LOOKBACK - len(tail)) :]) + tail
        state = GROUND
        for tok in tail:
            if 0 <= tok < len(rows[0]):  # ids past the tokenizer (padded embedding rows) leave it alone
                state = rows[state][tok]
        return state

    def mask(self, scores: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """``scores`` [rows, vocab] with -inf where a token cannot follow its row's decoder state."""
        allowed, _ = self._tables(scores.device, scores.shape[-1])
        return scores.masked_fill(~allowed[states, : scores.shape[-1]], float("-inf"))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.mask(scores, self.state(input_ids, scores.shape[-1]))
