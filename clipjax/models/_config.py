"""Reading tower hyper-parameters out of a ConfigDict section.

Every tower resolves its section (e.g. ``model.image``) into a plain frozen
dataclass up front, so that a typo or an impossible value fails at model
construction with one line naming the config key, instead of deep inside a
traced computation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


class ConfigError(ValueError):
    """A model config value that cannot be used; the message names the key."""


def section_items(cfg: Any) -> dict[str, Any]:
    """The section as a plain dict; None (section absent) reads as empty."""
    if cfg is None:
        return {}
    if isinstance(cfg, Mapping):
        return dict(cfg)
    if hasattr(cfg, "items"):  # ConfigDict / FrozenConfigDict
        return dict(cfg.items())
    raise ConfigError(f"expected a ConfigDict section, got {type(cfg).__name__}")


def check_known_keys(
    items: Mapping[str, Any],
    path: str,
    known: Iterable[str],
    tolerated: Iterable[str] = (),
    what: str = "this section",
) -> None:
    """Rejects keys no tower understands, so that typos do not pass silently.

    ``tolerated`` are keys that belong to a sibling kind (e.g. ViT fields left in
    ``model.image`` after switching ``kind`` to 'resnet' on the command line);
    they are ignored rather than rejected.
    """
    known = set(known)
    tolerated = set(tolerated)
    for key in items:
        if key not in known and key not in tolerated:
            raise ConfigError(f"{path}.{key}: unknown field for {what} (known: {', '.join(sorted(known))})")


def is_unset(key: str, value: Any, zero_unset: Iterable[str] = ()) -> bool:
    """None and '' mean "not set"; so does 0 for keys in ``zero_unset``.

    The project's base config lists every tower field with such a sentinel
    (e.g. ``width = 0``: take it from the variant), so that command-line
    overrides have a typed slot to land in.
    """
    if value is None or (isinstance(value, str) and value == ""):
        return True
    return key in zero_unset and isinstance(value, int) and not isinstance(value, bool) and value == 0


def resolve_variant(
    items: Mapping[str, Any],
    path: str,
    presets: Mapping[str, Mapping[str, Any]],
    default_variant: str | None,
    zero_unset: Iterable[str] = (),
) -> dict[str, Any]:
    """Preset values for ``variant`` overlaid with the explicitly set fields."""
    zero_unset = tuple(zero_unset)
    variant = items.get("variant")
    if is_unset("variant", variant):
        variant = default_variant
    if variant is None:
        base: dict[str, Any] = {}
    else:
        if variant not in presets:
            raise ConfigError(
                f"{path}.variant: unknown variant {variant!r} "
                f"(expected one of {', '.join(repr(k) for k in presets)})"
            )
        base = dict(presets[variant])
    for key, value in items.items():
        if key in ("variant", "kind") or is_unset(key, value, zero_unset):
            continue
        base[key] = value
    base["variant"] = variant
    return base


def require(values: Mapping[str, Any], path: str, key: str) -> Any:
    if values.get(key) is None:
        raise ConfigError(f"{path}.{key}: must be set (no preset variant gives it)")
    return values[key]


def positive_int(values: Mapping[str, Any], path: str, key: str, allow_zero: bool = False) -> int:
    value = require(values, path, key)
    lower = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < lower:
        kind = "non-negative" if allow_zero else "positive"
        raise ConfigError(f"{path}.{key}: expected a {kind} integer, got {value!r}")
    return value


def int_tuple(values: Mapping[str, Any], path: str, key: str, allow_zero: bool = False) -> tuple[int, ...]:
    value = require(values, path, key)
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigError(f"{path}.{key}: expected a sequence of integers, got {value!r}")
    out = tuple(value)
    lower = 0 if allow_zero else 1
    if not out or any(isinstance(v, bool) or not isinstance(v, int) or v < lower for v in out):
        kind = "non-negative" if allow_zero else "positive"
        raise ConfigError(f"{path}.{key}: expected a non-empty sequence of {kind} integers, got {value!r}")
    return out


def choice(values: Mapping[str, Any], path: str, key: str, options: Iterable[str]) -> str:
    value = require(values, path, key)
    options = tuple(options)
    if value not in options:
        raise ConfigError(
            f"{path}.{key}: unknown value {value!r} (expected one of {', '.join(repr(o) for o in options)})"
        )
    return value


def boolean(values: Mapping[str, Any], path: str, key: str) -> bool:
    value = require(values, path, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{path}.{key}: expected True or False, got {value!r}")
    return value


def divisible(width: int, heads: int, path: str, width_key: str, heads_key: str) -> int:
    if width % heads:
        raise ConfigError(f"{path}.{width_key}: {width} is not divisible by {path}.{heads_key}={heads}")
    return width // heads
