"""The run store: a workdir's layout, the run it records, and where a run starts from.

Below both the trainer and `clipjax.api`, and importing neither (nor an entry point):
- `layout`: every file and folder a workdir holds, named here and nowhere else in clipjax
  (tests/test_architecture.py holds the rest of the library to it);
- `resume`: whether a config may continue the run a workdir holds;
- `record`: what a checkpoint records about its run, read back; parameters restored, checked
  against the model; config.json and converted workdirs written;
- `start`: a training run's initial state: its own checkpoint, else `init_from`, else fresh.

This file imports nothing, so that the modules that write into a workdir (checkpoints, metrics,
the lock) can read `layout` without importing the rest.
"""
