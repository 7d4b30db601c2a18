"""Environment-variable configuration helpers (every setting is documented in README.md)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

DEFAULT_DATA_DIR = "/var/lib/modelserve-edge"


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def env_str(name: str, default: str | None = None, env: Mapping[str, str] | None = None) -> str | None:
    value = _env(env).get(name, "")
    return value if value != "" else default


def _env_number(name, default, env, minimum, parse, expected):
    # One reader for env_int and env_float: unset -> default, unparsable or below minimum -> ConfigError.
    raw = env_str(name, None, env)
    if raw is None:
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected {expected}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value}: must be >= {minimum}")
    return value


def env_int(
    name: str, default: int, env: Mapping[str, str] | None = None, *, minimum: int | None = None
) -> int:
    return _env_number(name, default, env, minimum, int, "an integer")


def env_float(
    name: str, default: float | None, env: Mapping[str, str] | None = None, *, minimum: float | None = None
) -> float | None:
    return _env_number(name, default, env, minimum, float, "a number")


def env_bool(name: str, default: bool, env: Mapping[str, str] | None = None) -> bool:
    raw = env_str(name, None, env)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r}: expected true/false")


def data_dir(env: Mapping[str, str] | None = None) -> str:
    return env_str("EDGE_DATA_DIR", DEFAULT_DATA_DIR, env)


def setup_logging(module: str, env: Mapping[str, str] | None = None) -> None:
    level = (env_str("EDGE_LOG_LEVEL", "INFO", env) or "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format=f"%(asctime)s {module} %(levelname)s %(name)s: %(message)s",
    )
