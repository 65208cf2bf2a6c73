"""`config.evals` declared, and the runner that builds its evaluators and merges their reports."""

from __future__ import annotations

from typing import Any

from clipjax.evals.base import EVALUATORS, EvalData, SkipEvaluation, instance_section, read_instance
from clipjax.evals.encoders import Encoders
from clipjax.models.two_towers import NoTextTower
from clipjax.schema import Field, Section

COMMON_FIELDS: dict[str, Field] = {
    "at_end": Field(True, "evaluate at the end of training (report.json)"),
    "every": Field(
        0,
        "also evaluate every N steps, logged as eval/... scalars (0: only at the end); "
        "evals.<name>.every sets one evaluator's own cadence",
        minimum=0,
    ),
    "batch_size": Field(500, "examples per encoder call", minimum=1),
    "max_examples": Field(2000, "held-out examples evaluated (0: the whole test split)", minimum=0),
}
# The evaluators every config has (name = kind); users add more sections with their own names.
DEFAULT_EVALUATORS = {
    "zero_shot": True,
    "retrieval": True,
    "linear_probe": True,
    "knn": True,
    "embedding": True,
    "classification": False,
    # Models with a captioning decoder (model.decoder) switch it on: configs/coca_demo.py.
    "captioning": False,
    # A ViT's patch tokens probed per patch where the source has object masks (shapes):
    # configs/siglip2_demo.py switches it on.
    "dense_probe": False,
}


def evals_section() -> Section:
    from clipjax.evals import caption_retrieval, classification

    fields: dict[str, Any] = dict(COMMON_FIELDS)
    for name, enabled in DEFAULT_EVALUATORS.items():
        fields[name] = instance_section(name, enabled=enabled)
    # The published benchmarks, off until enabled (`evals.cifar10.enabled=True`, `evals.coco...`).
    for kind, sections in (
        ("classification", classification.benchmark_sections()),
        ("caption_retrieval", caption_retrieval.benchmark_sections()),
    ):
        for name, defaults in sections.items():
            fields[name] = instance_section(kind, enabled=False, defaults=defaults)
    return Section(
        fields,
        doc="evaluation; each named section is an evaluator (`kind`, `enabled`, its settings)",
        open_sections=read_instance,
    )


def enabled_evaluators(evals_config: Any) -> dict[str, dict[str, Any]]:
    """{section name: settings} of the enabled evaluators, checked against their declarations."""
    values = evals_section().read(evals_config, "evals")
    return {name: v for name, v in values.items() if isinstance(v, dict) and v["enabled"]}


def check_evaluators(config: Any) -> None:
    """Each enabled evaluator's own checks (a dataset that is not prepared, ...)."""
    for name, settings in enabled_evaluators(config.evals).items():
        EVALUATORS[settings["kind"]].check(settings, config, f"evals.{name}")


def _merge(into: dict, other: dict) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


class EvalRunner:
    """Builds the enabled evaluators once; `run(...)` evaluates one set of parameters.

    An evaluator that cannot evaluate (no labels, no class names: `SkipEvaluation`) is named
    with its reason in the log and under `skipped` in the report, never dropped in silence."""

    def __init__(self, config: Any, source, tokenizer, *, log=None):
        self.config, self.tokenizer = config, tokenizer
        self.log = log or (lambda line: None)
        self._skips_logged: set[str] = set()
        self.data = EvalData(source, tokenizer, max_examples=config.evals.max_examples)
        self.evaluators = [
            EVALUATORS[settings["kind"]](name, settings, self.data, config, log=self.log)
            for name, settings in enabled_evaluators(config.evals).items()
        ]

    def _every(self, evaluator) -> int:
        return evaluator.settings["every"] or self.config.evals.every

    @property
    def periodic(self) -> bool:
        """Whether any evaluator runs during training."""
        return any(self._every(e) for e in self.evaluators)

    def due(self, step: int) -> list:
        """The evaluators whose cadence (`evals.<name>.every`, else `evals.every`) falls on `step`."""
        return [e for e in self.evaluators if self._every(e) and step % self._every(e) == 0]

    def run(self, graphdef, params, mesh, step: int, evaluators=None) -> dict:
        """The report of `evaluators` (default: all enabled ones) on `params`."""
        encoders = Encoders(graphdef, params, mesh, self.tokenizer, batch_size=self.config.evals.batch_size)
        report: dict = {"step": int(step)}
        for evaluator in self.evaluators if evaluators is None else evaluators:
            try:
                _merge(report, evaluator.run(encoders))
            except (SkipEvaluation, NoTextTower) as skip:
                if evaluator.name not in self._skips_logged:  # periodic evaluations: once
                    self._skips_logged.add(evaluator.name)
                    self.log(f"evals.{evaluator.name} skipped: {skip}")
                report.setdefault("skipped", {})[evaluator.name] = str(skip)
        return report
