"""``zhtune data <tool>``: the data tools, each a module imported only when it runs.

Every tool streams JSON or JSON Lines of any size, runs its per-record work in ``--num_proc`` processes
where the work allows, writes its output atomically (never over an input) and ends with a summary.
"""

from __future__ import annotations

import os

from zhtune.config.subcommands import Subcommands

# name -> (module with cli(argv), one-line help)
TOOLS: dict[str, tuple[str, str]] = {
    "convert": (
        "zhtune.data.convert",
        "convert between Alpaca, ShareGPT, OpenAI messages and Chinese-Vicuna chat",
    ),
    "merge": ("zhtune.data.merge_files", "merge several files into one, keeping ids unique"),
    "clean-html": (
        "zhtune.data.clean_html",
        "turn HTML in answers into Markdown (code blocks and tables kept)",
    ),
    "filter-lang": ("zhtune.data.filter_lang", "keep or skip conversations by language (langid)"),
    "split-long": (
        "zhtune.data.split_long",
        "split conversations over --max_length tokens at turn boundaries",
    ),
    "dedup": ("zhtune.data.dedup", "remove exact and near duplicates (MinHash LSH), with a cluster report"),
    "normalize": (
        "zhtune.data.normalize",
        "Traditional to Simplified, full-width to half-width, whitespace, NFKC",
    ),
    "filter": (
        "zhtune.data.quality",
        "drop low-quality records: length, Chinese ratio, repeats, refusals, empty",
    ),
    "stats": ("zhtune.data.stats", "counts, token lengths, language mix, turns; a table and a PNG histogram"),
    "generate": ("zhtune.data.generate", "self-instruct data through any OpenAI-compatible endpoint"),
}


def one_blas_thread() -> None:
    """Parallelism comes from --num_proc; one BLAS thread per process keeps 2 cores from thrashing."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


DATA = Subcommands("zhtune data", TOOLS, noun="tool", before=one_blas_thread)
cli, main = DATA.cli, DATA.main  # main({"command": "dedup", ...options}) runs one from Python


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(cli())
