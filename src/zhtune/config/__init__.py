"""Typed configuration: YAML recipes plus ``--key value`` overrides (see parse.py, args.py)."""

from zhtune.config.parse import Config, build, parse_cli, save_config
from zhtune.errors import ConfigError

__all__ = ["Config", "ConfigError", "build", "parse_cli", "save_config"]
