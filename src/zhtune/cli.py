"""The ``zhtune`` command: subcommands map 1:1 to modules and are imported only when run.

``zhtune --help`` imports nothing heavy. A subcommand whose optional extra is missing fails alone, with the
``pip install 'zhtune[extra]'`` line that fixes it.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

# name -> (module with cli(argv), extra it needs or "", one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "vocab": (
        "zhtune.vocab.cli",
        "",
        "train, merge and compare Chinese vocabularies (zhtune vocab train|merge|stats)",
    ),
    "pt": (
        "zhtune.train.pt",
        "",
        "continued pre-training on plain text (embeddings, LoRA + embeddings, or full)",
    ),
    "sft": ("zhtune.train.sft", "", "instruction-tune (LoRA, QLoRA, full) on Alpaca/ShareGPT/messages data"),
    "chat": ("zhtune.infer.chat", "", "chat with a model (plus adapters) in the terminal"),
    "generate": ("zhtune.infer.generate", "", "answer a JSON/JSONL file of prompts in batches (resumable)"),
    "serve": ("zhtune.serve.server", "serve", "OpenAI-compatible API and web chat page"),
    "data": (
        "zhtune.data.cli",
        "data",
        "data tools: convert, merge, clean, filter, dedup, split, stats, generate",
    ),
    "merge": (
        "zhtune.merge.merge",
        "",
        "merge LoRA adapters (in order) into the base; write HF safetensors or GGUF",
    ),
    "export": (
        "zhtune.export.export",
        "",
        "export a model as GGUF (f16, q8_0, q4_0) for llama.cpp and Ollama",
    ),
    "eval": (
        "zhtune.eval.cli",
        "",
        "C-Eval/CMMLU/MMLU accuracy, bits per character and task accuracy; --compare models side by side",
    ),
    "pipeline": (
        "zhtune.pipeline.run",
        "",
        "run a recipe's stages (vocab, pt, sft, merge, export, eval) in one run directory, resumably",
    ),
    "recipes": ("zhtune.recipes", "", "list the shipped recipes, or copy one to start from"),
    "demo": ("zhtune.demo", "demo", "Chinese sentiment demo on the embedded default model (CPU, ~10 min)"),
}


# commands that train, and so take torchrun's launch flags (--nproc_per_node, --nnodes, ...): see train.launch
DISTRIBUTED = ("sft", "pt")


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [
        "usage: zhtune <command> [recipe.yaml] [--option value ...]",
        "",
        "Turn a LLaMA-family model into a good Chinese model and assistant.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run 'zhtune <command> --help' for a command's options."]
    return "\n".join(lines)


def setup_logging() -> None:
    level = os.environ.get("LOGLEVEL", "INFO").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO), format="[zhtune] %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from zhtune import __version__

        print(f"zhtune {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        hint = difflib.get_close_matches(name, list(COMMANDS), n=1)
        print(
            f"zhtune: unknown command {name!r}" + (f" (did you mean {hint[0]}?)" if hint else ""),
            file=sys.stderr,
        )
        print(usage(), file=sys.stderr)
        return 2
    module_name, extra, _ = COMMANDS[name]
    setup_logging()
    from zhtune.config.parse import ConfigError
    from zhtune.deps import MissingDependency

    if name in DISTRIBUTED:  # --nproc_per_node N / --nnodes ...: run again under torchrun
        from zhtune.train.launch import maybe_relaunch

        try:
            rc, rest = maybe_relaunch(name, rest)
        except ConfigError as e:
            print(f"zhtune {name}: {e}", file=sys.stderr)
            return 2
        if rc is not None:
            return rc

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and not e.name.startswith("zhtune"):
            fix = f"pip install 'zhtune[{extra}]'" if extra else f"pip install {e.name}"
            print(
                f"zhtune {name}: needs the package {e.name!r}, which is not installed: {fix}", file=sys.stderr
            )
            return 3
        raise
    try:
        return int(module.cli(rest) or 0)
    except MissingDependency as e:
        print(f"zhtune {name}: {e}", file=sys.stderr)
        return 3
    except ConfigError as e:
        print(f"zhtune {name}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nzhtune {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from zhtune.data.readers import DataError

        if isinstance(e, DataError):
            print(f"zhtune {name}: {e}", file=sys.stderr)
            return 2
        # a NaN loss, fp16 overflow, failed save (zhtune.train.guard is loaded once a training command ran)
        guard = sys.modules.get("zhtune.train.guard")
        if guard is not None and isinstance(e, guard.TrainingStopped):
            print(f"zhtune {name}: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
