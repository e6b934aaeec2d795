"""One syntax for every command: an optional YAML recipe, then ``--key value`` overrides.

A command declares its configuration as named sections, each a dataclass whose fields carry a
``help`` text in their metadata (see :mod:`zhtune.config.args`). Keys are flat and unique across
sections, so the flag names people know from Hugging Face and the Chinese-LLaMA-Alpaca scripts work
as written (``--lora_rank 8 --per_device_train_batch_size 4``). A YAML file may be flat or grouped by
section (``model: {...}``, ``lora: {...}``); both resolve to the same config.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from zhtune.errors import ConfigError

TRUE = {"true", "1", "yes", "y", "on"}
FALSE = {"false", "0", "no", "n", "off"}


def field(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, **meta: Any) -> Any:
    """A dataclass field with its help text (shown by ``--help``)."""
    metadata = {"help": help, **meta}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type."""
    inner, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"--{key} needs a value")
    origin = get_origin(inner)
    if inner is Any:
        return value
    if origin is Literal:
        choices = get_args(inner)
        if value not in choices:
            raise ConfigError(f"--{key} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in TRUE | FALSE:
            return value.lower() in TRUE
        raise ConfigError(f"--{key} takes true or false, got {value!r}")
    if inner is int:
        if isinstance(value, bool):
            raise ConfigError(f"--{key} takes an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{key} takes an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise ConfigError(f"--{key} takes an integer, got {value!r}")
        return int(as_float)
    if inner is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{key} takes a number, got {value!r}") from None
    if inner is str:
        if isinstance(value, (list, dict)):
            raise ConfigError(f"--{key} takes a single string, got {type(value).__name__}")
        return str(value)
    if origin in (list, Sequence, typing.List):  # noqa: UP006
        (item_tp,) = get_args(inner) or (str,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        return [coerce(v, item_tp, key) for v in value]
    if origin in (dict, Mapping) or inner is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"--{key} takes a mapping such as '{{a: 1}}': {e}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"--{key} takes a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"internal: unsupported type {tp} for --{key}")


def _parse_scalar(text: str) -> Any:
    """Command-line values are strings; keep them as strings unless they are YAML scalars of another kind."""
    return text


class Config:
    """A command's resolved configuration: one attribute per section, plus where each value came from.

    A command with a fixed set of sections subclasses it and declares them as class annotations, in order
    (``class SftConfig(Config): model: ModelArgs; data: DataArgs; ...``); :meth:`section_types` reads them
    back and ``build(..., into=SftConfig)`` returns that type.
    """

    def __init__(self, sections: dict[str, Any], source: str | None = None):
        self._sections = sections
        self.source = source
        for name, obj in sections.items():
            setattr(self, name, obj)

    @classmethod
    def section_types(cls) -> dict[str, type]:
        """The sections a subclass declares as annotations, in order (none for a plain Config)."""
        hints = typing.get_type_hints(cls)
        return {name: tp for name, tp in hints.items() if dataclasses.is_dataclass(tp)}

    @property
    def sections(self) -> dict[str, Any]:
        return self._sections

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(obj) for name, obj in self._sections.items()}

    def flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for d in self.to_dict().values():
            out.update(d)
        return out

    def __repr__(self) -> str:
        return f"Config({self.to_dict()!r})"


C = TypeVar("C", bound=Config)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _owner_map(sections: dict[str, type]) -> dict[str, str]:
    owners: dict[str, str] = {}
    for sec, cls in sections.items():
        for name in _fields(cls):
            if name in owners:
                raise RuntimeError(f"option {name} is declared in both {owners[name]} and {sec}")
            owners[name] = sec
    return owners


ALIASES = {
    # spellings from the seed scripts and HF that mean the same option
    "torch_dtype": "dtype",
    "lora_r": "lora_rank",
    "lora_target": "trainable",
    "lora_target_modules": "trainable",
    "target_modules": "trainable",
    "base_model": "model_name_or_path",
    "llama_tokenizer_dir": "base_tokenizer",
    "train_file": "train_files",
    "data_files": "train_files",
    "max_length": "max_seq_length",
    "cutoff_len": "max_seq_length",
    "lora_model": "lora_models",
    "lora_weights": "lora_models",
    "batch_size": "per_device_train_batch_size",
    "micro_batch_size": "per_device_train_batch_size",
    "lr": "learning_rate",
    "epochs": "num_train_epochs",
}


def _collect(
    raw: Mapping[str, Any], sections: dict[str, type], where: str, passthrough: dict[str, set[str]]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Route flat or sectioned keys to their sections. Returns (values, passthrough extras)."""
    owners = _owner_map(sections)
    values: dict[str, dict[str, Any]] = {s: {} for s in sections}
    extras: dict[str, dict[str, Any]] = {s: {} for s in sections}

    def put(key: str, val: Any, forced_section: str | None = None) -> None:
        key = key.lstrip("-").replace("-", "_")
        key = ALIASES.get(key, key) if key not in owners else key
        sec = owners.get(key)
        if sec is not None and (forced_section is None or forced_section == sec):
            values[sec][key] = val
            return
        for s, allowed in passthrough.items():
            if key in allowed and (forced_section is None or forced_section == s):
                extras[s][key] = val
                return
        known = list(owners) + [k for v in passthrough.values() for k in v]
        hint = difflib.get_close_matches(key, known, n=1)
        msg = f"{where}: unknown option {key!r}"
        if hint:
            msg += f" (did you mean --{hint[0]}?)"
        raise ConfigError(msg + "; run with --help to list the options")

    for key, val in raw.items():
        if key in sections and isinstance(val, Mapping):
            for k, v in val.items():
                put(k, v, forced_section=key)
        else:
            put(key, val)
    return values, extras


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a recipe is a mapping of option: value, got {type(data).__name__}")
    return data


def split_argv(argv: Sequence[str], bool_keys: set[str]) -> tuple[list[str], dict[str, Any]]:
    """Split ``[recipe.yaml] --k v --flag --k=v`` into positional args and overrides."""
    positional: list[str] = []
    overrides: dict[str, Any] = {}
    i = 0
    argv = list(argv)
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--") and len(tok) > 2:
            key = tok[2:]
            if "=" in key:
                key, val = key.split("=", 1)
                overrides[key] = val
                i += 1
                continue
            norm = ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if norm in bool_keys and (nxt is None or nxt.startswith("--") or nxt.lower() not in TRUE | FALSE):
                overrides[key] = True
                i += 1
                continue
            if nxt is None:
                raise ConfigError(f"--{key} needs a value")
            overrides[key] = nxt
            i += 2
        else:
            positional.append(tok)
            i += 1
    return positional, overrides


def build(
    sections: dict[str, type],
    values: Mapping[str, Any] | None = None,
    *,
    recipe: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    passthrough: dict[str, set[str]] | None = None,
    into: type[C] = Config,  # type: ignore[assignment]
) -> C:
    """Resolve a config from a recipe file, a dict (flat or sectioned) and overrides, in that order.

    ``passthrough`` names, per section, options that are not fields but go to its ``extra`` mapping as
    they are; ``into`` is the Config subclass to return.
    """
    passthrough = passthrough or {}
    merged: dict[str, dict[str, Any]] = {s: {} for s in sections}
    merged_extra: dict[str, dict[str, Any]] = {s: {} for s in sections}
    layers: list[tuple[Mapping[str, Any], str]] = []
    if recipe is not None:
        layers.append((load_yaml(recipe), str(recipe)))
    if values:
        layers.append((values, "config"))
    if overrides:
        layers.append((overrides, "command line"))
    for raw, where in layers:
        vals, extras = _collect(raw, sections, where, passthrough)
        for s in sections:
            merged[s].update(vals[s])
            merged_extra[s].update(extras[s])
    out: dict[str, Any] = {}
    for s, cls in sections.items():
        hints = typing.get_type_hints(cls)
        kwargs = {k: coerce(v, hints[k], k) for k, v in merged[s].items()}
        if merged_extra[s]:
            if "extra" not in _fields(cls):
                raise ConfigError(f"section {s} takes no extra options")
            kwargs["extra"] = {**kwargs.get("extra", {}), **merged_extra[s]}
        try:
            out[s] = cls(**kwargs)
        except ConfigError as e:
            src = f" (from {recipe})" if recipe else ""
            raise ConfigError(f"{e}{src}") from None
    return into(out, source=str(recipe) if recipe else None)


def format_help(prog: str, description: str, sections: dict[str, type], usage_extra: str = "") -> str:
    lines = [f"usage: {prog} [recipe.yaml] [--option value ...]{usage_extra}", "", description, ""]
    for s, cls in sections.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        lines.append(f"{s} options{': ' + doc if doc else ''}")
        hints = typing.get_type_hints(cls)
        for name, f in _fields(cls).items():
            if name == "extra":
                continue
            tp, _ = _strip_optional(hints[name])
            if get_origin(tp) is Literal:
                tname = "{" + ",".join(map(str, get_args(tp))) + "}"
            elif get_origin(tp) is list:
                tname = "LIST"
            else:
                tname = getattr(tp, "__name__", str(tp)).upper()
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            else:
                default = "required"
            head = f"  --{name} {tname if tname != 'BOOL' else ''}".rstrip()
            lines.append(f"{head:<44} {f.metadata.get('help', '')} [default: {default}]")
        lines.append("")
    lines.append(
        "  --print_config                             Print the resolved configuration as YAML and exit."
    )
    lines.append("")
    lines.append("Options are flat: a recipe may list them at top level or grouped by section.")
    return "\n".join(lines)


def parse_cli(
    argv: Sequence[str] | None,
    sections: dict[str, type],
    *,
    prog: str,
    description: str,
    passthrough: dict[str, set[str]] | None = None,
    max_positional: int = 1,
    into: type[C] = Config,  # type: ignore[assignment]
) -> C:
    """Parse ``[recipe.yaml] --key value ...``; prints help and exits on --help.

    With ``--print_config`` it prints the resolved configuration as YAML (recipe, overrides and defaults,
    grouped by section) and exits, so a recipe can be checked before anything runs.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(format_help(prog, description, sections))
        raise SystemExit(0)
    print_only = "--print_config" in argv
    argv = [a for a in argv if a != "--print_config"]
    bool_keys: set[str] = set()
    for cls in sections.values():
        hints = typing.get_type_hints(cls)
        for name in _fields(cls):
            if _strip_optional(hints[name])[0] is bool:
                bool_keys.add(name)
    positional, overrides = split_argv(argv, bool_keys)
    recipe = None
    if positional:
        if len(positional) > max_positional or not positional[0].endswith((".yaml", ".yml")):
            raise ConfigError(
                f"unexpected argument {positional[0]!r}: {prog} takes an optional recipe.yaml, then --option value pairs"
            )
        recipe = positional[0]
    cfg = build(sections, recipe=recipe, overrides=overrides, passthrough=passthrough, into=into)
    if print_only:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), end="")
        raise SystemExit(0)
    return cfg


def save_config(cfg: Config, path: str | Path, extra: Mapping[str, Any] | None = None) -> None:
    """Write the resolved config (and package versions) as YAML, atomically."""
    from zhtune.atomic import atomic_write_text

    data: dict[str, Any] = dict(cfg.to_dict())
    data["versions"] = versions()
    if extra:
        data.update(extra)
    atomic_write_text(Path(path), yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("zhtune", "torch", "transformers", "peft", "accelerate", "datasets", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
