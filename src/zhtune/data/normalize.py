"""``zhtune data normalize``: Traditional to Simplified Chinese, full-width to half-width, whitespace, NFKC.

* Traditional to Simplified through OpenCC (``--opencc_config t2s``; tw2s/hk2s for regional phrasing).
* Full-width letters and digits (Ａ, ｂ, ３) become ASCII; full-width punctuation and the ideographic space
  only between two ASCII characters (``ｆｏｏ（ｘ）`` becomes ``foo(x)``), so Chinese text keep its ，。（）.
* Whitespace: CRLF to LF, control and zero-width characters removed (the emoji joiner kept), exotic
  spaces to a plain space, trailing spaces cut, runs of blank lines folded to one. Indentation is kept.
* ``--nfkc``: Unicode NFKC as well; it turns Chinese full-width punctuation into ASCII, hence off by default.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from zhtune.config.parse import field
from zhtune.data.tool import (
    InputArgs,
    OutputArgs,
    Result,
    Tool,
    ToolCommand,
    edit_texts,
)

DESCRIPTION = (
    "Normalise text: Traditional to Simplified Chinese (OpenCC), full-width to half-width, whitespace."
)

WIDE_ALNUM = {
    c: c - 0xFEE0
    for r in ((0xFF10, 0xFF19), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A))
    for c in range(r[0], r[1] + 1)
}
WIDE_PUNCT = re.compile(r"(?<=[!-~])([\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF5E\u3000])(?=[!-~])")
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u2060\ufeff]")
SPACES = re.compile(r"[\u00a0\u2000-\u200a\u202f\u205f]")
TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
BLANK_RUNS = re.compile(r"\n{3,}")


@dataclass
class NormalizeArgs:
    """what to normalise"""

    t2s: bool = field(True, "Convert Traditional Chinese to Simplified (OpenCC).")
    opencc_config: str = field("t2s", "OpenCC conversion: t2s, tw2s, hk2s, tw2sp (Taiwan phrases), ...")
    fullwidth: bool = field(True, "Full-width letters and digits to ASCII; punctuation only between ASCII.")
    whitespace: bool = field(
        True, "Line ends, control/zero-width characters, exotic spaces, blank-line runs."
    )
    nfkc: bool = field(False, "Unicode NFKC too (also turns Chinese full-width punctuation into ASCII).")


SECTIONS = {"input": InputArgs, "output": OutputArgs, "normalize": NormalizeArgs}


def fix_whitespace(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = CONTROL.sub("", text)
    text = SPACES.sub(" ", text)
    text = TRAILING.sub("", text)
    return BLANK_RUNS.sub("\n\n", text).strip()


def fix_width(text: str) -> str:
    text = text.translate(WIDE_ALNUM)
    return WIDE_PUNCT.sub(lambda m: " " if m.group(1) == "\u3000" else chr(ord(m.group(1)) - 0xFEE0), text)


class Normalize(Tool):
    name = "normalize"

    def __init__(self, args: NormalizeArgs):
        self.args = args
        self.cc: Any = None

    def setup(self) -> None:
        if self.args.t2s:
            from zhtune.deps import require

            opencc = require("opencc", "Traditional to Simplified conversion")
            try:
                self.cc = opencc.OpenCC(self.args.opencc_config)
            except Exception as e:  # noqa: BLE001 - the library raises its own types
                raise ValueError(
                    f"--opencc_config {self.args.opencc_config!r} is not an OpenCC config: {e}"
                ) from None

    def text(self, text: str, role: str = "") -> str:
        a = self.args
        if a.whitespace:
            text = fix_whitespace(text)
        if self.cc is not None:
            text = self.cc.convert(text)
        if a.fullwidth:
            text = fix_width(text)
        if a.nfkc:
            text = unicodedata.normalize("NFKC", text)
        return text

    def apply(self, rec: Any) -> Result:
        return edit_texts(rec, self.text, "normalizing")


COMMAND = ToolCommand(Normalize, SECTIONS, DESCRIPTION)
main, cli = COMMAND.main, COMMAND.cli
