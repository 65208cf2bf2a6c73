"""Reading settings from a config section (ml_collections.ConfigDict or dict)."""

from __future__ import annotations

from typing import Any


def get(config: Any, key: str, default: Any = None) -> Any:
    """config[key] if present, else `default`; works for ConfigDict, dict, objects."""
    if config is None:
        return default
    if hasattr(config, "get"):
        return config.get(key, default)
    return getattr(config, key, default)
