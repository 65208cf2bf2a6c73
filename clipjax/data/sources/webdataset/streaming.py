"""Streamed tar shards (img2dataset / webdataset layout) -> resumable per-process batches.

A shard is a tar file whose members `{key}.{ext}` are grouped by key, one sample per key, the
members of a sample adjacent: `{key}.jpg` (or png, webp, ...) the image, `{key}.txt` the
caption, `{key}.json` metadata, `{key}.cls` the class label (optional, webdataset's
convention). Nothing is prepared: shards are read as they are, through `clipjax.paths`
(`etils.epath`: local paths, gs://, s3://).

Labels: a sample's `label` is its `.cls` member, else the `.json` field `data.label_field`
(`SampleReader.label`): an integer, or a class name of `data.class_names`; -1 without one. They
reach evaluation as the record sources' labels do (kNN, the probes, concept-aware retrieval;
zero-shot with class names).

Reader: Python's `tarfile` in stream mode (`r|`), stdlib and maintained. It reads any file
object front to back, and every member's `TarInfo.offset` says where its header starts, so a
shard can be reopened in the middle: seek the file there and start a new tar stream, which
is how a run resumes without reading a shard again from its start. The `webdataset` package
reads the same layout but keeps no position inside a shard, and its shuffle buffer's contents
cannot be saved; `wids` needs an index of every shard (a preparation step) and local copies.
Shards must be plain (uncompressed) tars, as img2dataset writes them: a compressed stream
cannot be entered in the middle.

The sample stream of one process, and why:
  shard order     every epoch a fresh permutation of all shards (seeded by the run's seed,
                  data.shuffle_seed and the epoch); process p of P takes positions p, p+P,
                  ... of it, so the processes read disjoint shards and, over an epoch,
                  every shard once
  interleave      data.shard_interleave shards open at once, one sample from each in turn: a
                  run of samples mixes several shards (img2dataset writes a shard from one
                  stretch of its input list)
  shuffle         blocks of data.shuffle_buffer samples, each permuted (seeded by the epoch
                  and the block's number); the last block of an epoch stops at its end, so
                  epochs do not mix. Blocks rather than a sliding buffer: a sliding buffer is
                  never empty, so its contents (samples from anywhere in the epoch so far)
                  would have to be saved and fetched again; a block is rebuilt by reading
                  on from one saved position
  chunks          runs of one local batch of samples, decoded (image decode and crop,
                  caption, tokens: `clipjax.data.decode`) by data.read_threads threads or
                  data.worker_count worker processes (`clipjax.data.workers`; spawned, not
                  grain's: see below), data.prefetch chunks ahead; bad samples dropped and
                  counted here
  batches         the kept samples regrouped into batches of exactly the local batch size,
                  `index` the sample's stable id (`sample_index`), `label` the class
                  (-1 without one)

The tar reading runs in one background thread per process. Decoding is a pure function of a
chunk's samples (and, for random crops, of the epoch and the sample's id: the one decoder of
every source seeds them), so the batches do not depend on how many threads or workers decode.
grain's worker processes are not used because each would run its own copy of the stream: the
shards would have to be split among workers (another order for every worker count) or read
once by each of them.

Exact resumption. The state names a block by where the reader stood when the block began
(epoch, block number, the next shard of the epoch's list, and for each open shard its
position in that list, the byte offset of its next sample's first header and its sample
count) and the position, inside the permuted block, of the next sample to deliver. Restoring
reopens those shards at those offsets, reads the block again (at most data.shuffle_buffer
samples), permutes it with the same seed, and goes on from that position: the following
batches are the ones an uninterrupted run gets, whatever the thread or worker counts. It is
cheap to keep (a few numbers per open shard) and to restore (one block read again). Each
process has its own position; get_state() gathers all of them (a collective when several JAX
processes run, as the checkpoint hook calls it everywhere at the same step) and set_state()
picks this process's. With another process count or shard list the saved positions do not
apply, and the run goes on from about the samples already seen (as for `start_example`).

`start_example` (a run resumed with another global batch size): each process starts at
about its share of the samples seen, start_example // process_count, without reading what
comes before: whole epochs by data.num_train (the number of good samples, as img2dataset's
stats report it), then the same share of the epoch's shards. It is approximate, at shard
granularity.

Bad samples are dropped and counted by reason (`clipjax.data.drops`, data.max_bad_fraction
as for every source): `bad_caption` (no .txt, empty, or not UTF-8), `missing_image`,
`bad_image` (cannot be decoded), `bad_image_shape`, `truncated_shard` (the data ends inside a
member, or reading fails part-way: the sample being read is dropped, and the rest of the shard
is lost), `unreadable_shard` (cannot be opened, or is not a tar). `tarfile` reads a shard cut
inside a header, or exactly between two members, as a shorter archive (tar has no member count
to check), so the end is checked: after the last member a tar holds zero blocks and nothing
else. A shard that ends without them, or with part of a header there, is counted as
`truncated_shard` too (the sample being read is dropped: its other members may be the ones cut).

The drop counts are part of the iterator's state (`DropCounter.state`): each process's counts
up to its position are saved with the checkpoint and restored with it, so a resumed run's totals
are the uninterrupted run's.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import json
import posixpath
import queue
import re
import tarfile
import threading
import zlib
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

from absl import logging
import numpy as np

from clipjax import paths
from clipjax.data import workers as worker_pool
from clipjax.data.drops import DropCounter
from clipjax.data.process_state import TrainIterator, local_batch
from clipjax.data.decode import Decoder, Raw, batch_keys
from clipjax.data.naflex import NaflexInputs, OneLengthBatches

IMAGE_EXTENSIONS = frozenset(("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm"))
CAPTION_EXTENSION = "txt"
LABEL_EXTENSION = "cls"  # webdataset's convention: the class label as decimal text
METADATA_EXTENSION = "json"
_READ_EXTENSIONS = IMAGE_EXTENSIONS | {CAPTION_EXTENSION, LABEL_EXTENSION, METADATA_EXTENSION}
STATE_FORMAT = "clipjax.streaming/1"

# ---------------------------------------------------------------------------
# Shard lists

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """`a/{000..002}.tar` -> a/000.tar, a/001.tar, a/002.tar; `{x,y}` lists alternatives.

    Several groups multiply out; a range keeps the zero padding of its first bound. Groups do
    not nest.
    """
    parts = re.split(r"(\{[^{}]*\})", pattern)
    choices: list[list[str]] = []
    for part in parts:
        if part.startswith("{") and part.endswith("}"):
            body = part[1:-1]
            m = _RANGE.match(body)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if hi < lo:
                    raise ValueError(f"{pattern!r}: the range {part} runs backwards")
                width = len(m.group(1))
                choices.append([str(i).zfill(width) for i in range(lo, hi + 1)])
            elif "," in body:
                choices.append(body.split(","))
            else:
                raise ValueError(f"{pattern!r}: {part} is neither a range a..b nor a list x,y")
        elif "{" in part or "}" in part:
            raise ValueError(f"{pattern!r}: unbalanced or nested braces")
        else:
            choices.append([part])
    return ["".join(p) for p in itertools.product(*choices)]


def resolve_shards(spec: str) -> list[str]:
    """The shard paths of `spec` (see the `data.shards` field), in the order given.

    A brace pattern expands; a folder gives its `*.tar` files, sorted; a `.tar` path is one
    shard; any other file is a list, one shard (or pattern) a line, blank lines and `#`
    comments skipped, relative lines taken from the list's folder.
    """
    spec = spec.strip()
    if not spec:
        return []
    if "{" in spec:
        return expand_braces(spec)
    if spec.endswith(".tar"):
        return [spec]
    if paths.isdir(spec):
        folder = paths.resolve(spec)
        return [
            paths.join(folder, f) for f in paths.files_under(folder) if "/" not in f and f.endswith(".tar")
        ]
    shards = []
    scheme, _, folder = posixpath.dirname(paths.resolve(spec)).rpartition("://")
    for line in paths.read_text(spec).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not (paths.is_remote(line) or line.startswith(("/", "~"))):
            # Normalised here: an object store takes '..' in a key literally.
            line = posixpath.normpath(posixpath.join(folder, line))
            line = f"{scheme}://{line}" if scheme else line
        shards.extend(expand_braces(line) if "{" in line else [line])
    return shards


def stats_path(shard: str) -> str:
    """img2dataset's statistics file of `shard`: `00042.tar` -> `00042_stats.json`."""
    return (shard[: -len(".tar")] if shard.endswith(".tar") else shard) + "_stats.json"


def count_samples(shards: Sequence[str]) -> int | None:
    """The samples in `shards` by img2dataset's statistics files (the `successes` of each
    shard's `_stats.json`, read 16 at a time); None unless every shard has one."""

    def successes(shard: str) -> int | None:
        try:
            return int(json.loads(paths.read_text(stats_path(shard)))["successes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    if not shards or successes(shards[0]) is None:  # no statistics: one read says so
        return None
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        counts = list(pool.map(successes, shards))
    return None if None in counts else sum(counts)


# ---------------------------------------------------------------------------
# One shard


class Sample(NamedTuple):
    """One sample's raw members, or (with `error`) a shard-level failure counted as one drop."""

    name: str  # "shard.tar/key", for error messages
    index: int  # stable id (see `sample_index`), -1 for failures
    image: bytes | None
    caption: bytes | None
    error: str = ""
    cls: bytes | None = None  # the `.cls` member
    metadata: bytes | None = None  # the `.json` member


def sample_index(shard_name: str, key: str) -> int:
    """The batch's `index`: img2dataset's keys are the sample's global number (shard id then
    position, e.g. 000120034), used as is when they fit int32; other keys hash (crc32) with
    the shard's file name into [0, 2**31)."""
    base = posixpath.basename(key)
    if base.isdigit() and int(base) < 2**31:
        return int(base)
    return zlib.crc32(f"{shard_name}/{key}".encode("utf-8", "surrogateescape")) & 0x7FFFFFFF


def _split_name(name: str) -> tuple[str, str]:
    """Member name -> (key, extension): the key runs to the first dot of the file name."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), ext.lower()


class ShardTruncated(tarfile.TarError):
    """The shard's file ends where a tar member, or the end-of-archive blocks, should be."""


_READ_ERRORS = (tarfile.TarError, OSError, EOFError)


class _Member(NamedTuple):
    key: str
    ext: str
    data: bytes | None
    offset: int  # of the member's (first) header, from the start of the file
    error: bool  # its data could not be read


class ShardReader:
    """The samples of one tar shard, from the sample whose first header is at `offset` on.

    `position` is (offset, number) of the next sample, offset -1 once the shard is done;
    a reader made from it reads what this one would have read next. The file is opened on
    the first read.
    """

    def __init__(self, path: str, offset: int = 0, number: int = 0):
        self.path = path
        self.name = posixpath.basename(path)
        self.offset, self.number = int(offset), int(number)
        self._file = self._tar = None
        self._base = 0
        self._end = 0  # where the data of the last member read ends (its 512-byte blocks)
        self._ahead: _Member | None = None  # first member of the next sample, already read

    @property
    def position(self) -> tuple[int, int]:
        return self.offset, self.number

    def close(self) -> None:
        for f in (self._tar, self._file):
            if f is not None:
                try:
                    f.close()
                except Exception:  # noqa: BLE001 - a broken file is closed as well as it can be
                    pass
        self._file = self._tar = None

    def _finish(self) -> None:
        self.offset = -1
        self.close()

    def _failure(self, reason: str, key: str | None = None) -> Sample:
        name = f"{self.name}/{key}" if key is not None else f"{self.name}#{self.number}"
        self.number += 1
        self._finish()
        return Sample(name, -1, None, None, reason)

    def _next_member(self) -> _Member | None:
        """The next file member (data read only for images and captions); None at the end.

        Raises when the tar stream itself breaks; a member whose data is cut short comes back
        with error=True.
        """
        while True:
            info = self._tar.next()
            if info is None:
                self._check_end()
                return None
            self._end = self._base + info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if not info.isfile():
                continue
            key, ext = _split_name(info.name)
            if posixpath.basename(key).startswith("."):
                continue  # e.g. macOS '._' resource files
            offset = self._base + info.offset
            if ext not in _READ_EXTENSIONS:
                return _Member(key, ext, None, offset, False)
            try:
                return _Member(key, ext, self._tar.extractfile(info).read(), offset, False)
            except _READ_ERRORS:
                return _Member(key, ext, None, offset, True)

    def _check_end(self) -> None:
        """Raise `ShardTruncated` unless the shard ends as a tar does: zero blocks after the last
        member. `tarfile` takes a header cut short, or no header at all, for the end of the
        archive; what follows the last member's data tells a cut file from a complete one."""
        self._file.seek(self._end)
        tail = self._file.read(tarfile.RECORDSIZE)
        if not tail:
            raise ShardTruncated(f"no end-of-archive block after byte {self._end}")
        if tail.strip(b"\0"):
            raise ShardTruncated(f"{len(tail)} byte(s) after byte {self._end} are not a whole tar header")

    def read(self) -> Sample | None:
        """The next sample (or a failure, after which the shard is done); None at the end."""
        if self.offset < 0:
            return None
        if self._tar is None:
            try:
                self._file = paths.path(self.path).open("rb")
                if self.offset:
                    self._file.seek(self.offset)
                self._base = self._end = self.offset
                self._tar = tarfile.open(fileobj=self._file, mode="r|")
            except _READ_ERRORS as e:
                logging.warning("webdataset shard %s cannot be read (%s); skipped", self.path, e)
                return self._failure("unreadable_shard")
        first, key = self._ahead, None
        self._ahead = None
        try:
            if first is None:
                first = self._next_member()
                if first is None:
                    self._finish()
                    return None
            key = first.key
            members = [first]
            while not members[-1].error:
                member = self._next_member()
                if member is None:
                    self.offset = -1  # this sample was the last
                    break
                if member.key != key:
                    self._ahead, self.offset = member, member.offset
                    break
                members.append(member)
        except _READ_ERRORS as e:
            logging.warning("webdataset shard %s breaks off near sample %r (%s)", self.path, key, e)
            return self._failure("truncated_shard", key)
        if members[-1].error:
            logging.warning("webdataset shard %s ends inside sample %r", self.path, key)
            return self._failure("truncated_shard", key)
        self.number += 1
        if self.offset < 0:
            self.close()
        elif self._tar is not None:
            # Stream mode keeps every TarInfo read so far; a shard of 10k samples would hold
            # 30k of them per open shard for nothing.
            self._tar.members = []
        image = next((m.data for m in members if m.ext in IMAGE_EXTENSIONS), None)
        by_ext = {m.ext: m.data for m in members if m.ext not in IMAGE_EXTENSIONS}
        return Sample(
            f"{self.name}/{key}",
            sample_index(self.name, key),
            image,
            by_ext.get(CAPTION_EXTENSION),
            cls=by_ext.get(LABEL_EXTENSION),
            metadata=by_ext.get(METADATA_EXTENSION),
        )


def read_in_order(shards: Sequence[str]) -> Iterator[Sample]:
    """Every sample of `shards`, shard after shard in the order given (evaluation, captions)."""
    for path in shards:
        reader = ShardReader(path)
        try:
            while (sample := reader.read()) is not None:
                yield sample
        finally:
            reader.close()


# ---------------------------------------------------------------------------
# One process's sample stream


class NoSamplesError(ValueError):
    """An epoch of this process's shards held no sample at all."""


def _seed(values: Iterable[int]) -> list[int]:
    return [int(v) % 2**32 for v in values]


class ShardStream:
    """This process's endless (or `num_epochs`-long) stream of raw samples, read in blocks.

    `read_block(n)` -> (the state the block started from, up to n samples), a shorter block at
    the end of each epoch; None after the last epoch. A stream made with that state reads the
    same block again (see the module docstring).
    """

    def __init__(
        self,
        shards: Sequence[str],
        *,
        seed: Sequence[int],
        process_index: int = 0,
        process_count: int = 1,
        interleave: int = 1,
        num_epochs: int | None = None,
        state: dict | None = None,
    ):
        if len(shards) < process_count:
            raise ValueError(
                f"{len(shards)} shard(s) for {process_count} processes: each process needs at least one"
            )
        self.shards = list(shards)
        self.seed = _seed(seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.interleave = max(1, int(interleave))
        self.num_epochs = num_epochs
        self._slots: list[tuple[int, ShardReader]] = []  # (position in the epoch's list, reader)
        self._restore(state or start_state())

    def epoch_shards(self, epoch: int) -> list[int]:
        """Indices into `shards` this process reads in `epoch`, in reading order."""
        order = np.random.default_rng([*self.seed, epoch]).permutation(len(self.shards))
        return order[self.process_index :: self.process_count].tolist()

    def state(self) -> dict:
        return {
            "epoch": self._epoch,
            "block": self._block,
            "next": self._next,
            "turn": self._turn,
            "slots": [[pos, *reader.position] for pos, reader in self._slots],
        }

    def _restore(self, state: dict) -> None:
        self.close()
        self._epoch, self._block = int(state["epoch"]), int(state["block"])
        self._next, self._turn = int(state["next"]), int(state["turn"])
        self._mine = self.epoch_shards(self._epoch)
        self._slots = [
            (int(pos), ShardReader(self.shards[self._mine[int(pos)]], offset, number))
            for pos, offset, number in state["slots"]
        ]
        # Only an epoch read from its start can tell that it is empty.
        self._from_start = self._next == 0 and not self._slots
        self._samples = 0  # real samples (not failures) read in this epoch
        self._failures: list[str] = []

    def close(self) -> None:
        for _, reader in self._slots:
            reader.close()

    @property
    def finished(self) -> bool:
        return self.num_epochs is not None and self._epoch >= self.num_epochs

    def _read(self) -> Sample | None:
        """The next sample in turn from the open shards; None at the end of the epoch."""
        while True:
            while len(self._slots) < self.interleave and self._next < len(self._mine):
                path = self.shards[self._mine[self._next]]
                self._slots.append((self._next, ShardReader(path)))
                self._next += 1
            if not self._slots:
                return None
            self._turn %= len(self._slots)
            sample = self._slots[self._turn][1].read()
            if sample is None:
                self._slots.pop(self._turn)[1].close()
                continue
            self._turn = (self._turn + 1) % len(self._slots)
            if sample.error:
                self._failures.append(f"{sample.name} ({sample.error})")
            else:
                self._samples += 1
            return sample

    def _end_epoch(self) -> None:
        if self._from_start and not self._samples:
            shown = "; ".join(self._failures[:3]) or "all empty"
            raise NoSamplesError(
                f"process {self.process_index} of {self.process_count} read no sample from its "
                f"{len(self._mine)} shard(s) in epoch {self._epoch} ({shown})"
            )
        self._restore({"epoch": self._epoch + 1, "block": 0, "next": 0, "turn": 0, "slots": []})

    def read_block(self, size: int) -> tuple[dict, list[Sample]] | None:
        if self.finished:
            return None
        state = self.state()
        samples: list[Sample] = []
        while len(samples) < size:
            sample = self._read()
            if sample is None:
                self._end_epoch()
                return state, samples
            samples.append(sample)
        self._block += 1
        return state, samples


def start_state(epoch: int = 0, next_shard: int = 0) -> dict:
    return {"epoch": int(epoch), "block": 0, "next": int(next_shard), "turn": 0, "slots": []}


# ---------------------------------------------------------------------------
# Decoding


class SampleReader:
    """The decoder's reader of tar samples (`clipjax.data.decode.Decoder`): each as a `Raw`
    example, its `label` the class of `label`. A module-level class so worker processes can
    unpickle it."""

    def __init__(self, label_field: str = "", class_names: Sequence[str] = (), box_field: str = ""):
        self.label_field = label_field
        self.class_index = {name: i for i, name in enumerate(class_names)}
        self.box_field = box_field
        self.boxes = bool(box_field)

    def box(self, sample: Sample) -> tuple | None:
        """The `.json` field `box_field` ('/' walks into nested objects): None where the sample has
        none, else its values as they are (the decoder drops a malformed box as bad_box)."""
        if sample.metadata is None:
            return None
        try:
            value = json.loads(sample.metadata)
            for part in self.box_field.split("/"):
                value = value[part]
        except (KeyError, TypeError, IndexError):
            return None
        except ValueError:
            return (float("nan"),)  # unreadable metadata: a malformed box
        try:
            return tuple(float(v) for v in value)
        except (TypeError, ValueError):
            return (float("nan"),)

    def label(self, sample: Sample) -> int:
        """The sample's class: its `.cls` member, else the `.json` field `label_field` ('/' walks
        into nested objects); an integer, or a name of `class_names`. -1: none, or unreadable."""
        value: Any = None
        if sample.cls is not None:
            value = sample.cls.decode("utf-8", "replace").strip()
        elif self.label_field and sample.metadata is not None:
            try:
                value = json.loads(sample.metadata)
                for part in self.label_field.split("/"):
                    value = value[part]
            except (ValueError, KeyError, TypeError, IndexError):
                return -1
        if isinstance(value, str):
            value = value.strip()
            if value in self.class_index:
                return self.class_index[value]
            try:
                value = int(value)
            except ValueError:
                return -1
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
            return -1
        return value

    def __call__(self, samples: Sequence[Sample], epochs=None) -> list[Raw]:
        return [
            Raw(
                s.index,
                s.image,
                s.caption,
                s.index,
                label=self.label(s),
                error=s.error,
                name=s.name,
                box=self.box(s) if self.boxes else None,
            )
            for s in samples
        ]


# ---------------------------------------------------------------------------
# Chunks, decoded ahead in threads or worker processes


class _Chunk(NamedTuple):
    block: dict  # the ShardStream state the block started from
    start: int  # positions [start, end) of the permuted block
    end: int
    samples: list[Sample]


def _chunks(
    stream: ShardStream, block_size: int, chunk_size: int, first_item: int, seed: Sequence[int]
) -> Iterator[_Chunk]:
    skip = first_item
    while (got := stream.read_block(block_size)) is not None:
        state, samples = got
        order = np.random.default_rng(
            [*seed, state["epoch"], state["block"], stream.process_index, stream.process_count]
        ).permutation(len(samples))
        for j in range(skip, len(samples), chunk_size):
            end = min(j + chunk_size, len(samples))
            yield _Chunk(state, j, end, [samples[i] for i in order[j:end]])
        skip = 0


class _End(NamedTuple):
    error: BaseException | None = None


class _Prefetcher:
    """Reads chunks in a thread (the tar I/O) and decodes them in a pool, in order.

    The reading thread runs up to `read_ahead` chunks ahead (about one shuffle block, so the
    next block is read while this one is decoded); at most `prefetch` chunks (or one per
    thread or worker, if more) are being decoded or wait decoded.
    """

    def __init__(
        self,
        make_chunks: Callable[[], Iterator[_Chunk]],
        decoder: Decoder,
        *,
        prefetch: int,
        read_ahead: int,
        threads: int,
        workers: int,
    ):
        self._make_chunks = make_chunks
        self._raw: queue.Queue = queue.Queue(maxsize=max(1, read_ahead))
        self._stop = threading.Event()
        # Every thread or worker needs a chunk of its own to work on.
        self._prefetch = max(1, prefetch, threads, workers)
        self._inflight: collections.deque = collections.deque()
        self._ended = False
        if workers > 0:
            self._executor = worker_pool.spawn_pool(workers, decoder)
            self._decode = worker_pool.run_job
        else:
            self._executor = concurrent.futures.ThreadPoolExecutor(max(1, threads))
            self._decode = decoder
        self._thread = threading.Thread(target=self._produce, name="clipjax-tar-reader", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._raw.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        chunks = None
        try:
            chunks = self._make_chunks()
            for chunk in chunks:
                if not self._put(chunk):
                    return
            self._put(_End())
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(_End(e))
        finally:
            if chunks is not None:
                chunks.close()  # closes the open shards

    def _submit(self, item) -> None:
        if isinstance(item, _End):
            self._inflight.append((item, None))
            self._ended = True
        else:
            self._inflight.append(
                (item, self._executor.submit(self._decode, item.samples, item.block["epoch"]))
            )

    def _top_up(self) -> None:
        while not self._ended and len(self._inflight) < self._prefetch:
            try:
                self._submit(self._raw.get_nowait())
            except queue.Empty:
                return

    def next(self) -> tuple[_Chunk, dict] | None:
        """The next chunk and its decoded arrays; None after the last."""
        self._top_up()
        if not self._inflight:
            if self._ended:
                return None
            self._submit(self._raw.get())
        item, future = self._inflight.popleft()
        self._top_up()
        if isinstance(item, _End):
            self._inflight.appendleft((item, None))  # stays the answer to every later call
            if item.error is not None:
                raise item.error
            return None
        return item, future.result()

    def close(self) -> None:
        self._stop.set()
        try:
            while True:
                self._raw.get_nowait()
        except queue.Empty:
            pass
        # The reader stops at its next chunk; a daemon thread, it is not waited for longer.
        self._thread.join(timeout=2)
        self._executor.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------
# Batches


def _process_state(state: dict) -> dict:
    return {
        "block": dict(state["block"]),
        "item": int(state["item"]),
        "seen": int(state["seen"]),
        "drops": state.get("drops"),  # absent from states of earlier versions
    }


class StreamIterator:
    """Local batches of one process (keys `decode.batch_keys`), resumable exactly.

    Use through `make_train_iterator`. `gather(own_state) -> [state of each process]` collects
    the positions of all processes for get_state(); None keeps only this one's.
    """

    def __init__(
        self,
        shards: Sequence[str],
        decoder: Decoder,
        drops: DropCounter,
        *,
        batch_size: int,
        seed: Sequence[int],
        process_index: int = 0,
        process_count: int = 1,
        shuffle_buffer: int = 1,
        interleave: int = 1,
        num_train: int | None = None,
        start_example: int = 0,
        num_epochs: int | None = None,
        prefetch: int = 4,
        threads: int = 1,
        workers: int = 0,
        gather: Callable[[dict], list[dict]] | None = None,
    ):
        self.shards = list(shards)
        self.decoder, self.drops = decoder, drops
        self.batch_size = int(batch_size)
        self.seed = _seed(seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.shuffle_buffer, self.interleave = int(shuffle_buffer), int(interleave)
        self.num_train, self.num_epochs = num_train, num_epochs
        self.prefetch, self.threads, self.workers = int(prefetch), int(threads), int(workers)
        self.gather = gather
        # Checked now rather than in the reading thread.
        ShardStream(self.shards, seed=self.seed, process_index=process_index, process_count=process_count)
        self._prefetcher: _Prefetcher | None = None
        self._start(self._approximate_start(int(start_example)))

    # -- positions --------------------------------------------------------------------------

    def _approximate_start(self, examples: int) -> dict:
        """About `examples` // process_count samples into this process's stream (module docstring)."""
        local = max(0, examples) // self.process_count
        if not local:
            return {"block": start_state(), "item": 0, "seen": 0}
        per_epoch = max(1, (self.num_train or 1) // self.process_count)
        epoch, into = divmod(local, per_epoch)
        count = len(self.shards[self.process_index :: self.process_count])
        next_shard = min(count - 1, into * count // per_epoch)
        return {"block": start_state(epoch, next_shard), "item": 0, "seen": local}

    def _start(self, state: dict) -> None:
        self.close()
        self._position = _process_state(state)
        self._chunk: _Chunk | None = None
        self._arrays: dict[str, np.ndarray] | None = None
        self._kept = np.zeros(0, np.int64)  # block positions of the current chunk's kept samples
        self._cursor = 0
        self.drops.restore(state.get("drops"))
        # The counts before the current chunk, and its drops by block position: a state counts
        # those before its position (a restored stream reads the chunk on from there).
        self._drops_before_chunk = self.drops.state()
        self._chunk_drops: list[tuple[int, str]] = []

    def _own_state(self) -> dict:
        if self._chunk is None:
            return dict(self._position)
        c = self._chunk
        item = int(self._kept[self._cursor]) if self._cursor < len(self._kept) else c.end
        before = self._drops_before_chunk
        counts = collections.Counter(before["counts"])
        counts.update(reason for position, reason in self._chunk_drops if position < item)
        drops = self.drops.state(counts, before["kept"] + self._cursor)
        return {"block": c.block, "item": item, "seen": self._seen, "drops": drops}

    def get_state(self) -> dict:
        own = json.loads(json.dumps(self._own_state()))
        states = self.gather(own) if self.gather is not None else None
        processes = {str(p): s for p, s in enumerate(states)} if states else {str(self.process_index): own}
        return {
            "format": STATE_FORMAT,
            "process_count": self.process_count,
            "num_shards": len(self.shards),
            "processes": processes,
        }

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a state of this data iterator (expected format {STATE_FORMAT!r})")
        processes = state["processes"]
        own = processes.get(str(self.process_index))
        if (
            own is not None
            and state["process_count"] == self.process_count
            and state["num_shards"] == len(self.shards)
        ):
            self._start(own)
            return
        # Another split of the shards: go on from about the samples seen, all processes together.
        seen = [int(s["seen"]) for s in processes.values()]
        total = sum(seen) * int(state["process_count"]) // max(1, len(seen))
        logging.warning(
            "data state of %s process(es) over %s shard(s) restored in %s process(es) over %s shard(s): "
            "continuing at about example %s of the stream, not exactly where it stopped",
            state["process_count"],
            state["num_shards"],
            self.process_count,
            len(self.shards),
            total,
        )
        self._start(self._approximate_start(total))

    # -- reading ----------------------------------------------------------------------------

    def _make_chunks(self) -> Iterator[_Chunk]:
        stream = ShardStream(
            self.shards,
            seed=self.seed,
            process_index=self.process_index,
            process_count=self.process_count,
            interleave=self.interleave,
            num_epochs=self.num_epochs,
            state=self._position["block"],
        )
        try:
            yield from _chunks(
                stream, self.shuffle_buffer, self.batch_size, self._position["item"], self.seed
            )
        finally:
            stream.close()

    def _pull(self) -> bool:
        """Make the next chunk current; False after the last."""
        if self._prefetcher is None:
            self._seen = self._position["seen"]
            self._prefetcher = _Prefetcher(
                self._make_chunks,
                self.decoder,
                prefetch=self.prefetch,
                read_ahead=max(self.prefetch, -(-self.shuffle_buffer // self.batch_size)),
                threads=self.threads,
                workers=self.workers,
            )
        got = self._prefetcher.next()
        if got is None:
            return False
        chunk, arrays = got
        self._drops_before_chunk = self.drops.state()
        self._chunk_drops = [(chunk.start + j, reason) for j, _, reason in arrays["_dropped"]]
        dropped = {position for position, _ in self._chunk_drops}
        self._chunk, self._arrays = chunk, self.drops(arrays)
        self._kept = np.array([p for p in range(chunk.start, chunk.end) if p not in dropped], np.int64)
        self._cursor = 0
        return True

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts, need = [], self.batch_size
        while need:
            if self._chunk is None or self._cursor >= len(self._kept):
                if not self._pull():
                    break
                continue
            take = min(need, len(self._kept) - self._cursor)
            parts.append(
                {k: self._arrays[k][self._cursor : self._cursor + take] for k in batch_keys(self._arrays)}
            )
            self._cursor += take
            need -= take
        if not parts:
            raise StopIteration
        self._seen += self.batch_size - need
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def close(self) -> None:
        if getattr(self, "_prefetcher", None) is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def __del__(self):
        self.close()


def make_train_iterator(
    shards: Sequence[str],
    decoder: Decoder,
    data_config,
    *,
    shuffle_buffer: int,
    interleave: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_example: int = 0,
    num_epochs: int | None = None,
    gather: Callable[[dict], list[dict]] | None = None,
    naflex: NaflexInputs | None = None,
) -> TrainIterator:
    """Endless (or `num_epochs`, the last batch then short) iterator over this process's local
    batches of `shards`: blocks of `shuffle_buffer` samples shuffled, `interleave` shards read at
    once (module docstring). Reads from the complete `data_config`: batch_size (global),
    shuffle_seed, num_train, worker_count (`workers.worker_processes`), read_threads, prefetch,
    max_bad_fraction, random_resized_crop. `naflex`: a NaFlex model's patch batches, one sequence
    length each (clipjax.data.naflex)."""
    local = local_batch(data_config, process_index, process_count)
    stream_seed = (int(seed) % 2**32, int(data_config.shuffle_seed) % 2**32)
    crop_scale = tuple(getattr(data_config, "random_resized_crop", ()) or ())
    if crop_scale:
        decoder = decoder.with_random_crop(crop_scale, stream_seed)
    if naflex is not None:
        decoder = decoder.with_naflex(naflex)
    num_train = int(data_config.num_train)
    drops = DropCounter.for_training(data_config, num_train // process_count)
    iterator = StreamIterator(
        shards,
        decoder,
        drops,
        batch_size=local,
        seed=stream_seed,
        process_index=process_index,
        process_count=process_count,
        shuffle_buffer=shuffle_buffer,
        interleave=interleave,
        num_train=num_train,
        start_example=start_example,
        num_epochs=num_epochs,
        prefetch=int(data_config.prefetch),
        threads=int(data_config.read_threads),
        workers=worker_pool.worker_processes(int(data_config.worker_count), decoder),
        gather=gather,
    )
    return TrainIterator(iterator if naflex is None else OneLengthBatches(iterator, naflex), drops)
