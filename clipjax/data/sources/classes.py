"""Class names and zero-shot prompts of labelled data, for the sources that read labels
(image_text_folder, webdataset, tfds): the `data.class_names` and `data.zero_shot_templates`
fields they share, and the zero-shot task built from them."""

from __future__ import annotations

from clipjax import prompts
from clipjax.schema import ConfigError, Field


def templates_problem(value: str) -> str | None:
    if "{}" in value or not value:
        return None
    try:
        prompts.templates(value)
    except ValueError as e:
        return str(e)
    return None


FIELDS = {
    "class_names": Field(
        "", "comma-separated class names of numeric labels, in label order (named labels name themselves)"
    ),
    "zero_shot_templates": Field(
        "imagenet",
        "zero-shot prompts: a published ensemble (`imagenet`: CLIP's 80, `cifar`, ...) or "
        "'|'-separated templates with {} for the class name",
        check=templates_problem,
    ),
}
DEFAULT_TEMPLATES = FIELDS["zero_shot_templates"].default


def check_config(data_config) -> None:
    """The templates' check (a field several sources declare is checked by each of them)."""
    problem = templates_problem(str(data_config.zero_shot_templates))
    if problem:
        raise ConfigError(f"data.zero_shot_templates: {problem}")


def class_names(data_config) -> list[str]:
    """`data.class_names` as a list (empty when not given)."""
    return [n.strip() for n in str(data_config.class_names).split(",") if n.strip()]


def templates(spec: str) -> list[str]:
    """The prompts of `data.zero_shot_templates`: its own '|'-separated ones, or a published set."""
    if "{}" in spec:
        return [t.strip() for t in spec.split("|") if t.strip()]
    return prompts.templates(spec)


def label_task(names, spec: str) -> dict[str, tuple[list[str], list[str]]]:
    """{'label': (class names, prompts)}, the zero-shot task of the `label` field; {} without names."""
    names = list(names)
    if not names:
        return {}
    return {"label": ([n.replace("_", " ") for n in names], templates(spec))}
