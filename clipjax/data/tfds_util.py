"""Helpers shared by the tfds builders here (run without TensorFlow)."""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile

from etils import epath
import tensorflow_datasets as tfds

from clipjax import paths
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


def lock_path(builder: tfds.core.DatasetBuilder, data_dir: str) -> str:
    """The file lock of preparing `builder` in data_dir (also taken by `clipjax.data.prepare.convert`)."""
    config = builder.builder_config.name if builder.builder_config else "default"
    return os.path.join(data_dir, f".{builder.name}-{config}.lock")


def _prepare_once(make_builder, data_dir: str) -> tfds.core.DatasetBuilder:
    builder = make_builder()
    # Several JAX processes all go to `run_once`'s barrier, even where the data is there: a host
    # that skipped it would leave the others waiting.
    if builder.is_prepared() and locking.job_processes()[1] == 1:
        # A builder made while another writer was still moving the data into place reads no
        # split metadata, though the folder is complete by the time it is asked.
        return builder if builder.info.splits else make_builder()
    locking.ensure_writable_dir(data_dir, "data_dir")

    def prepare():
        builder = make_builder()
        if not builder.is_prepared():
            builder.download_and_prepare(
                file_format="array_record",
                download_config=tfds.download.DownloadConfig(
                    # Statistics need TensorFlow; nothing here uses them.
                    compute_stats=tfds.download.ComputeStatsMode.SKIP
                ),
            )

    name = f"{builder.name}/{builder.builder_config.name if builder.builder_config else 'default'}"
    locking.run_once(prepare, lock_path(builder, data_dir), barrier=f"clipjax: prepared {name}")
    # A builder made before the data existed has no split metadata.
    return make_builder()


# Written last to a bucket, and looked for there: tfds takes a folder holding both as prepared.
_COMPLETE_MARKERS = ("features.json", "dataset_info.json")


def prepare_in_bucket(make_builder_at, url: str) -> tfds.core.DatasetBuilder:
    """The builder of a dataset kept in bucket folder `url` (gs://, s3://), read from a local copy.

    `make_builder_at(data_dir)` makes the builder for a data_dir. ArrayRecord opens its files
    by local path (its reader has no s3 support), and reading records at random over HTTP
    would be slow, so the prepared dataset is copied once to `paths.local_cache(url)` and read
    there. A dataset the bucket lacks is prepared locally, then uploaded, its tfds metadata
    last, so a reader never takes a partial upload for a prepared dataset.
    """
    local_root = paths.local_cache(url)
    builder = make_builder_at(local_root)
    rel = os.path.relpath(os.fspath(builder.data_path), local_root).split(os.sep)
    remote = paths.join(url, *rel)
    if not builder.is_prepared():
        locking.ensure_writable_dir(local_root, "the local copy of data_dir")
        with locking.file_lock(os.path.join(local_root, f".{'-'.join(rel)}.copy.lock")):
            builder = make_builder_at(local_root)
            if not builder.is_prepared() and all(
                paths.exists(paths.join(remote, m)) for m in _COMPLETE_MARKERS
            ):
                paths.download_tree(remote, os.fspath(builder.data_path))
    builder = prepare_once(lambda: make_builder_at(local_root), local_root)
    upload_prepared(os.fspath(builder.data_path), remote)
    return builder


def upload_prepared(version_dir: str, remote: str) -> None:
    """Copy the prepared dataset version folder `version_dir` to bucket folder `remote` unless
    it is complete there, its tfds metadata last. One uploader per job; two jobs that race
    upload the same files, the markers last."""
    if locking.job_processes()[0] == 0 and not all(
        paths.exists(paths.join(remote, m)) for m in _COMPLETE_MARKERS
    ):
        paths.upload_tree(version_dir, remote, last=_COMPLETE_MARKERS)


def check_split(builder: tfds.core.DatasetBuilder, split: str, hint: str = "") -> None:
    """A one-line error when `split` ("test", "train[:10%]", ...) is not a split of the dataset."""
    available = list(builder.info.splits.keys())
    if split.split("[")[0] not in available:
        raise ValueError(
            f"dataset {builder.name} has no split {split.split('[')[0]!r}; available: {available}{hint}"
        )
