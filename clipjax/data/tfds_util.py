"""Helpers shared by the tfds builders here (run without TensorFlow)."""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile

from etils import epath
import tensorflow_datasets as tfds

from clipjax.data import locking


def code_path_property(module_file: str):
    """A `code_path` class property returning `module_file`.

    tfds 4.9.10's `DatasetBuilder.code_path` touches `importlib_resources`, which
    tfds only requires on Python < 3.9, so on 3.11 any builder defined outside
    tfds fails with ModuleNotFoundError. Our builders report their source file,
    which is what tfds would have computed.
    """
    path = epath.Path(module_file)

    def code_path(cls):
        del cls
        return path

    return tfds.core.utils.classproperty(classmethod(code_path))


def prepare_once(make_builder, data_dir: str) -> tfds.core.DatasetBuilder:
    """Prepares the dataset of `make_builder()` once; returns a fresh builder.

    Concurrent callers (processes of one job, or jobs sharing data_dir) take a
    file lock; whoever gets it first writes the data, the others find it ready.
    tfds itself writes into a temporary folder and renames it at the end, so a
    crashed preparation never looks complete.
    """
    with _no_stray_temp_dirs():
        return _prepare_once(make_builder, data_dir)


@contextlib.contextmanager
def _no_stray_temp_dirs():
    """Remove the empty `tmp*tfds` folders tfds makes while building an unprepared builder.

    `DatasetInfo.initialize_from_bucket` creates a temporary folder before it finds that GCS
    access is off, and never removes it: one stray folder per builder, per process.
    """
    pattern = os.path.join(tempfile.gettempdir(), "tmp*tfds")
    before = set(glob.glob(pattern))
    try:
        yield
    finally:
        for path in set(glob.glob(pattern)) - before:
            with contextlib.suppress(OSError):
                os.rmdir(path)  # only if empty: never anything tfds actually used


def _prepare_once(make_builder, data_dir: str) -> tfds.core.DatasetBuilder:
    builder = make_builder()
    if builder.is_prepared():
        return builder
    locking.ensure_writable_dir(data_dir, "data_dir")
    config = builder.builder_config.name if builder.builder_config else "default"
    lock = os.path.join(data_dir, f".{builder.name}-{config}.lock")
    with locking.file_lock(lock):
        builder = make_builder()
        if not builder.is_prepared():
            builder.download_and_prepare(
                file_format="array_record",
                download_config=tfds.download.DownloadConfig(
                    # Statistics need TensorFlow; nothing here uses them.
                    compute_stats=tfds.download.ComputeStatsMode.SKIP
                ),
            )
    # A builder made before the data existed has no split metadata.
    return make_builder()


def check_split(builder: tfds.core.DatasetBuilder, split: str, hint: str = "") -> None:
    """A one-line error when `split` ("test", "train[:10%]", ...) is not a split of the dataset."""
    available = list(builder.info.splits.keys())
    if split.split("[")[0] not in available:
        raise ValueError(
            f"dataset {builder.name} has no split {split.split('[')[0]!r}; available: {available}{hint}"
        )
