"""Host-side collapse detector fed the embedding metrics each time they are computed.

Dimensional collapse: the embeddings use few directions. Flagged when the effective rank is
below `min_rank_fraction` of the rank the batch can show (min(d, B - 1)), or when it fell by more
than `max_drop` of its peak over the last `window` measurements.
Complete collapse: every input maps to (nearly) the same point. Flagged when the effective rank
is <= `complete_rank` or when the uniformity is above `max_uniformity` (log mean exp(-2 d^2) -> 0
as all distances -> 0; spread unit vectors read about -2 to -4).

Untrained towers often start collapsed (a random CNN maps all images to nearby points) and the
rank moves fast while the temperature settles, so nothing is judged during the first `warmup`
measurements, and a condition must hold for `patience` consecutive measurements before it fires.
Each condition fires once; `fired` maps its name to the step where it did.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Mapping

from clipjax.metrics.embedding import MODALITIES
from clipjax.schema import Field

# The alarm's thresholds, as `config.metrics.*` declares them.
ALARM_FIELDS: dict[str, Field] = {
    "min_rank_fraction": Field(
        0.1, "dimensional collapse: effective rank below this x min(d, B - 1)", minimum=0.0
    ),
    "max_drop": Field(
        0.5, "dimensional collapse: rank fell by more than this share of its peak in `window`", minimum=0.0
    ),
    "window": Field(10, "measurements the rank drop is judged over", minimum=1),
    "warmup": Field(5, "measurements not judged at all", minimum=0),
    "patience": Field(2, "a condition must hold this many measurements in a row", minimum=1),
    "complete_rank": Field(1.5, "complete collapse: effective rank at or below this"),
    "max_uniformity": Field(-0.05, "complete collapse: uniformity above this (spread vectors: -2 to -4)"),
}
DEFAULTS = {name: f.default for name, f in ALARM_FIELDS.items()}


class CollapseAlarm:
    """`update(step, metrics) -> warning lines`; `fired`, `complete` and `dimensional` for the trainer."""

    def __init__(
        self,
        *,
        dim: int | None = None,
        batch_size: int | None = None,
        min_rank_fraction: float = DEFAULTS["min_rank_fraction"],
        max_drop: float = DEFAULTS["max_drop"],
        window: int = DEFAULTS["window"],
        warmup: int = DEFAULTS["warmup"],
        patience: int = DEFAULTS["patience"],
        complete_rank: float = DEFAULTS["complete_rank"],
        max_uniformity: float = DEFAULTS["max_uniformity"],
        modalities: tuple[str, ...] = MODALITIES,
    ):
        if window < 1 or patience < 1 or warmup < 0:
            raise ValueError(
                f"CollapseAlarm: window ({window}) and patience ({patience}) must be >= 1, "
                f"warmup ({warmup}) >= 0"
            )
        self.dim, self.batch_size = dim, batch_size
        self.min_rank_fraction, self.max_drop, self.window = min_rank_fraction, max_drop, window
        self.warmup, self.patience = warmup, patience
        self.complete_rank, self.max_uniformity = complete_rank, max_uniformity
        self.modalities = tuple(modalities)
        self.fired: dict[str, int] = {}
        self.measurements = 0
        self._ranks = {m: collections.deque(maxlen=window) for m in self.modalities}
        self._streak: dict[str, int] = collections.defaultdict(int)

    @property
    def complete(self) -> bool:
        return any(name.startswith("complete") for name in self.fired)

    @property
    def dimensional(self) -> bool:
        return any(name.startswith("dimensional") for name in self.fired)

    def _rank_ceiling(self, modality: str, metrics: Mapping[str, Any]) -> int | None:
        dim = self.dim
        spectrum = metrics.get(f"{modality}_spectrum")
        if dim is None and spectrum is not None:
            dim = len(spectrum)
        if dim is None:
            return None
        # A batch of B centered points spans at most B - 1 directions.
        return dim if self.batch_size is None else min(dim, self.batch_size - 1)

    def _conditions(self, modality: str, metrics: Mapping[str, Any]):
        """(name, holds, message) for every rule whose metric is present this time."""
        rank_key, unif_key = f"{modality}_effective_rank", f"{modality}_uniformity"
        rank = _finite(metrics.get(rank_key))
        if rank is not None:
            yield (
                f"complete_rank:{modality}",
                rank <= self.complete_rank,
                f"complete collapse of {modality} embeddings: {rank_key}={rank:.4g} <= {self.complete_rank:g}",
            )
            ceiling = self._rank_ceiling(modality, metrics)
            if ceiling is not None:
                floor = self.min_rank_fraction * ceiling
                yield (
                    f"dimensional_rank:{modality}",
                    rank < floor,
                    f"dimensional collapse of {modality} embeddings: {rank_key}={rank:.4g} < {floor:.4g} "
                    f"(min_rank_fraction {self.min_rank_fraction:g} x {ceiling} dims)",
                )
            history = self._ranks[modality]
            if history:
                peak = max(history)
                drop = 1.0 - rank / peak if peak > 0 else 0.0
                yield (
                    f"dimensional_drop:{modality}",
                    drop > self.max_drop,
                    f"dimensional collapse of {modality} embeddings: {rank_key}={rank:.4g} fell {drop:.0%} "
                    f"from {peak:.4g} within the last {len(history)} measurements (max_drop {self.max_drop:.0%})",
                )
        uniformity = _finite(metrics.get(unif_key))
        if uniformity is not None:
            yield (
                f"complete_uniformity:{modality}",
                uniformity > self.max_uniformity,
                f"complete collapse of {modality} embeddings: {unif_key}={uniformity:.4g} > {self.max_uniformity:g} "
                "(points nearly coincide)",
            )

    def update(self, step: int, metrics: Mapping[str, Any]) -> list[str]:
        """Record one measurement; return a line for each condition that fires for the first time."""
        judged = self.measurements >= self.warmup
        self.measurements += 1
        lines = []
        for modality in self.modalities:
            for name, holds, message in self._conditions(modality, metrics):
                self._streak[name] = self._streak[name] + 1 if (holds and judged) else 0
                if self._streak[name] >= self.patience and name not in self.fired:
                    self.fired[name] = int(step)
                    lines.append(f"step {int(step)}: {message}")
            rank = _finite(metrics.get(f"{modality}_effective_rank"))
            if rank is not None:
                self._ranks[modality].append(rank)
        return lines


def _finite(value) -> float | None:
    """A plain float, or None for a missing or non-finite value (no rule judges a NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
