"""``zhtune recipes list`` and ``zhtune recipes copy NAME [DEST]``: the shipped recipes under ``configs/``.

A recipe is ``configs/<recipe>/<command>[_<what>].yaml``; its name is the path without ``.yaml``
(``chinese-llama/pt_stage2``) and its first comment line says what it is. ``copy`` takes a recipe name, or a
folder name to copy every recipe in it, and writes to DEST (default: the current directory) without
overwriting unless ``--force``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import zhtune
from zhtune.config.subcommands import Subcommands
from zhtune.errors import ConfigError


def configs_dir() -> Path:
    """The shipped configs/ folder (next to src/ in a checkout or an editable install)."""
    here = Path(zhtune.__file__).resolve().parent
    for cand in (here.parents[1] / "configs", here / "configs"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(
        "the recipes folder configs/ was not found next to this installation; install zhtune from a source "
        "checkout (pip install -e .) to use the shipped recipes"
    )


def describe(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if s.startswith("#"):
            return s.lstrip("#").strip()
        if s:
            break
    return ""


def recipes() -> dict[str, Path]:
    root = configs_dir()
    return {str(p.relative_to(root).with_suffix("")): p for p in sorted(root.rglob("*.yaml"))}


def command_of(name: str) -> str:
    stem = Path(name).name
    from zhtune.commands import COMMANDS

    first = stem.split("_")[0]
    if first == "vocab":
        return "vocab " + (stem.split("_")[1] if "_" in stem else "")
    return first if first in COMMANDS else "?"


def list_recipes() -> str:
    rows = [(name, command_of(name), describe(p)) for name, p in recipes().items()]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{'recipe':<{w0}}  {'command':<{w1}}  description", f"{'-' * w0}  {'-' * w1}  -----------"]
    lines += [f"{n:<{w0}}  {c:<{w1}}  {d}" for n, c, d in rows]
    lines += ["", "zhtune recipes copy NAME [DEST] copies one (or a folder of them) to start from."]
    return "\n".join(lines)


def copy(name: str, dest: str | Path = ".", force: bool = False) -> list[Path]:
    """Copy recipe ``name`` (or every recipe of folder ``name``) into ``dest``; returns the written files."""
    name = name.removesuffix(".yaml").strip("/")
    found = recipes()
    if name in found:
        chosen = {name: found[name]}
        rel_root = Path(name).parent
    else:
        chosen = {n: p for n, p in found.items() if n.startswith(name + "/")}
        rel_root = Path(name).parent
        if not chosen:
            import difflib

            hint = difflib.get_close_matches(
                name, list(found) + sorted({str(Path(n).parent) for n in found}), n=1
            )
            raise ConfigError(
                f"no recipe {name!r}"
                + (f" (did you mean {hint[0]}?)" if hint else "")
                + "; see zhtune recipes list"
            )
    dest = Path(dest)
    targets = {n: dest / Path(n).relative_to(rel_root).with_suffix(".yaml") for n in chosen}
    clash = [str(t) for t in targets.values() if t.exists()]
    if clash and not force:
        raise ConfigError(f"{', '.join(clash)} already exist(s); pass --force to overwrite")
    for n, t in targets.items():
        t.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(chosen[n], t)
    return list(targets.values())


def list_cli(argv: list[str]) -> int:
    if argv:
        if argv[0] in ("-h", "--help"):
            print("usage: zhtune recipes list")
            return 0
        raise ConfigError("usage: zhtune recipes list (no arguments)")
    print(list_recipes())
    return 0


def copy_cli(argv: list[str]) -> int:
    usage = "usage: zhtune recipes copy NAME [DEST] [--force]"
    if "-h" in argv or "--help" in argv:
        print(usage)
        return 0
    force = "--force" in argv
    args = [a for a in argv if a != "--force"]
    if len(args) not in (1, 2) or any(a.startswith("-") for a in args):
        raise ConfigError(usage)
    written = copy(args[0], args[1] if len(args) == 2 else ".", force)
    for p in written:
        print(f"wrote {p}")
    cmd = command_of(str(written[0].with_suffix("")))
    if len(written) == 1 and cmd != "?":
        print(f"edit it, then: zhtune {cmd} {written[0]}")
    return 0


RECIPES = Subcommands(
    "zhtune recipes",
    {
        "list": ("zhtune.recipes:list_cli", "every shipped recipe, the command it is for and what it does"),
        "copy": (
            "zhtune.recipes:copy_cli",
            "copy NAME [DEST] [--force]: a recipe (or a folder of them) to DEST, default the current folder",
        ),
    },
    args="[NAME [DEST] [--force]]",
)
cli = RECIPES.cli
