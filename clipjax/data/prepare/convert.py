"""Image-text pairs -> ArrayRecord shards, on every core, resumably (the command line:
`python -m clipjax.data.convert`).

    python -m clipjax.data.convert ~/photos/captions.csv --data_dir ~/clipjax_data
    python -m clipjax.data.convert ~/photos --data_dir ~/clipjax_data --test_fraction 0.05
    python -m clipjax.data.convert 'shards/{00000..00099}.tar' --data_dir ~/clipjax_data

Input: what `data.name=image_text_folder` reads (a CSV with image,caption columns, or a folder of
images with same-named .txt captions; that source's `builder` parses both), or webdataset tar
shards (a brace pattern, a .tar file, a folder of .tar files, or with --webdataset a file listing
them), read with `tarfile` in stream mode by the webdataset source's `streaming`.

Output: the tfds dataset `image_text_folder` under --data_dir, with the features, splits (the
same hash of each key holds out --test_fraction) and config name that the image_text_folder
source would prepare from the same CSV or folder. So training with
`data.source=<the same source> data.data_dir=<the same dir>` finds it prepared and reads it; a
converted webdataset is read with `data.name=tfds data.tfds_name=image_text_folder/<config>` (the
command is printed at the end).

Images are kept as their encoded bytes when PIL decodes them; records whose image is missing or
does not decode, or whose caption is missing, blank or not UTF-8, are left out and counted by
reason (the one decoder's checks and reasons, `clipjax.data.decode`). The `index` of a record is its position among the
source's pairs of its split (bad ones included, as the image_text_folder source numbers them) or,
for tar shards, the sample number the webdataset source gives (img2dataset's key).

Parallel and resumable: the work is cut into units (--shard_size pairs of a CSV or folder, or one
tar shard), converted by worker processes, each unit into its own ArrayRecord file, written under
a temporary name and renamed when complete, then a small JSON marker saying so. A run killed at
any point and started again with the same arguments converts only the units without a marker.
When all are done, the files are renamed to tfds' shard names, dataset_info.json is written, and
the folder is renamed into place (`<config>/1.1.0`): a dataset is there complete or not at all.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
from typing import Iterator

from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
import tensorflow_datasets as tfds
from tensorflow_datasets.core import naming
from tqdm import tqdm

from clipjax import paths
from clipjax.data import locking, tfds_util, workers as worker_pool
from clipjax.data.sources.image_text_folder import builder as folder_tfds
from clipjax.data.sources.webdataset import streaming
from clipjax.data.decode import Decoder, Raw

_PLAN = "plan.json"
_FORMAT = 2  # of the plan and markers; a partial conversion of another format starts afresh
_EXAMPLES = 10  # skipped records named in the summary


@dataclasses.dataclass(frozen=True)
class Unit:
    """One worker's job: `pairs` (index, image path, caption or None, label) of one split of a CSV or
    folder, or one tar `shard` (whose samples go to both splits)."""

    number: int
    split: str = ""
    pairs: tuple = ()
    shard: str = ""

    @property
    def marker(self) -> str:
        return f"unit-{self.number:06d}.json"

    def output(self, split: str) -> str:
        return f"unit-{self.number:06d}-{split}.array_record"


# ----------------------------------------------------------------------------
# Reading and checking the pairs (in worker processes).


def _examples(unit: Unit, test_fraction: float) -> Iterator[tuple[str, str, dict | None, str]]:
    """(split, name, record or None, why not) of every pair of `unit`."""
    if not unit.shard:
        for index, image_path, caption, label in unit.pairs:
            record = folder_tfds.make_example(index, *folder_tfds.read_pair(image_path, caption), label)
            yield unit.split, image_path or f"#{index}", record, ""
        return
    for sample in streaming.read_in_order([unit.shard]):
        if sample.error:  # the rest of the shard cannot be read: counted once, as the pipeline does
            yield "", sample.name, None, sample.error
            continue
        split = "test" if folder_tfds.is_test(sample.name, test_fraction) else "train"
        yield (
            split,
            sample.name,
            folder_tfds.make_example(sample.index, sample.image or b"", sample.caption or b""),
            "",
        )


# Small: JPEGs decode at a reduced scale, and every byte of the file is still read.
_CHECK = Decoder(None, 16)


def problem(record: dict) -> str:
    """Why the input pipeline would drop `record` ('' if it would not): it is left out here."""
    return _CHECK.decode_one(Raw(0, record["image"], record["caption"]))[2]


def _tmp(path: str) -> str:
    # Named per process: a worker of a killed run may still be finishing the same unit.
    return f"{path}.{os.getpid()}.tmp"


def _write_atomically(path: str, write) -> None:
    tmp = _tmp(path)
    write(tmp)
    os.replace(tmp, path)


def convert_unit(unit: Unit, work_dir: str, test_fraction: float) -> dict:
    """Converts one unit into its files in work_dir and writes its marker; returns the marker."""
    features = folder_tfds.features()
    writers: dict[str, ArrayRecordWriter] = {}
    counts: collections.Counter = collections.Counter()
    skipped: collections.Counter = collections.Counter()
    examples, seen = [], 0
    try:
        for split, name, record, why in _examples(unit, test_fraction):
            seen += 1
            why = why or problem(record)
            if why:
                skipped[why] += 1
                if len(examples) < _EXAMPLES:
                    examples.append(f"{name} ({why})")
                continue
            if split not in writers:
                # group_size:1, as tfds writes them: each record can be read on its own.
                path = _tmp(os.path.join(work_dir, unit.output(split)))
                writers[split] = ArrayRecordWriter(path, "group_size:1")
            writers[split].write(features.serialize_example(record))
            counts[split] += 1
    finally:
        for writer in writers.values():
            writer.close()
    outputs = {}
    for split in writers:
        path = os.path.join(work_dir, unit.output(split))
        os.replace(_tmp(path), path)
        outputs[split] = {"file": unit.output(split), "count": counts[split], "bytes": os.path.getsize(path)}
    marker = {
        "format": _FORMAT,
        "seen": seen,
        "outputs": outputs,
        "skipped": dict(skipped),
        "examples": examples,
    }
    # Last, and atomically: a marker means the unit's files are complete.
    _write_atomically(os.path.join(work_dir, unit.marker), lambda p: _dump(marker, p))
    return marker


def _dump(value, path: str) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)


def _load(path: str):
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------
# Planning (in the main process).


def is_webdataset(source: str) -> bool:
    """Tar shards rather than a CSV or an image folder: a brace pattern, a .tar file, a bucket
    object other than a .csv (a list of shards), or a folder holding .tar files and no images."""
    if "{" in source or source.endswith(".tar"):
        return True
    if paths.is_remote(source):
        if source.lower().endswith(".csv"):
            return False
        if not paths.isdir(source):
            return True
        names = [n.lower() for n in paths.files_under(source)]
    else:
        path = os.path.expanduser(source)
        if not os.path.isdir(path):
            return False
        names = [n.lower() for n in os.listdir(path)]
    return any(n.endswith(".tar") for n in names) and not any(
        n.endswith(folder_tfds.IMAGE_EXTENSIONS) for n in names
    )


def _webdataset_config(shards: list[str], spec: str, test_fraction: float) -> folder_tfds.FolderConfig:
    """A config named after the shards and a fingerprint of their paths, sizes and mtimes (as
    `folder_tfds.make_config` names a folder's), so changed shards never reuse a conversion."""
    h = hashlib.sha1()
    for shard in shards:
        try:
            st = epath.Path(shard).stat()
            found = f"{st.length}|{st.mtime}"
        except OSError:
            found = "missing"
        h.update(f"{shard}|{found}\n".encode("utf-8", "surrogateescape"))
    stem = re.sub(r"\{.*", "", os.path.basename(spec.rstrip("/"))) or os.path.basename(os.path.dirname(spec))
    slug = re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_") or "shards"
    name = f"wds_{slug}_{h.hexdigest()[:12]}"
    if test_fraction:
        name += f"_test{round(test_fraction * 1e4)}"
    return folder_tfds.FolderConfig(
        name=name, source=spec, test_fraction=test_fraction, description=f"image-text pairs from {spec}"
    )


def plan(source: str, *, test_fraction: float, shard_size: int, webdataset: bool):
    """(tfds config, units, records in, or None when unknown before reading tar shards)."""
    if webdataset:
        shards = streaming.resolve_shards(source)
        if not shards:
            raise FileNotFoundError(f"webdataset {source!r} names no tar shards")
        config = _webdataset_config(shards, source, test_fraction)
        return config, [Unit(number=k, shard=shard) for k, shard in enumerate(shards)], None
    names = folder_tfds.label_names(source)
    config = folder_tfds.make_config(source, test_fraction, names)
    pairs = folder_tfds.source_pairs(source, names)
    if not pairs:
        raise ValueError(f"{source!r} holds no image-caption pairs")
    units = []
    for split, items in folder_tfds.split_pairs(pairs, test_fraction, setting="--test_fraction").items():
        numbered = [(i, image, caption, label) for i, (_, image, caption, label) in enumerate(items)]
        for start in range(0, len(numbered), shard_size):
            units.append(
                Unit(number=len(units), split=split, pairs=tuple(numbered[start : start + shard_size]))
            )
    return config, units, len(pairs)


# ----------------------------------------------------------------------------
# Putting the dataset together.


def _finalize(builder, work_dir: str, version_dir: str, markers: list[dict]) -> dict[str, int]:
    """Unit files -> tfds' shard names, dataset_info.json, then the folder into place."""
    outputs: dict[str, list[dict]] = {}
    for marker in markers:
        for split, out in marker["outputs"].items():
            if out["count"]:
                outputs.setdefault(split, []).append(out)
    if not outputs.get("train"):
        raise ValueError("no record could be converted (see the reasons above); nothing was written")
    splits = []
    for split in sorted(outputs):
        template = naming.ShardedFileTemplate(
            data_dir=epath.Path(work_dir),
            dataset_name=builder.name,
            split=split,
            filetype_suffix="array_record",
        )
        for out, final in zip(outputs[split], template.sharded_filepaths(len(outputs[split]))):
            unit_file = os.path.join(work_dir, out["file"])
            if not (final.exists() and not os.path.exists(unit_file)):  # else renamed by an earlier run
                os.replace(unit_file, final)
        splits.append(
            tfds.core.SplitInfo(
                name=split,
                shard_lengths=[out["count"] for out in outputs[split]],
                num_bytes=sum(out["bytes"] for out in outputs[split]),
                filename_template=template.replace(data_dir=epath.Path(version_dir)),
            )
        )
    builder.info.set_splits(tfds.core.SplitDict(splits))
    builder.info.write_to_directory(work_dir)
    for name in os.listdir(work_dir):
        if name.startswith(("unit-", _PLAN)):  # with the temporary files of killed runs
            os.remove(os.path.join(work_dir, name))
    os.rename(work_dir, version_dir)
    return {split: sum(out["count"] for out in outs) for split, outs in outputs.items()}


@dataclasses.dataclass
class Result:
    version_dir: str
    config: str
    records: dict[str, int]  # per split; empty when the dataset was there already
    skipped: dict[str, int]
    examples: list[str]  # a few skipped records: "name (reason)"
    converted: list[int]  # units converted by this run
    done_before: list[int]  # units a previous run had converted


def convert(
    source: str,
    data_dir: str,
    *,
    test_fraction: float = 0.02,
    shard_size: int = 1000,
    workers: int = 0,
    webdataset: bool | None = None,
    progress: bool = True,
) -> Result:
    """Converts `source` into the image_text_folder dataset in data_dir (see the module docstring).

    workers: processes (0: one per available core). webdataset: None detects tar shards.
    A bucket `data_dir` (gs://, s3://) gets the dataset converted in its local copy
    (`paths.local_cache`, where training reads it) and uploaded, its tfds metadata last.
    """
    if paths.is_remote(data_dir):
        local_root = paths.local_cache(data_dir)
        result = convert(
            source,
            local_root,
            test_fraction=test_fraction,
            shard_size=shard_size,
            workers=workers,
            webdataset=webdataset,
            progress=progress,
        )
        remote = paths.join(data_dir, *os.path.relpath(result.version_dir, local_root).split(os.sep))
        tfds_util.upload_prepared(result.version_dir, remote)
        return dataclasses.replace(result, version_dir=remote)
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"--test_fraction must be in [0, 1), got {test_fraction}")
    if shard_size < 1:
        raise ValueError(f"--shard_size must be positive, got {shard_size}")
    webdataset = is_webdataset(source) if webdataset is None else webdataset
    if not webdataset:  # the config name and the plan hold the full path
        source = paths.resolve(source)
        if not paths.exists(source):
            raise FileNotFoundError(f"{source!r} does not exist (a CSV, a folder of images, or tar shards)")
    elif "://" not in source:
        source = os.path.abspath(os.path.expanduser(source))
    data_dir = locking.ensure_writable_dir(data_dir, "--data_dir")
    config, units, total = plan(
        source, test_fraction=test_fraction, shard_size=shard_size, webdataset=webdataset
    )
    builder = folder_tfds.ImageTextFolder(data_dir=data_dir, config=config)
    version_dir = str(builder.data_path)
    # The lock the image_text_folder source takes to prepare the same dataset: a training run
    # started meanwhile waits for this conversion instead of preparing it a second time.
    with locking.file_lock(tfds_util.lock_path(builder, data_dir)):
        if os.path.exists(os.path.join(version_dir, "dataset_info.json")):
            return Result(version_dir, config.name, {}, {}, [], [], [])
        # tfds reads folders named `incomplete.*` as unfinished work, never as a version.
        work_dir = os.path.join(
            os.path.dirname(version_dir), f"incomplete.convert_{os.path.basename(version_dir)}"
        )
        expected = {
            "format": _FORMAT,
            "source": source,
            "test_fraction": test_fraction,
            "shard_size": None if webdataset else shard_size,
            "units": len(units),
        }
        if os.path.exists(os.path.join(work_dir, _PLAN)) and _load(os.path.join(work_dir, _PLAN)) != expected:
            print(
                f"convert: {work_dir} holds a conversion with other settings; starting afresh",
                file=sys.stderr,
            )
            shutil.rmtree(work_dir)
        os.makedirs(work_dir, exist_ok=True)
        _write_atomically(os.path.join(work_dir, _PLAN), lambda p: _dump(expected, p))
        markers = {u.number: _load(os.path.join(work_dir, u.marker)) for u in units if _done(work_dir, u)}
        todo = [u for u in units if u.number not in markers]
        done_before = sorted(markers)
        bar = tqdm(
            total=total if total is not None else len(units),
            initial=sum(m["seen"] for m in markers.values()) if total is not None else len(markers),
            unit="records" if total is not None else "shards",
            disable=not progress,
            desc="convert",
        )
        workers = workers or worker_pool.available_cores()
        pool = worker_pool.spawn_pool(max(1, min(workers, len(todo))))
        try:
            futures = {pool.submit(convert_unit, u, work_dir, test_fraction): u for u in todo}
            for future in concurrent.futures.as_completed(futures):
                marker = future.result()
                markers[futures[future].number] = marker
                bar.update(marker["seen"] if total is not None else 1)
                bar.set_postfix(skipped=sum(sum(m["skipped"].values()) for m in markers.values()))
        finally:
            # On an error (or ^C) the units not started are dropped: a new run does them.
            pool.shutdown(cancel_futures=True)
            bar.close()
        ordered = [markers[u.number] for u in units]
        skipped: collections.Counter = collections.Counter()
        for marker in ordered:
            skipped.update(marker["skipped"])
        examples = [e for m in ordered for e in m["examples"]][:_EXAMPLES]
        if sum(skipped.values()):
            print(_skipped_line(skipped, examples), file=sys.stderr)
        records = _finalize(builder, work_dir, version_dir, ordered)
    return Result(
        version_dir, config.name, records, dict(skipped), examples, [u.number for u in todo], done_before
    )


def _done(work_dir: str, unit: Unit) -> bool:
    try:
        marker = _load(os.path.join(work_dir, unit.marker))
    except (OSError, ValueError):
        return False
    return marker.get("format") == _FORMAT and all(
        os.path.exists(os.path.join(work_dir, out["file"])) for out in marker["outputs"].values()
    )


def _skipped_line(skipped, examples: list[str]) -> str:
    reasons = ", ".join(f"{why} {n}" for why, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"convert: skipped {sum(skipped.values())} record(s): {reasons}; e.g. {'; '.join(examples)}"
