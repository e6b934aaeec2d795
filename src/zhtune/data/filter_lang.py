"""``zhtune data filter-lang``: keep or skip conversations by language (FastChat's ``optional_clean.py``).

The language is identified by langid.py, whose model ships inside the PyPI package: nothing is downloaded.
It looks at the first ``--max_chars`` (600) characters of the conversation (all turns). Codes are ISO 639-1
(zh, en, ja, ...); below ``--min_confidence`` a conversation counts as ``und`` (undetermined).
"""

from __future__ import annotations

import base64
import bz2
import functools
import hashlib
import io
import pickle
from array import array
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
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
    messages,
)
from zhtune.errors import ConfigError
from zhtune.text.formats import conversation_text

DESCRIPTION = "Keep or skip conversations by language (langid.py; its model ships in the package)."


@dataclass
class LangArgs:
    """languages"""

    keep_lang: list[str] | None = field(None, "Keep only these languages, comma separated (e.g. zh,en).")
    skip_lang: list[str] | None = field(None, "Drop these languages, comma separated.")
    min_confidence: float = field(0.0, "Below this probability the language is 'und' (undetermined).")
    max_chars: int = field(600, "Identify from the first this many characters of the conversation.")

    def __post_init__(self) -> None:
        if not self.keep_lang and not self.skip_lang:
            raise ConfigError("give --keep_lang (e.g. zh,en) or --skip_lang")
        if self.keep_lang and self.skip_lang:
            raise ConfigError("give either --keep_lang or --skip_lang, not both")
        if not 0 <= self.min_confidence < 1:
            raise ConfigError(f"--min_confidence is a probability in [0, 1), got {self.min_confidence}")
        if self.max_chars < 16:
            raise ConfigError(f"--max_chars {self.max_chars} is too few to tell a language; use at least 16")


SECTIONS = {"input": InputArgs, "output": OutputArgs, "lang": LangArgs}


@functools.lru_cache(maxsize=1)
def identifier() -> Any:
    """langid.py's identifier with normalised probabilities, once per process.

    The package ships its model as a bzip2 string that takes seconds to unpack; the unpacked arrays are
    kept as a plain .npz (no pickle) under the zhtune cache, so later processes load it in a blink.
    """
    from zhtune.deps import require

    require("langid", "language identification")
    import numpy as np
    from langid.langid import LanguageIdentifier, model

    from zhtune.model.default import cache_root

    raw = model if isinstance(model, bytes) else model.encode()
    tag = hashlib.sha1(raw[:65536]).hexdigest()[:12]
    path = cache_root() / "langid" / f"model-{metadata.version('langid')}-{tag}.npz"
    try:
        z = np.load(path, allow_pickle=False)
        ptc, pc, classes, nextmove = z["ptc"], z["pc"], [str(c) for c in z["classes"]], z["nextmove"]
        keys, lens, vals = z["out_keys"].tolist(), z["out_lens"].tolist(), z["out_vals"].tolist()
        out, i = {}, 0
        for k, n in zip(keys, lens):
            out[k] = tuple(vals[i : i + n])
            i += n
        tk_nextmove = array(str(z["nextmove_code"]), nextmove.tobytes())
    except (OSError, KeyError, ValueError):
        ptc_a, pc_a, classes, tk_nextmove, out = pickle.loads(bz2.decompress(base64.b64decode(model)))
        pc = np.array(pc_a)
        ptc = np.array(ptc_a).reshape(len(ptc_a) // len(pc_a), len(pc_a))
        keys = sorted(out)
        buf = io.BytesIO()
        np.savez(
            buf,
            ptc=ptc,
            pc=pc,
            classes=np.array(classes),
            nextmove=np.frombuffer(tk_nextmove.tobytes(), dtype=tk_nextmove.typecode),
            nextmove_code=np.array(tk_nextmove.typecode),
            out_keys=np.array(keys, dtype=np.int64),
            out_lens=np.array([len(out[k]) for k in keys], dtype=np.int64),
            out_vals=np.array([v for k in keys for v in out[k]], dtype=np.int64),
        )
        from zhtune.atomic import atomic_write_bytes

        try:
            atomic_write_bytes(path, buf.getvalue())
        except OSError:  # a read-only cache only costs speed
            pass

    class SparseIdentifier(LanguageIdentifier):
        """langid's scores, summed over the features a text has instead of one dense BLAS product
        (multi-threaded BLAS made each call take 20 ms on a busy 2-core machine; this takes 1 ms)."""

        def nb_classprobs(self, fv: Any) -> Any:
            idx = np.flatnonzero(fv)
            return (self.nb_ptc[idx] * fv[idx, None]).sum(axis=0) + self.nb_pc

    return SparseIdentifier(ptc, pc, ptc.shape[0], classes, tk_nextmove, out, norm_probs=True)


class LangId:
    """Language of a text: an ISO 639-1 code, or 'und' when empty or below ``min_confidence``."""

    def __init__(self, max_chars: int = 600, min_confidence: float = 0.0):
        self.ident = identifier()
        self.max_chars, self.min_confidence = max_chars, min_confidence

    def __call__(self, text: str) -> str:
        text = text[: self.max_chars]
        if not text.strip():
            return "und"
        lang, prob = self.ident.classify(text)
        return lang if prob >= self.min_confidence else "und"


class FilterLang(Tool):
    name = "filter-lang"

    def __init__(self, args: LangArgs):
        self.args = args
        self.keep = set(args.keep_lang or [])
        self.skip = set(args.skip_lang or [])
        self.langs: Counter = Counter()
        self.ident: LangId | None = None

    def setup(self) -> None:
        self.ident = LangId(self.args.max_chars, self.args.min_confidence)

    def apply(self, rec: Any) -> Result:
        assert self.ident is not None
        fmt, msgs = messages(rec)
        lang = self.ident(conversation_text(msgs)[: self.args.max_chars])
        if (self.keep and lang not in self.keep) or lang in self.skip:
            return Result([], f"language {lang}", fmt=fmt, key=lang)
        return Result([rec], fmt=fmt, key=lang)

    def reduce(self, item: Item, path: Path, summary: Summary) -> None:
        self.langs[item.key] += 1

    def finish(self, summary: Summary) -> None:
        summary.extra["languages"] = dict(self.langs.most_common())

    def notes(self, summary: Summary) -> list[str]:
        return ["languages seen: " + ", ".join(f"{k} {v}" for k, v in summary.extra["languages"].items())]


COMMAND = ToolCommand(FilterLang, SECTIONS, DESCRIPTION)
main, cli = COMMAND.main, COMMAND.cli
