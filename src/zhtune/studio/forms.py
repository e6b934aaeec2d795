"""Forms generated from the commands' typed config sections, so the page cannot drift from the CLI.

Every command of :data:`zhtune.commands.COMMANDS` whose module has ``SECTIONS`` (and every tool of ``zhtune
vocab`` and ``zhtune data``) gets a form: one group per section, one input per dataclass field with its type,
choices, default and the help text ``--help`` prints. What the page sends back goes through the same
:func:`zhtune.config.parse.build` as the command line; the run then gets a recipe YAML of the values that
differ from the defaults, and the page shows that YAML and the equivalent ``zhtune`` command line.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import shlex
import typing
from typing import Any, Literal, get_args, get_origin

import yaml

from zhtune.commands import COMMANDS
from zhtune.config.parse import ALIASES, Config, build, coerce
from zhtune.errors import ConfigError

# commands without an options form: the recipe list is the page's recipe picker, the studio is this page
NO_FORM = ("recipes", "studio")
# sub-tool tables of the commands that have them (zhtune vocab train, zhtune data dedup, ...)
SUB_TABLES = ("SUBCOMMANDS", "TOOLS")
# servers and terminal chat run as the page's own chat, not as runs
NOT_RUNS = ("serve", "chat", "studio")


def module_of(command: str) -> Any:
    head, _, sub = command.partition(" ")
    if head not in COMMANDS or head in NO_FORM:
        raise ConfigError(f"unknown command {command!r}")
    module = importlib.import_module(COMMANDS[head][0])
    if not sub:
        return module
    for table in SUB_TABLES:
        if sub in getattr(module, table, {}):
            return importlib.import_module(getattr(module, table)[sub][0])
    raise ConfigError(f"unknown command {command!r}")


@functools.cache
def form_commands() -> tuple[str, ...]:
    """Every command with a form, sub-tools spelled as ``vocab train``; those that fail to import are left out."""
    out = []
    for name in COMMANDS:
        if name in NO_FORM:
            continue
        try:
            module = module_of(name)
        except ImportError:
            continue
        if hasattr(module, "SECTIONS"):
            out.append(name)
        for table in SUB_TABLES:
            for sub in getattr(module, table, {}):
                try:
                    if hasattr(module_of(f"{name} {sub}"), "SECTIONS"):
                        out.append(f"{name} {sub}")
                except ImportError:
                    continue
    return tuple(out)


def runnable(command: str) -> bool:
    return command in form_commands() and command.split()[0] not in NOT_RUNS


def sections(command: str) -> tuple[dict[str, type], dict[str, set[str]]]:
    """The command's sections, and the Hugging Face TrainingArguments it passes through (training commands):
    what the pipeline hands each command, so a form and a recipe stage accept the same options."""
    from zhtune.pipeline.stages import sections as command_sections

    module = module_of(command)
    if getattr(module, "SECTIONS", None) is None and getattr(module, "CONFIG", None) is None:
        raise ConfigError(f"zhtune {command} has no options form")
    return command_sections(module)


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def kind_of(tp: Any) -> tuple[str, bool, list[Any] | None]:
    """(input kind, optional, choices) of a field type: bool, int, float, str, choice, list or dict."""
    optional = False
    args = [a for a in get_args(tp) if a is not type(None)]
    if type(None) in get_args(tp) and len(args) == 1:
        tp, optional = args[0], True
    origin = get_origin(tp)
    if origin is Literal:
        return "choice", optional, list(get_args(tp))
    if origin is list:
        return "list", optional, None
    if origin is dict or tp is dict:
        return "dict", optional, None
    name = getattr(tp, "__name__", "str")
    return (name if name in ("bool", "int", "float") else "str"), optional, None


def schema(command: str) -> dict[str, Any]:
    """The form: ``{command, description, runnable, sections: [{name, doc, fields: [...]}]}``."""
    from zhtune.studio.paths import is_path_field

    module = module_of(command)
    secs, _ = sections(command)
    out = []
    for sname, cls in secs.items():
        hints = typing.get_type_hints(cls)
        fields = []
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            kind, optional, choices = kind_of(hints[f.name])
            fields.append(
                {
                    "name": f.name,
                    "kind": kind,
                    "optional": optional,
                    "choices": choices,
                    "default": default_of(f),
                    "text": form_text(default_of(f)),
                    "help": f.metadata.get("help", ""),
                    "path": is_path_field(f.name),
                }
            )
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        out.append({"name": sname, "doc": doc, "fields": fields})
    description = getattr(module, "DESCRIPTION", "") or (module.__doc__ or "").strip().split("\n")[0]
    return {"command": command, "description": description, "runnable": runnable(command), "sections": out}


def holds_mappings(tp: Any) -> bool:
    args = [a for a in get_args(tp) if a is not type(None)]
    inner = args[0] if len(args) == 1 and get_origin(tp) is not list else tp
    items = get_args(inner)
    return bool(items) and (items[0] is dict or get_origin(items[0]) is dict)


def parse_yaml(text: str, key: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--{key}: not valid YAML: {e}") from None


def form_text(value: Any) -> str:
    """A value as the page's text input holds it: lists comma separated, mappings and lists of them as YAML."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict) or isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return (
            yaml.safe_dump(value, sort_keys=False, allow_unicode=True, default_flow_style=False)
            if value
            else ""
        )
    if isinstance(value, list):
        return ",".join(form_text(v) for v in value)
    return str(value)


def owners(secs: dict[str, type]) -> dict[str, str]:
    return {f.name: s for s, cls in secs.items() for f in dataclasses.fields(cls) if f.init}


def recipe_values(command: str, raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A recipe (flat or grouped by section, aliases allowed) as ``{section: {field: text}}`` for the form;
    pass-through training options go into ``train.extra``. Unknown keys are refused as the CLI refuses them."""
    secs, passthrough = sections(command)
    own = owners(secs)
    out: dict[str, dict[str, Any]] = {s: {} for s in secs}

    def put(key: str, value: Any) -> None:
        key = key.replace("-", "_")
        key = key if key in own else ALIASES.get(key, key)
        if key in own:
            out[own[key]][key] = value
        elif key in passthrough.get("train", ()):
            out["train"].setdefault("extra", {})[key] = value
        else:
            raise ConfigError(f"the recipe has an unknown option {key!r} for zhtune {command}")

    for key, value in (raw or {}).items():
        if key in secs and isinstance(value, dict):
            for k, v in value.items():
                put(k, v)
        else:
            put(key, value)
    return {s: {k: form_text(v) for k, v in fields.items()} for s, fields in out.items()}


def given_values(command: str, values: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The form's values (raw strings are fine: the CLI's coercion applies), typed, by section, those that
    differ from the defaults; not rewritten by the sections' checks, so a recipe of them builds the same
    config again. Empty inputs mean the default."""
    secs, _ = sections(command)
    own = owners(secs)
    given: dict[str, dict[str, Any]] = {}
    for sname, fields in (values or {}).items():
        if sname not in secs or not isinstance(fields, dict):
            raise ConfigError(f"zhtune {command} has no section {sname!r}")
        hints = typing.get_type_hints(secs[sname])
        defaults = {f.name: default_of(f) for f in dataclasses.fields(secs[sname]) if f.init}
        for key, value in fields.items():
            if own.get(key) != sname:
                raise ConfigError(f"zhtune {command} has no option {key!r} in section {sname}")
            kind, optional, _ = kind_of(hints[key])
            if value is None or value == "" and (optional or kind in ("list", "dict")):
                continue
            if kind == "list" and isinstance(value, str) and holds_mappings(hints[key]):
                value = parse_yaml(
                    value, key
                )  # a list of mappings (pipeline stages, eval tasks) is YAML text
            typed = coerce(value, hints[key], key)
            if typed != defaults[key]:
                given.setdefault(sname, {})[key] = typed
    return given


def build_given(command: str, given: dict[str, dict[str, Any]]) -> Config:
    """The command's config from given values, built and checked exactly as the command line builds it."""
    secs, _ = sections(command)
    return build(secs, {k: v for fields in given.values() for k, v in fields.items()})


def to_yaml(given: dict[str, dict[str, Any]]) -> str:
    return yaml.safe_dump(given, sort_keys=False, allow_unicode=True, default_flow_style=False)


def flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(flag_value(v) for v in value)
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip()
    return str(value)


def command_line(command: str, given: dict[str, dict[str, Any]]) -> str:
    """The equivalent shell command, every value quoted for a POSIX shell (it is shown, never run)."""
    parts = ["zhtune", *command.split()]
    for fields in given.values():
        for key, value in fields.items():
            parts += [f"--{key}", flag_value(value)]
    return shlex.join(parts)
