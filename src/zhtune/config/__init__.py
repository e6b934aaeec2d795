"""Typed configuration: YAML recipes plus ``--key value`` overrides (see parse.py, args.py)."""

from zhtune.config.parse import Config, ConfigError, build, parse_cli, save_config

__all__ = ["Config", "ConfigError", "build", "parse_cli", "save_config"]
