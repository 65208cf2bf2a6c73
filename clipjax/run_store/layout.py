"""A workdir's layout: the name of everything a run keeps there (an evaluation's report too, whose
folder defaults to the workdir). Other modules join these names, never their own."""

CONFIG = "config.json"  # the config of the run, as it last started
CHECKPOINTS = "checkpoints"  # Orbax's steps: state, data-iterator state, meta
DAMAGED_CHECKPOINTS = "damaged_checkpoints"  # unreadable steps set aside, never deleted
LOCK = "LOCK"  # one trainer per workdir
METRICS = "metrics.jsonl"  # one record per logged step
SPECTRA = "spectra.jsonl"  # embedding spectra over training
SPECTRUM_PLOT = "spectrum.png"
TENSORBOARD = "tensorboard"
PROFILE = "profile"  # jax.profiler traces
WANDB_RUN_ID = "wandb_run_id"
REPORT = "report.json"  # an evaluation's report, beside its markdown and the probe-set spectrum
REPORT_MARKDOWN = "report.md"
PROBE_SPECTRUM_PLOT = "probe_spectrum.png"
