"""Greedy replies to chat prompts, timed, and what they cost: the generation half of ``zhtune eval``'s tasks.

:func:`greedy_replies` writes the greedy reply to each prompt through an inference engine (transformers
``generate`` by default, vLLM with ``--backend vllm``), after one short warm-up reply so the timing leaves
out the first call's setup. :func:`generation_speed` turns the replies, their tokens and the seconds they
took into Chinese (Han) characters per second (``chars_per_s``) and tokens per character of reply
(``tokens_per_char``, the end-of-turn token included): what a vocabulary with Chinese words buys at inference.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from zhtune.text.templates import Message

# Han characters: CJK unified ideographs, extension A, compatibility ideographs, extensions B and beyond
HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")


def with_system(msgs: list[Message], system: str | None) -> list[Message]:
    """``msgs`` with ``system`` as their system prompt, unless they have one."""
    if system and (not msgs or msgs[0]["role"] != "system"):
        return [{"role": "system", "content": system}, *msgs]
    return msgs


def generation_speed(replies: list[str], tokens: int, seconds: float) -> dict[str, Any]:
    """Han characters per second and tokens per character of greedy replies written in ``seconds``."""
    chars = sum(len(r) for r in replies)
    han = sum(len(HAN.findall(r)) for r in replies)
    return {
        "chars_per_s": han / seconds if seconds > 0 else float("nan"),
        "tokens_per_char": tokens / chars if chars else float("nan"),
        "han_chars": han,
        "reply_chars": chars,
        "reply_tokens": tokens,
        "generation_s": seconds,
    }


@dataclass
class Replies:
    """Greedy replies, the tokens they took and the seconds spent writing them (after a warm-up reply)."""

    texts: list[str]
    tokens: int
    seconds: float


def greedy_replies(
    model: Any, tok: Any, fmt: Any, prompts: list[list[Message]], opts: Any, engine: Any = None
) -> Replies:
    """The greedy reply to each prompt, in padded batches of ``opts.batch_size``, at most
    ``opts.max_new_tokens`` tokens each, timed. ``engine``: a started engine to use (default: transformers
    generate on ``model``, closed after)."""
    if not prompts:
        return Replies([], 0, 0.0)
    from tqdm import tqdm

    from zhtune.config.args import GenerationArgs
    from zhtune.infer.engine import Engine, EngineArgs

    own = engine is None
    if own:
        engine = Engine(model, tok, fmt, EngineArgs(max_batch_size=opts.batch_size))
        engine.start("generate")  # greedy replies, prompts with the same settings in padded batches
    g = GenerationArgs(max_new_tokens=opts.max_new_tokens, temperature=0.0, repetition_penalty=1.0)
    try:
        # one short reply first, so the timing leaves out the first call's setup
        warm = engine.prompt_ids(prompts[0])
        engine.submit(
            engine.job(warm, g, max_new_tokens=engine.max_new_tokens(len(warm), 2, clamp=True))
        ).run()
        t0 = time.perf_counter()
        jobs = []
        for p in prompts:
            ids = engine.prompt_ids(p)
            n = engine.max_new_tokens(len(ids), g.max_new_tokens, clamp=True)
            jobs.append(engine.submit(engine.job(ids, g, max_new_tokens=n)))
        replies = []
        for job in tqdm(jobs, desc="generating", leave=False, unit="reply"):
            for _ in job:
                pass
            replies.append(job.reply().text.strip())
        seconds = time.perf_counter() - t0
    finally:
        if own:
            engine.close()
    return Replies(replies, sum(job.reply().completion_tokens for job in jobs), seconds)
