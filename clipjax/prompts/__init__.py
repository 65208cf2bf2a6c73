"""Zero-shot class names and prompt templates published by CLIP's authors, shipped as package data.

- `imagenet_classes.txt`: the 1000 ImageNet-1k names of CLIP's "Prompt Engineering for ImageNet"
  notebook, in label order (the sorted WordNet ids, tfds `imagenet2012`'s order). Copied verbatim,
  including its two duplicate pairs ("missile" at 657/744, "sunglasses" at 836/837): every published
  CLIP ImageNet number was measured with them, so they are kept for comparability.
- `imagenet_wnids.txt`: the 1000 WordNet ids in the same order, to map datasets whose labels are wnids.
- `imagenet_templates.txt` (80) and `cifar_templates.txt` (18): CLIP's template ensembles.
- `dataset_templates.json`: {tfds dataset name: templates} from CLIP's `data/prompts.md`.

`zero_shot_prompts(dataset, tfds_class_names)` picks the (class names, templates) for a tfds dataset.
"""

from __future__ import annotations

import functools
import json
import re
from importlib.resources import files

_WNID = re.compile(r"n\d{8}")
# templates() aliases: the CIFAR datasets share one template list.
_ALIASES = {"cifar10": "cifar", "cifar100": "cifar"}


def _lines(filename: str) -> tuple[str, ...]:
    text = files(__package__).joinpath(filename).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@functools.cache
def _class_names() -> tuple[str, ...]:
    return _lines("imagenet_classes.txt")


@functools.cache
def _wnids() -> tuple[str, ...]:
    return _lines("imagenet_wnids.txt")


@functools.cache
def _wnid_to_name() -> dict[str, str]:
    return dict(zip(_wnids(), _class_names(), strict=True))


@functools.cache
def _dataset_templates() -> dict[str, tuple[str, ...]]:
    text = files(__package__).joinpath("dataset_templates.json").read_text(encoding="utf-8")
    return {name: tuple(ts) for name, ts in json.loads(text).items()}


@functools.cache
def _templates(name: str) -> tuple[str, ...]:
    if name == "imagenet":
        return _lines("imagenet_templates.txt")
    if name == "cifar":
        return _lines("cifar_templates.txt")
    if name in _dataset_templates():
        return _dataset_templates()[name]
    known = ["imagenet", "cifar", *sorted(_dataset_templates())]
    raise ValueError(f"no prompt templates named {name!r}; known: {', '.join(known)}")


def imagenet_class_names() -> list[str]:
    """CLIP's 1000 ImageNet-1k class names, in label (sorted-wnid) order."""
    return list(_class_names())


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in label order (n01440764 ... n15075141)."""
    return list(_wnids())


def templates(name: str) -> list[str]:
    """Prompt templates ("{}" marks the class name): "imagenet" (80), "cifar" (18, also "cifar10" and
    "cifar100"), or a dataset named in dataset_templates.json (food101, oxford_iiit_pet, caltech101, stl10)."""
    return list(_templates(_ALIASES.get(name, name)))


def _base_name(dataset: str) -> str:
    """'imagenet_v2/matched-frequency:3.0.0' -> 'imagenet_v2'; 'cifar100:3.0.2' -> 'cifar100'."""
    return dataset.split(":", 1)[0].split("/", 1)[0].strip().lower()


def _spaced(names: list[str]) -> list[str]:
    return [name.replace("_", " ") for name in names]


def zero_shot_prompts(dataset: str, tfds_class_names: list[str]) -> tuple[list[str], list[str]]:
    """(class names, templates) for zero-shot classification on tfds `dataset` (a name that may carry a
    config and version) whose label names are `tfds_class_names`, in label order.

    - cifar10 / cifar100 and the datasets of dataset_templates.json: the dataset's own names, underscores
      as spaces, with their CLIP templates.
    - labels that are all WordNet ids (imagenet2012, imagenet_v2, imagenet_a, imagenet_r, imagenet_sketch,
      imagenet2012_real, imagenet_lt, ...; 200-class subsets too): each mapped to CLIP's name for it, with
      the 80 ImageNet templates. A wnid outside ImageNet-1k raises a ValueError naming the dataset.
    - an imagenet* dataset with exactly 1000 labels that are not wnids: CLIP's names by label index.
    - anything else: the dataset's own names, underscores as spaces, with the 80 ImageNet templates.
    """
    base = _base_name(dataset)
    names = list(tfds_class_names)
    if base in _ALIASES or base in _dataset_templates():
        return _spaced(names), templates(base)
    if names and all(_WNID.fullmatch(name) for name in names):
        table = _wnid_to_name()
        unknown = [name for name in names if name not in table]
        if unknown:
            shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            raise ValueError(
                f"dataset {dataset!r}: {len(unknown)} label wnid(s) not in ImageNet-1k's 1000: {shown}"
            )
        return [table[name] for name in names], templates("imagenet")
    if base.startswith("imagenet") and len(names) == 1000:
        return imagenet_class_names(), templates("imagenet")
    return _spaced(names), templates("imagenet")
