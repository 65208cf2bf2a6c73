"""Drop accounting, the same for every source: undecodable examples are counted by reason, and a
data set that is mostly broken stops the run with one line (`BadDataError`).

The reasons: `bad_caption` (none, blank, or not UTF-8), `missing_image`, `bad_image` (cannot be
decoded), `bad_image_shape`, `bad_box` (an object box that is not four fractions
x_min <= x_max, y_min <= y_max in [0, 1]), and for tar shards `truncated_shard` and `unreadable_shard`
(`clipjax.data.sources.webdataset`).
"""

from __future__ import annotations

import collections
from typing import Any


class DropCounter:
    """Folds the drops of each decoded chunk into `counts` ({reason: examples}).

    With `max_bad_fraction` set, raises once at least `min_seen` records have gone by and more
    than that fraction of them, and more than `MIN_ALLOWED` records, could not be decoded: a
    data set that is mostly broken should stop training, not quietly shrink it, while a small
    folder with a few bad files should not. The error says how many, why, and which records.
    """

    MIN_ALLOWED = 20
    EXAMPLES = 5

    def __init__(self, max_bad_fraction: float | None = None, min_seen: int = 1000):
        self.counts: collections.Counter = collections.Counter()
        self.examples: list[tuple[int, str]] = []
        self.kept = 0
        self.max_bad_fraction = max_bad_fraction
        self.min_seen = min_seen

    @classmethod
    def for_training(cls, data_config, records: int) -> DropCounter:
        """A training stream's counter, `records` a process reads per epoch: it stops the run
        past `data.max_bad_fraction`."""
        max_bad = data_config.max_bad_fraction
        return cls(None if max_bad is None else float(max_bad), min_seen=min(1000, max(records, 1)))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def state(self, counts=None, kept: int | None = None) -> dict:
        """The counts as the iterator's state saves them (`counts`, `kept`: at another position)."""
        counts = self.counts if counts is None else counts
        return {
            "counts": {k: int(v) for k, v in sorted(counts.items()) if v},
            "kept": int(self.kept if kept is None else kept),
        }

    def restore(self, state: dict | None) -> None:
        """Continue counting from a saved `state()` (None, as in states of earlier versions: 0)."""
        state = state or {}
        self.counts = collections.Counter({k: int(v) for k, v in state.get("counts", {}).items()})
        self.kept = int(state.get("kept", 0))

    def __call__(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """A decoded chunk (`clipjax.data.decode.Decoder`) without its '_dropped', counted."""
        chunk = dict(chunk)
        dropped = chunk.pop("_dropped")
        self.examples.extend((name, why) for _, name, why in dropped[: self.EXAMPLES - len(self.examples)])
        self.counts.update(why for _, _, why in dropped)
        self.kept += len(chunk["index"])
        seen = self.kept + self.total
        if (
            self.max_bad_fraction is not None
            and seen >= self.min_seen
            and self.total > max(self.max_bad_fraction * seen, self.MIN_ALLOWED)
        ):
            which = ", ".join(f"record {i} ({reason})" for i, reason in self.examples)
            raise BadDataError(
                f"{self.total} of {seen} records could not be decoded ({dict(self.counts)}), more than "
                f"data.max_bad_fraction={self.max_bad_fraction} of them; first: {which}"
            )
        return chunk


class BadDataError(ValueError):
    """Too much of the data cannot be decoded; the message is one line."""
