"""The ``zhtune`` command: subcommands map 1:1 to modules and are imported only when run.

``zhtune --help`` imports nothing heavy. A subcommand whose optional extra is missing fails alone, with the
``pip install 'zhtune[extra]'`` line that fixes it.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from zhtune.commands import COMMANDS, DISTRIBUTED, SHORTCUTS


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [
        "usage: zhtune [--log_level debug|info|warning|error] <command> [recipe.yaml] [--option value ...]",
        "",
        "Turn a LLaMA-family model into a good Chinese model and assistant.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run 'zhtune <command> --help' for a command's options."]
    return "\n".join(lines)


LOG_LEVELS = ("debug", "info", "warning", "error")


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format="[zhtune] %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def split_log_level(argv: list[str]) -> tuple[str, list[str]]:
    """``zhtune --log_level debug <command> ...``: the one global option, given before the command."""
    if argv and argv[0].startswith("--log_level"):
        flag, _, value = argv[0].partition("=")
        rest = argv[1:]
        if not value:
            value, rest = (rest[0], rest[1:]) if rest else ("", rest)
        if value.lower() not in LOG_LEVELS:
            raise SystemExit(f"zhtune: --log_level takes one of {', '.join(LOG_LEVELS)}, got {value!r}")
        return value.lower(), rest
    return "info", argv


def expand_shortcut(name: str, argv: list[str]) -> list[str]:
    """``zhtune demo --max_steps 5`` -> ``zhtune pipeline <recipe> --stage_options '{"sft": {...}}' ...``."""
    import json
    import time

    import yaml

    from zhtune.errors import ConfigError
    from zhtune.recipes import recipes

    command, recipe, defaults, renames = SHORTCUTS[name]
    try:
        path = recipes()[recipe]
    except (FileNotFoundError, KeyError) as e:
        raise ConfigError(f"the recipe {recipe} is not here: {e}") from None
    if "-h" in argv or "--help" in argv:
        print(f"zhtune {name} runs: zhtune {command} {path}, with these options of its own:")
        for old, new in renames.items():
            print(f"  --{old:<28} sets {', '.join(new)}")
        print()
    out: list[str] = []
    stages: dict[str, dict[str, object]] = {}
    i = 0
    while i < len(argv):
        key, eq, value = argv[i].removeprefix("--").partition("=")
        if not argv[i].startswith("--") or key not in renames:
            out.append(argv[i])
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value")
            value, i = argv[i + 1], i + 1
        i += 1
        for target in renames[key]:
            stage, dot, option = target.rpartition(".")
            if dot:  # typed as YAML reads it (5 -> 5), as the recipe's own values are
                stages.setdefault(stage, {})[option] = yaml.safe_load(value)
            else:
                out += [f"--{target}", value]
    for key, value in defaults.items():
        if not any(a == f"--{key}" or a.startswith(f"--{key}=") for a in out):
            out += [f"--{key}", value.format(time=time.strftime("%Y%m%d-%H%M%S"))]
    if stages:
        out += ["--stage_options", json.dumps(stages, ensure_ascii=False)]
    return [str(path), *out]


def main(argv: list[str] | None = None) -> int:
    level, argv = split_log_level(list(sys.argv[1:] if argv is None else argv))
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
    setup_logging(level)
    from zhtune.errors import ConfigError, exit_code

    if name in SHORTCUTS:  # a shipped recipe run by another command
        try:
            rest = expand_shortcut(name, rest)
        except ConfigError as e:
            print(f"zhtune {name}: {e}", file=sys.stderr)
            return 2
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
    except KeyboardInterrupt:
        print(f"\nzhtune {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        code = exit_code(e)  # bad input, a missing extra, a stopped run: one line, no traceback
        if code is None:
            raise
        print(f"zhtune {name}: {e}", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
