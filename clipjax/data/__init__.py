"""Data: sources of image-text pairs (`sources/`), the grain input pipeline, image decoding,
tokenizers, and the tfds builders behind the embedded and folder datasets."""
