"""Declaring config fields once: a default, a type, allowed values, a one-line meaning.

The user's surface is an `ml_collections.ConfigDict` (configs/*.py, `--config.a.b=value`). What
its fields are is declared here, in `Section`s of `Field`s, by the module that reads them: the
towers declare `model.image` / `model.text`, each data source its `data.*` fields, each
evaluator its settings, the trainer its own sections (`clipjax.config` assembles them). From
one declaration come

  * the defaults (`Section.to_config()`, behind `clipjax.config.default_config()`),
  * the checks (`Section.read()`: unknown keys, types, choices, bounds; one line naming the key),
  * the values the builders use (`read()` fills what a partial section leaves out), and
  * the field table of docs/configs.md (`Section.markdown_rows()`).

So no builder restates a default, and a field cannot be accepted by one place and rejected by
another. A field whose default is None is a typed placeholder: "not set, use the variant's (or
the tower's) value"; the command line can still set it.

A section may hold fields of several kinds of one thing (`model.image` has ViT and ResNet
fields): each field names the kinds that read it, and a field of another kind is tolerated, so
switching `kind` on the command line does not make the base config invalid.

This module imports nothing from clipjax, so every layer can declare its fields here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Callable, Iterable, Mapping

import ml_collections
from ml_collections import config_dict


class ConfigError(ValueError):
    """A config mistake; the message is one line that names the key."""


@dataclasses.dataclass(frozen=True)
class Field:
    """One config value. `type` is needed only when `default` is None (a placeholder)."""

    default: Any
    doc: str
    type: Any = None
    choices: tuple = ()
    minimum: float | None = None
    check: Callable[[Any], str | None] | None = None  # returns what is wrong, or None
    kinds: tuple[str, ...] = ()  # the section kinds that read it (all when empty)

    def value_type(self):
        if self.type is not None:
            return self.type
        return type(self.default)

    def config_value(self):
        if self.default is None:
            # A typed slot, so `--config.x.y=...` can still set it.
            return config_dict.placeholder(self.value_type())
        return self.default

    def validate(self, path: str, value: Any) -> Any:
        """The value as the code should use it (ints as floats where a float is declared)."""
        if value is None:
            if self.default is None:
                return None
            raise ConfigError(f"{path}: must be set (default {self.default!r})")
        expected = self.value_type()
        value = _coerce(path, value, expected)
        if not is_finite(value):
            # NaN slips through every bound (`nan < minimum` is False) and inf through most; either
            # one in a learning rate or a decay turns every parameter into NaN at the first step.
            raise ConfigError(f"{path}: must be a finite number, got {value!r}")
        if self.choices and value not in self.choices:
            raise ConfigError(f"{path}: {value!r} is not one of {tuple(self.choices)}")
        if self.minimum is not None and isinstance(value, (int, float)) and value < self.minimum:
            raise ConfigError(f"{path}: {value!r} is below the minimum {self.minimum:g}")
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise ConfigError(f"{path}: {problem}, got {value!r}")
        return value


def _coerce(path: str, value: Any, expected) -> Any:
    if expected is object:
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected True or False, got {value!r}")
        return value
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if expected is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
            raise ConfigError(f"{path}: expected a sequence, got {value!r}")
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return value


def is_finite(value: Any) -> bool:
    """False when `value` is, or holds at any depth (tuples, rules), a NaN or an infinity."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (tuple, list)):
        return all(is_finite(v) for v in value)
    if isinstance(value, Mapping):
        return all(is_finite(v) for v in value.values())
    return True


# Names other trainers give some of these fields, by the field they mean here: spelling alone
# points `learning_rate` at `name`. Only names whose meaning is a field of the schema are listed.
SYNONYMS = {
    "learning_rate": "lr",
    "base_lr": "lr",
    "peak_lr": "lr",
    "max_lr": "lr",
    "wd": "weight_decay",
    "l2": "weight_decay",
    "batch": "batch_size",
    "bs": "batch_size",
    "global_batch_size": "batch_size",
    "train_batch_size": "batch_size",
    "epoch": "epochs",
    "num_epochs": "epochs",
    "n_epochs": "epochs",
    "num_steps": "steps",
    "total_steps": "steps",
    "train_steps": "steps",
    "max_steps": "steps",
    "iterations": "steps",
    "warmup": "warmup_fraction",
    "warmup_ratio": "warmup_fraction",
    "beta1": "b1",
    "beta2": "b2",
    "epsilon": "eps",
    "grad_clip": "clip_norm",
    "max_grad_norm": "clip_norm",
    "gradient_clipping": "clip_norm",
    "optimizer": "name",
    "num_workers": "worker_count",
    "workers": "worker_count",
    "save_every": "checkpoint_every",
    "ckpt_every": "checkpoint_every",
    "image_resolution": "image_size",
    "resolution": "image_size",
    "img_size": "image_size",
    "embedding_dim": "embed_dim",
    "projection_dim": "embed_dim",
    "num_heads": "heads",
    "num_layers": "depth",
    "layers": "depth",
    "hidden_size": "width",
    "intermediate_size": "mlp_dim",
    "random_seed": "seed",
}


def suggest(key: str, known: Iterable[str]) -> str | None:
    """The known (dotted) key that the unknown `key` most likely meant: by meaning (`SYNONYMS`),
    then by spelling, in `key`'s own section first, then anywhere; None when nothing is close."""
    known = sorted(known)
    parent, _, leaf = key.rpartition(".")
    siblings = [k for k in known if k.rpartition(".")[0] == parent]
    for name in (SYNONYMS.get(leaf.lower()), leaf):
        if name is None:
            continue
        same_section = f"{parent}.{name}" if parent else name
        if same_section in known and same_section != key:
            return same_section
        elsewhere = [k for k in known if k.endswith("." + name) and k != key]
        if elsewhere:  # `model.heads`: of `model.image.heads` and `evals.x.heads`, the nearer
            return difflib.get_close_matches(key, elsewhere, n=1, cutoff=0.0)[0]
    for pool in (siblings, known):
        close = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
        if close:
            return close[0]
    return None


def positive_ints(value) -> str | None:
    """A check: a non-empty sequence of positive integers."""
    if not value or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
        return "expected a non-empty sequence of positive integers"
    return None


@dataclasses.dataclass
class Section:
    """Fields and sub-sections of one config section.

    `open_sections`: the section also holds sub-sections under names of the user's choosing,
    each read by `open_sections(name, values, path)` (config.evals: named evaluators).
    """

    fields: dict[str, Field | Section]
    doc: str = ""
    open_sections: Callable[[str, Any, str], dict] | None = None

    def to_config(self) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        for name, item in self.fields.items():
            c[name] = item.to_config() if isinstance(item, Section) else item.config_value()
        return c

    def read(self, values: Any, path: str = "", *, kind: str | None = None) -> dict:
        """Check `values` (a ConfigDict, dict or None) and return it complete, as a plain dict.

        `kind`: fields declared for other kinds are tolerated but not returned.
        """
        items = _items(values, path)
        out: dict[str, Any] = {}
        for name, value in items.items():
            key = f"{path}.{name}" if path else name
            item = self.fields.get(name)
            if item is None:
                if self.open_sections is not None and _is_section(value):
                    out[name] = self.open_sections(name, value, key)
                    continue
                raise ConfigError(f"{key}: unknown key{self._hint(name)}")
            if isinstance(item, Section):
                out[name] = item.read(value, key)
            elif kind is None or not item.kinds or kind in item.kinds:
                out[name] = item.validate(key, value)
        for name, item in self.fields.items():
            if name in out or name in items:
                continue
            if isinstance(item, Section):
                out[name] = item.read(None, f"{path}.{name}" if path else name)
            elif kind is None or not item.kinds or kind in item.kinds:
                out[name] = item.default
        return out

    def _hint(self, name: str) -> str:
        close = suggest(name, self.fields)
        if close:
            return f" (did you mean '{close}'?)"
        return f" (known: {', '.join(sorted(self.fields))})"

    def markdown_rows(self, path: str = "") -> list[str]:
        """'| key | default | meaning |' rows for every field, depth first."""
        rows = []
        for name, item in self.fields.items():
            key = f"{path}.{name}" if path else name
            if isinstance(item, Section):
                if item.doc:
                    rows.append(f"| `{key}.*` | | {item.doc} |")
                rows.extend(item.markdown_rows(key))
                continue
            default = "unset" if item.default is None else f"`{item.default!r}`"
            extra = []
            if item.choices:
                # An empty choice would print as two backticks, which Markdown does not show as ''.
                extra.append("one of " + ", ".join(f"`{c}`" if c != "" else "`''`" for c in item.choices))
            if item.kinds:
                extra.append("for " + ", ".join(item.kinds))
            doc = item.doc + (f" ({'; '.join(extra)})" if extra else "")
            doc = doc.replace("|", "\\|")
            rows.append(f"| `{key}` | {default} | {doc} |")
        return rows


def _is_section(value) -> bool:
    return isinstance(value, (Mapping, ml_collections.ConfigDict))


def _items(values: Any, path: str) -> dict:
    if values is None:
        return {}
    if isinstance(values, ml_collections.ConfigDict):
        return {k: values[k] for k in values.keys()}
    if isinstance(values, Mapping):
        return dict(values)
    raise ConfigError(f"{path or 'config'}: expected a section of settings, got {values!r}")


def merge_kinds(by_kind: Mapping[str, Mapping[str, Field]]) -> dict[str, Field]:
    """One field table for a section read by several kinds (`model.image`: vit, resnet).

    A field that only some kinds read is tagged with them. A field that several kinds read with
    different defaults becomes a placeholder: each kind fills in its own default when unset.
    """
    names: dict[str, list[tuple[str, Field]]] = {}
    for kind, fields in by_kind.items():
        for name, f in fields.items():
            names.setdefault(name, []).append((kind, f))
    out = {}
    for name, entries in names.items():
        kinds = tuple(k for k, _ in entries)
        first = entries[0][1]
        defaults = {repr(f.default) for _, f in entries}
        choices = tuple(dict.fromkeys(c for _, f in entries for c in f.choices))
        doc = first.doc if len(entries) == 1 else " / ".join(dict.fromkeys(f.doc for _, f in entries))
        if len(defaults) > 1:
            doc += (
                " (unset: "
                + "; ".join(
                    f"{k} {f.default!r}" if f.default is not None else f"{k} from its variant"
                    for k, f in entries
                )
                + ")"
            )
        out[name] = dataclasses.replace(
            first,
            default=first.default if len(defaults) == 1 else None,
            type=first.value_type(),
            choices=choices,
            doc=doc,
            # Each kind checks its own values when it reads them (`read(kind=...)` of its table).
            check=first.check if len(entries) == 1 else None,
            kinds=kinds if len(kinds) < len(by_kind) else (),
        )
    return out


def read_kind(section: Section, own_fields: Mapping[str, Field], kind: str, values: Any, path: str) -> dict:
    """Read a multi-kind section (see `merge_kinds`) as `kind` sees it.

    Unknown keys and types are checked against the whole section (fields of other kinds are
    tolerated and dropped); then every field of `kind` is checked against its own declaration
    (its own choices and checks) and filled with its own default where unset.
    """
    merged = section.read(values, path, kind=kind)
    out = {}
    for name, f in own_fields.items():
        value = merged.get(name)
        out[name] = f.default if value is None else f.validate(f"{path}.{name}", value)
    return out
