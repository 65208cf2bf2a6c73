"""Training: the train state (`state.py`), the jitted step (`step.py`), a short loop with
periodic hooks (`loop.py`, `hooks.py`), and `train(config, workdir)` that wires them (`run.py`)."""

from clipjax.trainer.hooks import NonFiniteError, StoppedEarly
from clipjax.trainer.run import train

__all__ = ["NonFiniteError", "StoppedEarly", "train"]
