"""``zhtune data convert``: between Alpaca, ShareGPT, OpenAI messages and Chinese-Vicuna chat records.

Each record's format is detected on its own (a file may mix them), read into chat messages and written
in the target format; fields that belong to no format (``id``, ``source``, ...) are carried over. A
conversation converts back to the same messages from any format that can hold it: Alpaca keeps earlier
turns in ``history``; a record with a system prompt cannot become Chinese-Vicuna chat and is dropped, counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from zhtune.config.parse import field
from zhtune.data.tool import InputArgs, OutputArgs, Result, Tool, ToolCommand, messages
from zhtune.errors import ConfigError
from zhtune.text.formats import extras_of, from_messages

DESCRIPTION = "Convert instruction data between Alpaca, ShareGPT, OpenAI messages and Chinese-Vicuna chat."


@dataclass
class ConvertArgs:
    """target format"""

    to: Literal["alpaca", "sharegpt", "messages", "vicuna_chat"] | None = field(
        None,
        "Format to write: alpaca, sharegpt, messages (OpenAI) or vicuna_chat ({input: [...], output: [...]}).",
    )

    def __post_init__(self) -> None:
        if self.to is None:
            raise ConfigError("--to is required: alpaca, sharegpt, messages or vicuna_chat")


SECTIONS = {"input": InputArgs, "output": OutputArgs, "convert": ConvertArgs}


class Convert(Tool):
    name = "convert"

    def __init__(self, args: ConvertArgs):
        self.to = args.to

    def apply(self, rec: Any) -> Result:
        fmt, msgs = messages(rec)
        try:
            out = from_messages(msgs, self.to, extras_of(rec, fmt))
        except ValueError as e:
            return Result([], f"not representable in {self.to}: {e}", fmt=fmt)
        return Result([out], changed=fmt != self.to, fmt=fmt)


COMMAND = ToolCommand(Convert, SECTIONS, DESCRIPTION)
main, cli = COMMAND.main, COMMAND.cli
