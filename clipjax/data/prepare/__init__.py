"""Preparation tools: work done on a dataset once, ahead of training (`convert`: image-text pairs
to the ArrayRecord dataset the sources read; its command line is `clipjax.data.convert`)."""
