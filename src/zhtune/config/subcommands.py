"""One dispatcher for the commands made of subcommands: ``zhtune vocab train``, ``zhtune data dedup``,
``zhtune recipes list``.

Each such command keeps a table, name -> (target, one-line help), where the target is a module whose
``cli(argv)`` runs the subcommand, or ``module:function`` for a function that takes argv. The module is
imported only when its subcommand runs, so ``--help`` stays instant and a missing optional extra breaks
only the subcommand that needs it. ``-`` and ``_`` are the same in names (``clean_html`` is ``clean-html``).
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zhtune.errors import ConfigError


@dataclass(frozen=True)
class Subcommands:
    prog: str  # "zhtune data"
    table: dict[str, tuple[str, str]]  # name -> (module or module:function, one-line help)
    noun: str = "subcommand"  # what the help calls them: "subcommand", "tool"
    args: str = "[recipe.yaml] [--option value ...]"  # what follows the name, for the usage line
    before: Callable[[], None] | None = None  # runs before a subcommand's module is imported

    def usage(self) -> str:
        width = max(len(n) for n in self.table)
        lines = [f"usage: {self.prog} <{self.noun}> {self.args}".rstrip(), "", f"{self.noun}s:"]
        lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in self.table.items()]
        lines += ["", f"Run '{self.prog} <{self.noun}> --help' for its options."]
        return "\n".join(lines)

    def resolve(self, name: str) -> str | None:
        """The table's spelling of ``name`` (``-`` and ``_`` alike), or None."""
        for cand in (name, name.replace("_", "-"), name.replace("-", "_")):
            if cand in self.table:
                return cand
        return None

    def target(self, name: str) -> Callable[..., Any]:
        """The subcommand's argv entry point: ``module:function``, or the module's ``cli``."""
        if self.before is not None:
            self.before()
        module, _, function = self.table[name][0].partition(":")
        return getattr(importlib.import_module(module), function or "cli")

    def cli(self, argv: list[str] | None = None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(self.usage())
            return 0
        name = self.resolve(argv[0])
        if name is None:
            hint = difflib.get_close_matches(argv[0], list(self.table), n=1)
            print(
                f"{self.prog}: unknown {self.noun} {argv[0]!r}"
                + (f" (did you mean {hint[0]}?)" if hint else ""),
                file=sys.stderr,
            )
            print(self.usage(), file=sys.stderr)
            return 2
        return int(self.target(name)(argv[1:]) or 0)

    def main(self, cfg: dict[str, Any]) -> Any:
        """``main({"command": NAME, ...options})`` runs a subcommand's ``main(cfg)`` from Python."""
        cfg = dict(cfg)
        name = self.resolve(str(cfg.pop("command", "")))
        if name is None or ":" in self.table[name][0]:
            raise ConfigError(f"{self.prog}: 'command' must be one of {', '.join(self.table)}")
        if self.before is not None:
            self.before()
        return importlib.import_module(self.table[name][0]).main(cfg)
