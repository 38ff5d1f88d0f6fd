"""Typed reads of config.json keys, shared by ModelConfig's readers (config.py and the per-family
readers beside it): a count must be a JSON integer, a flag a JSON bool; the error names the key."""

from __future__ import annotations

from typing import Any

from graphir.errors import GraphirError


class ConfigError(GraphirError):
    """A model description graphir cannot use; the message is one line."""


def _get(d: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return default


_MISSING = object()


def _value(d: dict[str, Any], keys: str | tuple[str, ...], default: Any) -> tuple[str, Any]:
    names = (keys,) if isinstance(keys, str) else keys
    v = _get(d, *names, default=_MISSING)
    if v is _MISSING:
        if default is _MISSING:
            raise KeyError(names[0])
        return names[0], default
    return next(k for k in names if k in d and d[k] is not None), v


def _int(d: dict[str, Any], keys: str | tuple[str, ...], default: Any = _MISSING) -> int:
    """A count: a JSON integer. 2.5 (or 2.0, or "2") is refused, as transformers' strict
    config classes refuse it, rather than truncated to 2."""
    key, v = _value(d, keys, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{key}: must be an integer, got {v!r}")
    return v


def _real(d: dict[str, Any], keys: str | tuple[str, ...], default: Any = _MISSING) -> float:
    key, v = _value(d, keys, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{key}: must be a number, got {v!r}")
    return float(v)


def _bool(d: dict[str, Any], keys: str | tuple[str, ...], default: Any = _MISSING) -> bool:
    key, v = _value(d, keys, default)
    if not isinstance(v, bool):  # bool("false") is True: never coerce
        raise ConfigError(f"{key}: must be true or false, got {v!r}")
    return v
