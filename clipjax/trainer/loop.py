"""The step loop, with side work as hooks that run every N steps (levanter's `add_hook`).

    trainer = Trainer(train_step, state, batches, start_step=0, last_step=900, metrics_every=50)
    trainer.add_hook(log_hook, every=50, at_stop=True)
    trainer.add_hook(checkpoint_hook, every=300, at_stop=True)
    state = trainer.run()

A hook is `fn(info: StepInfo) -> str | None`; a string asks the run to stop, for that reason.
Hooks run in the order they were added; those added with `at_stop=True` also run at the step
where the run stops (the last step, or one where a hook asked to stop), so a checkpoint added
after the hooks that may stop the run always records the final state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax

from clipjax.metrics import split_spectra


@dataclasses.dataclass
class StepInfo:
    """What hooks see after a step: its number, the new state and the step's metrics."""

    step: int
    state: dict
    metrics: dict  # device arrays
    with_embedding_metrics: bool
    _host: tuple[dict, dict] | None = None

    def host_metrics(self) -> tuple[dict, dict]:
        """(scalars, spectra) on the host, fetched once however many hooks ask (a device sync)."""
        if self._host is None:
            self._host = split_spectra(jax.device_get(self.metrics))
        return self._host


@dataclasses.dataclass
class _Hook:
    fn: Callable[[StepInfo], str | None]
    every: int
    at_stop: bool


class Trainer:
    def __init__(
        self,
        train_step: Callable,
        state: dict,
        batches: Iterator[dict],
        *,
        start_step: int,
        last_step: int,
        metrics_every: int = 0,
    ):
        self.train_step, self.state, self.batches = train_step, state, batches
        self.step, self.last_step = int(start_step), int(last_step)
        self.metrics_every = int(metrics_every)
        self.stop_reason: str | None = None
        self._hooks: list[_Hook] = []

    def add_hook(
        self, fn: Callable[[StepInfo], str | None], *, every: int = 1, at_stop: bool = False
    ) -> None:
        """Run `fn` after every `every`-th step (0: never on a cadence), and at the stopping step
        too when `at_stop`."""
        self._hooks.append(_Hook(fn, int(every), at_stop))

    @property
    def stopping(self) -> bool:
        return self.stop_reason is not None or self.step >= self.last_step

    def run(self) -> Any:
        while not self.stopping:
            with_metrics = self.metrics_every > 0 and (self.step + 1) % self.metrics_every == 0
            self.state, metrics = self.train_step(self.state, next(self.batches), with_metrics)
            self.step += 1
            info = StepInfo(self.step, self.state, metrics, with_metrics)
            for hook in self._hooks:
                due = hook.every > 0 and self.step % hook.every == 0
                if due or (hook.at_stop and self.stopping):
                    reason = hook.fn(info)
                    if reason and self.stop_reason is None:
                        self.stop_reason = reason
        return self.state
