"""`python -m clipjax.data.convert`: the same dataset the folder source prepares, in parallel,
resumable after a kill, bad records left out and counted; and preparation across hosts."""

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from clipjax.data import locking, tfds_util
from clipjax.data.prepare import convert
from clipjax.data.sources.image_text_folder import builder as folder_tfds
from clipjax.data.sources.shapes import builder as shapes_tfds
from clipjax.data.sources import make_source
from tests.helpers import data_config, descendants, kill_all, survivors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD = {"bad_image": 2, "missing_image": 1, "bad_caption": 2}


def _png(rng, size) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_folder(root, n, size=(12, 18), seed=0):
    """n good pairs, then the bad ones of BAD: two corrupt images (one truncated), an image
    without its file (CSV), one without a caption file, one with a blank caption."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = ["image,caption"]
    for i in range(n):
        (root / f"{i:04d}.png").write_bytes(_png(rng, size))
        (root / f"{i:04d}.txt").write_text(f"picture number {i}\n")
        rows.append(f"{i:04d}.png,picture number {i}")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    (root / "corrupt.txt").write_text("a corrupt image")
    (root / "truncated.png").write_bytes(_png(rng, (40, 40))[:200])
    (root / "truncated.txt").write_text("a truncated image")
    (root / "uncaptioned.png").write_bytes(_png(rng, size))
    (root / "blank.png").write_bytes(_png(rng, size))
    (root / "blank.txt").write_text("  \n")
    rows += ["corrupt.png,a corrupt image", "truncated.png,a truncated image", "gone.png,a missing file"]
    rows += ["uncaptioned.png,", "blank.png,   "]
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root


def _records(version_dir: str) -> dict[str, list[tuple]]:
    """Every record of each split, in order, as (image bytes, caption, index, text_id, label).

    Parsed, not serialized: a proto map's entries may come in any order.
    """
    builder = tfds.builder_from_directory(version_dir)
    raw = tfds.decode.DeserializeMethod.RAW_BYTES
    parse = folder_tfds.features().deserialize_example_np
    fields = lambda r: (r["image"], r["caption"], int(r["index"]), int(r["text_id"]), int(r["label"]))
    return {
        split: [fields(parse(r)) for r in builder.as_data_source(split=split, deserialize_method=raw)]
        for split in builder.info.splits.keys()
    }


def _folder_config(data_dir, source, **overrides):
    values = {
        "name": "image_text_folder",
        "data_dir": str(data_dir),
        "source": str(source),
        "test_fraction": 0.25,
        "image_size": 16,
        "tokenizer.kind": "byte",
        "tokenizer.max_len": 24,
        "max_bad_fraction": 0.5,
    }
    values.update(overrides)
    return data_config(**values)


@pytest.mark.parametrize("kind", ["folder", "csv"])
def test_output_is_the_folder_source_dataset_without_the_bad_records(tmp_path, kind):
    folder = _write_folder(tmp_path / "pairs", 20)
    source = folder / "pairs.csv" if kind == "csv" else folder
    result = convert.convert(
        str(source), str(tmp_path / "converted"), test_fraction=0.25, shard_size=4, workers=2
    )
    bad = dict(BAD) if kind == "csv" else {"bad_image": 2, "bad_caption": 2}  # no file, no folder pair
    assert result.skipped == bad and result.done_before == []
    assert sum(result.records.values()) == 20 and set(result.records) == {"train", "test"}

    # The image_text_folder source pointed at the output reads it as it is (no preparation of
    # its own: tfds would have written one shard per split)...
    config = _folder_config(tmp_path / "converted", source)
    converted = make_source(config)
    converted.prepare()
    assert converted.builder.info.splits["train"].num_shards > 1
    # ... and record for record it is what the source prepares itself, less the bad records.
    reference = make_source(_folder_config(tmp_path / "prepared", source))
    reference.prepare()
    want, got = _records(str(reference.builder.data_path)), _records(result.version_dir)
    for split in ("train", "test"):
        keep = [r for r in want[split] if not convert.problem({"image": r[0], "caption": r[1]})]
        assert got[split] == keep and len(keep) < len(want[split])
    tokenizer = converted.tokenizer()
    for split in ("train", "test"):
        a = converted.eval_arrays(tokenizer, split=split)
        b = reference.eval_arrays(tokenizer, split=split)
        for key in ("image", "caption", "index", "text_id", "label"):
            np.testing.assert_array_equal(a[key], b[key])

    # Run again: nothing to do.
    again = convert.convert(str(source), str(tmp_path / "converted"), test_fraction=0.25, shard_size=4)
    assert again.records == {} and again.version_dir == result.version_dir


def _tar(path, samples):
    """A webdataset shard: {key}.png, {key}.txt, {key}.json per sample (None: member left out)."""
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            for ext, data in (("png", image), ("txt", caption), ("json", b"{}")):
                if data is None:
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_convert_and_train_through_the_tfds_source(tmp_path):
    rng = np.random.default_rng(1)
    samples = {}
    for shard in range(3):
        rows = []
        for j in range(6):
            key = f"{shard:05d}{j:04d}"
            image, caption = _png(rng, (10 + j, 14)), f"shard {shard} sample {j}".encode()
            samples[key] = (image, caption)
            rows.append((key, image, caption))
        if shard == 1:
            rows += [(f"{shard:05d}9990", b"garbage", b"a corrupt image"), (f"{shard:05d}9991", None, b"x")]
            rows += [(f"{shard:05d}9992", _png(rng, (8, 8)), None)]
        _tar(tmp_path / f"shard-{shard:05d}.tar", rows)
    pattern = str(tmp_path / "shard-{00000..00002}.tar")
    assert convert.is_webdataset(pattern) and convert.is_webdataset(str(tmp_path))
    result = convert.convert(pattern, str(tmp_path / "out"), test_fraction=0.3, workers=2)
    assert result.skipped == {"bad_image": 1, "missing_image": 1, "bad_caption": 1}
    assert sum(result.records.values()) == len(samples)

    # Read back by name through the tfds source, as the converter's last line says.
    config = data_config(
        name="tfds",
        data_dir=str(tmp_path / "out"),
        tfds_name=f"image_text_folder/{result.config}",
        tfds_caption_key="caption",
        tfds_eval_split="test",
        image_size=16,
        **{"tokenizer.kind": "byte", "tokenizer.max_len": 32},
    )
    source = make_source(config)
    source.prepare()
    seen = {}
    for split in ("train", "test"):
        records = source.records(split)
        parsed = folder_tfds.features()
        for raw in source.raw_records(split):
            record = parsed.deserialize_example_np(raw)
            key = f"{int(record['index']):09d}"  # img2dataset's numeric keys are the index
            seen[key] = (record["image"], record["caption"])
            assert folder_tfds.is_test(f"shard-{key[:5]}.tar/{key}", 0.3) == (split == "test")
        assert len(records) == result.records[split]
    assert seen == samples
    batch = next(source.train_iterator(source.tokenizer(), seed=0))
    assert batch["image"].shape == (config.batch_size, 16, 16, 3)


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def test_a_killed_conversion_finishes_the_rest_with_the_same_output(tmp_path):
    folder = _write_folder(tmp_path / "pairs", 150, size=(160, 160))
    straight = convert.convert(
        str(folder), str(tmp_path / "straight"), shard_size=1, workers=1, test_fraction=0.1
    )

    data_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "clipjax.data.convert", str(folder), "--data_dir", str(data_dir)]
    command += ["--shard_size", "1", "--workers", "1", "--test_fraction", "0.1", "--quiet"]
    run = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stderr=subprocess.DEVNULL)
    config_dir = os.path.dirname(straight.version_dir).replace(str(tmp_path / "straight"), str(data_dir))
    version = os.path.basename(straight.version_dir)
    work_dir = os.path.join(config_dir, f"incomplete.convert_{version}")
    markers = lambda: [n for n in os.listdir(work_dir) if n.endswith(".json") and n.startswith("unit-")]
    workers = {}
    try:
        _wait_for(lambda: os.path.isdir(work_dir) and len(markers()) >= 5, 120, "five converted units")
        workers = descendants(run.pid)
        assert workers  # the worker process (and multiprocessing's resource tracker)
        os.kill(run.pid, signal.SIGKILL)  # the converter only, as the OOM killer would
        run.wait()
        # Its worker ends with it, rather than convert on (issue 24: units done went from 3 to 5).
        assert not survivors(workers), "worker processes outlived the killed converter"
    finally:
        kill_all(workers)
        with contextlib.suppress(ProcessLookupError):  # whatever else is left of the group
            os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    done = sorted(int(n[5:11]) for n in markers())
    units = len(list(folder.glob("*.png")))  # one pair each, bad ones included
    assert 5 <= len(done) < units - 10, "the run was to be killed part-way"
    assert not os.path.exists(os.path.join(config_dir, version))
    # A restart with other settings would not mix two plans: it starts afresh (on a copy here).
    shutil.copytree(data_dir, tmp_path / "copy")
    other = convert.convert(str(folder), str(tmp_path / "copy"), shard_size=2, workers=1, test_fraction=0.1)
    assert other.done_before == []

    resumed = convert.convert(str(folder), str(data_dir), shard_size=1, workers=1, test_fraction=0.1)
    assert resumed.done_before == done  # not converted again
    assert sorted(resumed.converted + resumed.done_before) == list(range(units))
    assert resumed.skipped == straight.skipped == {"bad_image": 2, "bad_caption": 2}
    assert _records(resumed.version_dir) == _records(straight.version_dir)
    assert sorted(os.listdir(config_dir)) == [version]  # no work folder or temporary file left


def test_command_line_prints_how_to_train_on_the_output(tmp_path):
    folder = _write_folder(tmp_path / "pairs", 6)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipjax.data.convert",
            str(folder / "pairs.csv"),
            "--data_dir",
            str(tmp_path / "d"),
            "--test_fraction",
            "0.5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "skipped 5 record(s): bad_caption 2, bad_image 2, missing_image 1" in out.stderr
    assert f"--config.data.source={folder / 'pairs.csv'}" in out.stdout and "wrote 6 records" in out.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipjax.data.convert",
            str(tmp_path / "nowhere"),
            "--data_dir",
            str(tmp_path / "d"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "does not exist" in bad.stderr


def test_a_test_fraction_that_leaves_the_test_split_empty_is_one_line_naming_the_flag(tmp_path):
    """The default 0.02 of 11 pairs holds none out: one line naming --test_fraction, nothing written."""
    folder = _write_folder(tmp_path / "pairs", 6)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipjax.data.convert",
            str(folder / "pairs.csv"),
            "--data_dir",
            str(tmp_path / "d"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "python -m clipjax.data.convert: error: --test_fraction: 0.02 of the 11 pairs leaves the test split "
        "empty (files are held out by a hash of their path); give a fraction that holds out some but not all, "
        "or 0 for no test split"
    )
    assert not any((tmp_path / "d").rglob("*.array_record"))


# ---------------------------------------------------------------------------
# Preparing once per job across hosts


def test_several_hosts_prepare_on_process_zero_behind_a_barrier(tmp_path, monkeypatch):
    from jax.experimental import multihost_utils

    events = []
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: events.append(("barrier", name)))
    work = lambda: events.append(("work", None))
    lock = str(tmp_path / ".lock")

    monkeypatch.setattr(locking, "job_processes", lambda: (0, 2))
    locking.run_once(work, lock, "b")
    assert events == [("work", None), ("barrier", "b")]  # process 0 works, then lets the others go
    events.clear()
    monkeypatch.setattr(locking, "job_processes", lambda: (1, 2))
    locking.run_once(work, lock, "b")
    assert events == [("barrier", "b"), ("work", None)]  # the others wait, then find it done
    events.clear()

    # Preparing a dataset goes through the barrier on every call, prepared or not, so no
    # process can skip a barrier the others wait at.
    monkeypatch.setattr(locking, "job_processes", lambda: (0, 2))
    for _ in range(2):
        builder = shapes_tfds.prepare_shapes(str(tmp_path / "data"), 8, 12, 4, 1)
    assert [e[0] for e in events] == ["barrier", "barrier"] and len(builder.as_data_source("train")) == 12
    assert events[0][1] == "clipjax: prepared shapes/" + builder.builder_config.name
    monkeypatch.setattr(locking, "job_processes", lambda: (0, 1))
    events.clear()
    shapes_tfds.prepare_shapes(str(tmp_path / "data"), 8, 12, 4, 1)
    assert events == []  # one process: the file lock alone
    assert tfds_util.lock_path(builder, str(tmp_path / "data")).endswith(
        ".shapes-" + builder.builder_config.name + ".lock"
    )
