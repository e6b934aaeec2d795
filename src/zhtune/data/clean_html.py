"""``zhtune data clean-html``: HTML in answers to Markdown (what FastChat's ``clean_sharegpt.py`` does).

Only texts that hold HTML tags are converted, so Markdown answers are left as they are. BeautifulSoup
parses the HTML; ``<pre>`` blocks are reduced to their code and language first (ShareGPT's copied pages
wrap code in divs, spans and a "Copy code" button), then markdownify writes Markdown: fenced code blocks
with their language, pipe tables, lists and headings. ShareGPT page noise ("1 / 2" at the start,
"Copy code", "Copy N chars / M words") is removed. A conversation left with an empty turn is dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

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
    "Turn HTML in conversations into Markdown (FastChat clean_sharegpt), keeping code blocks and tables."
)

HTML_TAG = re.compile(
    r"</?(?:p|div|span|pre|code|table|thead|tbody|tr|td|th|ul|ol|li|h[1-6]|br|hr|a|b|strong|em|i|img|"
    r"blockquote|button|svg|path)\b[^>]*>",
    re.IGNORECASE,
)
REGENERATE = re.compile(r"^\s*\d+\s*/\s*\d+")
COPY_CHARS = re.compile(r"Copy\d+ chars / \d+ words")
COPY_CODE = re.compile(r"```[^\n`]*Copy code\s*```")
LANG_CLASS = re.compile(r"(?:language|lang)-([\w+#.-]+)")


@dataclass
class CleanHtmlArgs:
    """which turns to clean"""

    roles: Literal["assistant", "all"] = field("assistant", "Clean assistant answers only, or every turn.")


SECTIONS = {"input": InputArgs, "output": OutputArgs, "clean": CleanHtmlArgs}


def _code_blocks(soup: Any) -> None:
    """Reduce each <pre> to one <code> with its text, and remember the language on the <pre>."""
    for pre in soup.find_all("pre"):
        code = pre.find("code")
        lang = ""
        for el in [code, pre, *pre.find_all(True)]:
            if el is None:
                continue
            m = LANG_CLASS.search(" ".join(el.get("class") or []))
            if m:
                lang = m.group(1)
                break
        for button in pre.find_all("button"):
            button.decompose()
        text = (code if code is not None else pre).get_text()
        if not lang and code is not None:  # ShareGPT: <div><span>python</span>Copy code</div><code>...
            whole = pre.get_text()
            head = whole[: whole.find(text)].replace("Copy code", "").strip()
            if re.fullmatch(r"[\w+#.-]{1,20}", head):
                lang = head
        pre.clear()
        new = soup.new_tag("code")
        new.string = text
        pre.append(new)
        pre["data-lang"] = lang


def html_to_markdown(text: str) -> str:
    from zhtune.deps import require

    bs4 = require("bs4", "clean-html")
    md = require("markdownify", "clean-html")
    soup = bs4.BeautifulSoup(text, "html.parser")
    _code_blocks(soup)
    out = md.MarkdownConverter(
        heading_style="ATX",
        bullets="-",
        escape_underscores=False,
        escape_asterisks=False,
        code_language_callback=lambda el: el.get("data-lang") or None,
    ).convert_soup(soup)
    out = COPY_CHARS.sub("", out)
    out = COPY_CODE.sub("", out)
    out = REGENERATE.sub("", out, count=1) if REGENERATE.match(out) else out
    out = re.sub(r"\n{3,}", "\n\n", out)
    return out.strip()


class CleanHtml(Tool):
    name = "clean-html"

    def __init__(self, args: CleanHtmlArgs):
        self.roles = args.roles
        self.converted = 0

    def text(self, text: str, role: str) -> str:
        if (self.roles == "all" or role == "assistant") and HTML_TAG.search(text):
            return html_to_markdown(text)
        return text

    def apply(self, rec: Any) -> Result:
        return edit_texts(rec, self.text, "cleaning", check=False)


COMMAND = ToolCommand(CleanHtml, SECTIONS, DESCRIPTION)
main, cli = COMMAND.main, COMMAND.cli
