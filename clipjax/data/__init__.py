"""Data: one core under the sources.

Core: `decode` (the one decoder every source hands its examples to: crop seeding, image and
caption checks, drop reasons), `drops` (drop accounting), `process_state` (the training iterator
and every process's position), `workers` (worker processes), `pipeline` (grain batches of the
record sources), `images`, `records`. `sources/`: one plug-in per `data.name`, each holding all
of its own code. `tokenizers`, `augment` (on device), `prepare/` (the converter).
"""
