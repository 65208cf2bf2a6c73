"""Planning a run for a TPU pod from a CPU host: the real train step compiled by the TPU compiler
for a named topology (`jax.experimental.topologies`), its memory per chip against the chip's HBM,
its collectives, a roofline estimate of the step time, and the largest batch that fits.
`python -m clipjax.plan` is the command line; docs/scaling.md holds the tables."""
