"""Assistant quality, what a person sees: ``zhtune eval --task_file FILE --task_metric response``.

The file holds instruction records (Alpaca, ShareGPT or messages, read as the other tasks read them); a
record's last assistant turn, if it has one, is the reference reply. Records may stop at the prompt (an Alpaca
record without an output, a conversation ending with a user turn): those are only replied to.
``--task_file builtin:zh_prompts`` is :data:`BUILTIN_PROMPTS`' fixed set of everyday Chinese prompts, so a
recipe can look at every model's replies to the same questions without a file.

* ``response_bpc``: bits per character of the reference replies. Each conversation is encoded as SFT encodes
  it (the chat template's segments through :class:`zhtune.text.encode.SegmentEncoder`), the model is
  teacher-forced through it, and the loss of the last assistant turn's tokens, its end-of-turn token included,
  is summed, converted to bits and divided by the characters of the reference replies: the cost of the text
  itself however it is cut into tokens, so a vocabulary-extended model and its base compare. A conversation
  longer than ``--max_seq_length`` (at most the model's context) loses the start of its prompt (the first
  token kept where it is the tokenizer's bos); ``prompts_cut`` counts them, and a reply that does not fit with
  one token of prompt before it is not scored (``too_long``).
* greedy replies to the first ``--sample_replies`` records (default 16), all kept (``samples``):
  ``fffd_share``, the share holding U+FFFD (a broken character: a byte sequence that is not UTF-8; the
  UTF-8 guard of the generate and vLLM backends prevents them, so there it checks the guard),
  ``repetition_share``, the share that loops (:func:`repetitive`), and ``chars_per_s`` / ``tokens_per_char`` as the other generation tasks
  report them (:func:`zhtune.eval.greedy.generation_speed`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.errors import ConfigError, DataError
from zhtune.eval.greedy import generation_speed, greedy_replies, with_system
from zhtune.text.templates import Message

log = logging.getLogger(__name__)

BUILTIN = "builtin:"
BUILTIN_PROMPTS: dict[str, tuple[str, ...]] = {
    "zh_prompts": (
        "请介绍一下北京。",
        "用一句话解释什么是机器学习。",
        "写一首关于春天的短诗。",
        "西红柿炒鸡蛋怎么做？",
        "怎样才能养成早睡早起的习惯？",
        "请把“今天天气很好，我们去公园散步吧。”翻译成英文。",
        "给朋友写一条生日祝福短信。",
        "“塞翁失马，焉知非福”是什么意思？",
        "周末在家可以做哪些有意思的事情？",
        "一个苹果三元钱，买五个苹果一共要多少钱？",
    ),
}
DEFAULT_REPLIES = 16  # --sample_replies for this metric when not given
# repetition: a reply this long whose distinct character 4-grams are fewer than this share of all of them,
# or one ending in a unit of at least UNIT characters repeated at least REPEATS times
MIN_CHARS, GRAM, MIN_DISTINCT, UNIT, REPEATS = 16, 4, 0.5, 2, 4


@dataclass
class ResponseOptions:
    file: str  # a record file, or builtin:NAME
    metric: str = "response"
    max_samples: int | None = None
    sample_replies: int = DEFAULT_REPLIES  # greedy replies to the first N records, all kept
    max_new_tokens: int = 64
    batch_size: int = 8
    max_seq_length: int = 1024
    system_prompt: str | None = None


def builtin_name(file: str) -> str | None:
    """The prompt set ``builtin:NAME`` names (checked), or None for a file."""
    if not file.startswith(BUILTIN):
        return None
    name = file[len(BUILTIN) :]
    if name not in BUILTIN_PROMPTS:
        raise ConfigError(
            f"unknown built-in prompt set {file!r}; there are: "
            + ", ".join(BUILTIN + n for n in BUILTIN_PROMPTS)
        )
    return name


def read_records(file: str, max_samples: int | None = None) -> list[tuple[int, list[Message], str | None]]:
    """(line, prompt messages, reference reply or None) of each record of ``file`` or ``builtin:NAME``."""
    from zhtune.text.records import iter_json_records, to_messages

    name = builtin_name(file)
    out: list[tuple[int, list[Message], str | None]] = []
    if name is not None:
        out = [(i + 1, [{"role": "user", "content": p}], None) for i, p in enumerate(BUILTIN_PROMPTS[name])]
        return out[:max_samples] if max_samples else out
    path = Path(file)
    if not path.is_file():
        raise DataError(path, None, "task file does not exist")
    for line, rec in iter_json_records(path):
        try:
            _, msgs = to_messages(rec, reply=False)
        except ValueError as e:
            raise DataError(path, line, str(e)) from None
        if msgs[-1]["role"] == "assistant":
            out.append((line, msgs[:-1], msgs[-1]["content"]))
        else:
            out.append((line, msgs, None))
        if max_samples and len(out) >= max_samples:
            break
    if not out:
        raise DataError(path, None, "no records")
    return out


# ---- what a reply looks like ----


def broken(reply: str) -> bool:
    """The reply shows a broken character (U+FFFD, what a decoder writes for bytes that are not UTF-8)."""
    return "\ufffd" in reply


def repetitive(reply: str) -> bool:
    """The reply loops, as a greedy decoder stuck on its own output does. Degenerate repetition is either:

    * a reply of at least 16 characters whose distinct character 4-grams are fewer than half of its 4-grams
      (``北京是首都。北京是首都。北京是首都。你好``: 8 distinct of 17); or
    * a reply that ends in one unit of at least 2 characters repeated at least 4 times in a row
      (``好的好的好的好的``, ``哈哈哈哈哈哈哈哈``: one character 8 times is the unit of two 4 times).

    Whitespace at either end is ignored; inside the reply it counts like any character.
    """
    t = reply.strip()
    if len(t) >= MIN_CHARS:
        grams = [t[i : i + GRAM] for i in range(len(t) - GRAM + 1)]
        if len(set(grams)) < MIN_DISTINCT * len(grams):
            return True
    for size in range(UNIT, len(t) // REPEATS + 1):
        if t.endswith(t[-size:] * REPEATS):
            return True
    return False


# ---- bits per character of the reference replies ----


def reply_ids(enc: Any, fmt: Any, prompt: list[Message], reference: str) -> tuple[list[int], int]:
    """The conversation's ids through the end of the reference reply, as SFT encodes it, and the index of the
    reply's first token: ``ids[start:]`` are the tokens SFT supervises for the last assistant turn (the reply
    and its end-of-turn token)."""
    from zhtune.train.pref_data import encode_reply

    # split as zhtune dpo and the preference task split a conversation
    before, reply = encode_reply(fmt, enc, prompt, reference)
    return before + reply, len(before)


def fit(ids: list[int], start: int, max_len: int, bos: int | None) -> tuple[list[int], int] | None:
    """``(ids, start)`` cut to ``max_len`` tokens by dropping prompt tokens from the left (a leading bos kept),
    or None when the reply does not fit after one token of prompt."""
    if len(ids) <= max_len:
        return ids, start
    head = 1 if bos is not None and ids[0] == bos else 0
    room = max_len - (len(ids) - start) - head  # prompt tokens kept before the reply
    if room < 1:
        return None
    return ids[:head] + ids[start - room :], head + room


def reply_bits(
    model: Any, tok: Any, fmt: Any, pairs: list[tuple[list[Message], str]], max_len: int, batch_size: int
) -> dict[str, Any]:
    """Bits per character of each pair's reference reply given its prompt (the module docstring's rule)."""
    from zhtune.score.nll import sequence_nll
    from zhtune.text.encode import SegmentEncoder

    enc = SegmentEncoder(tok)
    items, chars, cut, too_long = [], 0, 0, 0
    for prompt, ref in pairs:
        ids, start = reply_ids(enc, fmt, prompt, ref)
        fitted = fit(ids, start, max_len, getattr(tok, "bos_token_id", None))
        if fitted is None:
            too_long += 1
            continue
        cut += len(fitted[0]) < len(ids)
        items.append(fitted)
        chars += len(ref)
    if cut or too_long:
        log.warning(
            "%d conversations cut from the left to fit %d tokens; %d replies too long to score",
            cut,
            max_len,
            too_long,
        )
    nll = float(sequence_nll(model, items, batch_size, desc="scoring replies").sum()) if items else 0.0
    return {
        "response_bpc": nll / math.log(2) / chars if chars else None,
        "scored": len(items),
        "reference_chars": chars,
        "reference_tokens": sum(len(ids) - start for ids, start in items),
        "prompts_cut": cut,
        "too_long": too_long,
    }


def evaluate(model: Any, tok: Any, fmt: Any, opts: ResponseOptions, engine: Any = None) -> dict[str, Any]:
    """Bits per character of the reference replies and the quality of greedy replies (module docstring)."""
    recs = read_records(opts.file, opts.max_samples)
    prompts = [with_system(m, opts.system_prompt) for _, m, _ in recs]
    refs = [ref for _, _, ref in recs]
    n = min(opts.sample_replies, len(recs))
    pairs = [(p, ref) for p, ref in zip(prompts, refs) if ref is not None]
    if not pairs and not n:
        raise DataError(
            opts.file, None, "no record has a reference reply and --sample_replies is 0: nothing to measure"
        )
    out: dict[str, Any] = {"metric": "response", "n": len(recs)}
    out.update(reply_bits(model, tok, fmt, pairs, opts.max_seq_length, opts.batch_size))
    gen = greedy_replies(model, tok, fmt, prompts[:n], opts, engine)
    texts = gen.texts
    out["replies"] = n
    out["fffd_share"] = sum(map(broken, texts)) / n if n else None
    out["repetition_share"] = sum(map(repetitive, texts)) / n if n else None
    if n:
        out.update(generation_speed(texts, gen.tokens, gen.seconds))
    out["samples"] = [
        {
            "prompt": p[-1]["content"],
            "reference": ref,
            "reply": r,
            "fffd": broken(r),
            "repetitive": repetitive(r),
        }
        for p, ref, r in zip(prompts, refs, texts)
    ]
    return out
