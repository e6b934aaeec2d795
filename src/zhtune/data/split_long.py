"""``zhtune data split-long``: split conversations over a token budget at turn boundaries.

FastChat's ``split_long_conversation.py`` semantics: each turn costs its tokens under the given tokenizer
plus ``--turn_overhead`` (template text); human/assistant pairs are packed greedily, in order, into pieces
of at most ``--max_length`` tokens, and a pair is never cut in two. A system prompt is repeated in every
piece and counts toward its budget. A piece gets the id ``<id>_<index of its first turn>``. A single pair
over the budget stays a piece of its own (training truncates it) unless ``--drop_long_pairs``. Unlike
FastChat's script, the last pair is kept when the split falls on it, and no empty piece is written.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.config.parse import field
from zhtune.data.tool import (
    InputArgs,
    Item,
    OutputArgs,
    Result,
    Summary,
    Tool,
    ToolCommand,
    parse_batch,
)
from zhtune.errors import ConfigError
from zhtune.text.formats import extras_of, from_messages, split_system

DESCRIPTION = "Split conversations longer than --max_length tokens at turn boundaries (FastChat split_long)."


@dataclass
class SplitArgs:
    """token budget"""

    model_name_or_path: str = field(
        "default", "Model whose tokenizer counts tokens (directory, hub id, default)."
    )
    tokenizer_name_or_path: str | None = field(None, "A tokenizer directory to use instead of the model's.")
    max_length: int = field(2048, "Most tokens in one piece.")
    turn_overhead: int = field(6, "Tokens added per turn for the chat template's text (FastChat: 6).")
    drop_long_pairs: bool = field(False, "Drop a human/assistant pair that alone is over --max_length.")

    def __post_init__(self) -> None:
        if self.max_length < 16:
            raise ConfigError(f"--max_length {self.max_length} is too small; use at least 16")
        if self.turn_overhead < 0:
            raise ConfigError("--turn_overhead cannot be negative")


SECTIONS = {"input": InputArgs, "output": OutputArgs, "split": SplitArgs}


def load_counting_tokenizer(model_name_or_path: str, tokenizer_name_or_path: str | None) -> Any:
    from zhtune.config.args import ModelArgs
    from zhtune.model.loader import load_tokenizer

    if tokenizer_name_or_path is None and Path(model_name_or_path).is_dir():
        tokenizer_name_or_path = model_name_or_path  # a directory may hold only a tokenizer

    return load_tokenizer(
        ModelArgs(model_name_or_path=model_name_or_path, tokenizer_name_or_path=tokenizer_name_or_path)
    )


def count_tokens(tok: Any, texts: list[str]) -> list[int]:
    """Token counts without special tokens; through the Rust tokenizer in one batch where there is one."""
    if not texts:
        return []
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return [len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]


def pack_pairs(pair_lens: list[int], budget: int) -> list[tuple[int, int]]:
    """Greedy packing of pairs, in order, into ``[start, end)`` ranges of at most ``budget`` tokens."""
    pieces, start, cur = [], 0, 0
    for i, n in enumerate(pair_lens):
        if cur + n > budget and i > start:
            pieces.append((start, i))
            start, cur = i, 0
        cur += n
    if pair_lens:
        pieces.append((start, len(pair_lens)))
    return pieces


class SplitLong(Tool):
    name = "split-long"

    def __init__(self, args: SplitArgs):
        self.args = args
        self.tok: Any = None
        self.stats: Counter = Counter()

    def setup(self) -> None:
        self.tok = load_counting_tokenizer(self.args.model_name_or_path, self.args.tokenizer_name_or_path)

    def apply_batch(self, recs: list[Any]) -> list[Result | str]:
        parsed, texts = parse_batch(recs)
        lens = iter(n + self.args.turn_overhead for n in count_tokens(self.tok, texts))
        out: list[Result | str] = []
        for rec, p in zip(recs, parsed):
            if isinstance(p, str):
                out.append(p)
                continue
            fmt, msgs = p
            turn_lens = [next(lens) for _ in msgs]
            out.append(self.split(rec, fmt, msgs, turn_lens))
        return out

    def split(self, rec: dict, fmt: str, msgs: list[dict], turn_lens: list[int]) -> Result:
        system, body = split_system(msgs)
        sys_len = turn_lens[0] if system else 0
        body_lens = turn_lens[1:] if system else turn_lens
        pair_lens = [body_lens[i] + body_lens[i + 1] for i in range(0, len(body), 2)]
        budget = self.args.max_length - sys_len
        pieces = pack_pairs(pair_lens, budget)
        extras = extras_of(rec, fmt)
        outs, long_alone = [], 0
        for start, end in pieces:
            if end - start == 1 and pair_lens[start] > budget:
                long_alone += 1
                if self.args.drop_long_pairs:
                    continue
            piece = ([msgs[0]] if system else []) + body[2 * start : 2 * end]
            ex = dict(extras)
            if len(pieces) > 1 and "id" in ex:
                ex["id"] = f"{ex['id']}_{2 * start}"
            outs.append(from_messages(piece, fmt, ex) if len(pieces) > 1 else rec)
        if not outs:
            return Result(
                [], "a human/assistant pair over --max_length", fmt=fmt, key=(len(pieces), long_alone)
            )
        return Result(outs, changed=len(pieces) > 1, fmt=fmt, key=(len(pieces), long_alone))

    def reduce(self, item: Item, path: Path, summary: Summary) -> None:
        pieces, long_alone = item.key
        self.stats["split"] += pieces > 1
        self.stats["pieces"] += pieces
        self.stats["long_pairs"] += long_alone

    def finish(self, summary: Summary) -> None:
        summary.extra.update(
            conversations_split=self.stats["split"],
            pairs_over_budget=self.stats["long_pairs"],
            pairs_over_budget_dropped=self.stats["long_pairs"] if self.args.drop_long_pairs else 0,
        )

    def notes(self, summary: Summary) -> list[str]:
        e = summary.extra
        return [
            f"conversations split: {e['conversations_split']}; human/assistant pairs over the budget: "
            f"{e['pairs_over_budget']} ({'dropped' if self.args.drop_long_pairs else 'kept alone'})"
        ]


COMMAND = ToolCommand(SplitLong, SECTIONS, DESCRIPTION)
main, cli = COMMAND.main, COMMAND.cli
