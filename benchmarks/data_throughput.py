"""Input-pipeline throughput: JPEGs of 256-512 px decoded to 224 px, through the real pipeline.

    python benchmarks/data_throughput.py                      # 1 and 2 worker processes
    python benchmarks/data_throughput.py --workers 0,1,2,4 --images 600 --batches 40

Photo-like JPEGs (smooth colour fields plus grain, quality 90, sides drawn from 256-512 px) are
serialised as the records clipjax's sources store and read back by `pipeline.make_train_iterator`
over an in-memory record source: parsing, decoding (`clipjax.data.images.decode_image`: JPEG
draft, centre crop, bicubic resize), tokenising, the hand-over from the worker processes and the
rebatching all count. Beside it, the raw rate of the same `decode_image` calls in a plain loop on
one core, with and without JPEG draft (which only reduces JPEGs whose shorter side has twice the
output size: a second table times those alone). The first table gives images/s, images/s
per core used for decoding (worker processes, or the one process for worker_count=0) and that
per-core rate over the raw one; the pipeline's own cost is what keeps it below 100%. Each row is
the best of `--rounds` interleaved measurements. With as many workers as cores, the main
process (hand-over, batching) shares the cores: per core then reads a little low.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np
from PIL import Image, JpegImagePlugin

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clipjax.config import apply_overrides, default_config  # noqa: E402
from clipjax.data import pipeline, records, tokenizers, workers as worker_pool  # noqa: E402
from clipjax.data.decode import Decoder, RecordReader  # noqa: E402
from clipjax.data.images import decode_image  # noqa: E402


def photo_jpeg(rng: np.random.Generator, low: int, high: int) -> bytes:
    """A JPEG that compresses and decodes like a photograph: smooth colour fields plus grain."""
    w, h = (int(v) for v in rng.integers(low, high + 1, size=2))
    coarse = rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
    pixels = np.clip(field + rng.normal(0, 8, (h, w, 3)).astype(np.float32), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def record(image: bytes, caption: str, index: int) -> bytes:
    """One record as clipjax's prepared datasets store it (text_id: the index)."""
    return records.pair_record(image, caption.encode(), index, text_id=index)


class MemoryRecords:
    """A random-access record source in memory (what `RecordReader` reads)."""

    def __init__(self, records: list[bytes]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitems__(self, ids) -> list[bytes]:
        return [self.records[i] for i in ids]


def raw_rate(jpegs: list[bytes], size: int, repeats: int, draft: bool = True) -> float:
    """Images/s of decode_image in a plain loop (one core), best of `repeats` passes."""
    original = JpegImagePlugin.JpegImageFile.draft
    if not draft:
        JpegImagePlugin.JpegImageFile.draft = lambda self, mode, size: None
    try:
        best = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            for data in jpegs:
                decode_image(data, size)
            best = max(best, len(jpegs) / (time.perf_counter() - start))
        return best
    finally:
        JpegImagePlugin.JpegImageFile.draft = original


def pipeline_rate(source: MemoryRecords, size: int, batch: int, workers: int, batches: int) -> float:
    """Images/s of the training iterator, after a warm-up that starts the worker processes."""
    config = apply_overrides(
        default_config(),
        {
            "data.batch_size": batch,
            "data.image_size": size,
            "data.worker_count": workers,
            "data.max_bad_fraction": 1.0,
        },
    )
    tokenizer = tokenizers.make_tokenizer(dict(kind="byte", max_len=32))
    decoder = Decoder(RecordReader(source), size, tokenizer=tokenizer)
    iterator = pipeline.make_train_iterator(decoder, config.data, seed=0)
    try:
        for _ in range(max(2, workers * 2)):  # every worker has started and filled its buffer
            next(iterator)
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        return batches * batch / (time.perf_counter() - start)
    finally:
        iterator.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=300, help="distinct JPEGs generated")
    parser.add_argument("--min-side", type=int, default=256)
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--size", type=int, default=224, help="the output size (data.image_size)")
    parser.add_argument("--batch", type=int, default=64, help="the local batch")
    parser.add_argument("--batches", type=int, default=20, help="batches timed per pipeline row")
    parser.add_argument("--workers", default="1,2", help="comma-separated data.worker_count values")
    parser.add_argument("--repeats", type=int, default=3, help="passes of the raw loop (best kept)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="measure every row this many times, interleaved; best kept"
    )
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    jpegs = [photo_jpeg(rng, args.min_side, args.max_side) for _ in range(args.images)]
    # Draft reduces a JPEG only when its shorter side keeps at least twice the output size.
    large = [
        photo_jpeg(rng, 2 * args.size, max(2 * args.size, args.max_side)) for _ in range(args.images // 3)
    ]
    source = MemoryRecords([record(data, f"a photo number {i}", i) for i, data in enumerate(jpegs)])
    mean_kb = sum(map(len, jpegs)) / len(jpegs) / 1024
    print(
        f"{args.images} JPEGs, sides {args.min_side}-{args.max_side} px (mean {mean_kb:.0f} KB) -> "
        f"{args.size} px; batch {args.batch}; {worker_pool.available_cores()} cores available"
    )

    worker_counts = [int(w) for w in args.workers.split(",")]
    # Rounds interleave the rows, so that a burst of load elsewhere on the machine costs one
    # measurement of one row, not a whole row.
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for key, measure in (
            ("no_draft", lambda: raw_rate(jpegs, args.size, args.repeats, draft=False)),
            ("raw", lambda: raw_rate(jpegs, args.size, args.repeats)),
            ("large", lambda: raw_rate(large, args.size, args.repeats)),
            ("large_no_draft", lambda: raw_rate(large, args.size, args.repeats, draft=False)),
            *(
                (w, lambda w=w: pipeline_rate(source, args.size, args.batch, w, args.batches))
                for w in worker_counts
            ),
        ):
            best[key] = max(best.get(key, 0.0), measure())
    raw = best["raw"]
    rows = [
        ("decode_image loop, no JPEG draft", "-", best["no_draft"], best["no_draft"]),
        ("decode_image loop (raw)", "-", raw, raw),
    ]
    for w in worker_counts:
        rows.append(("pipeline (make_train_iterator)", str(w), best[w], best[w] / max(w, 1)))

    print()
    print("| what | worker processes | images/s | images/s per core | per core / raw |")
    print("| --- | --- | --- | --- | --- |")
    for what, workers, rate, per_core in rows:
        print(f"| {what} | {workers} | {rate:,.0f} | {per_core:,.0f} | {per_core / raw:.0%} |")
    print()
    side = f"{2 * args.size}-{max(2 * args.size, args.max_side)} px"
    print(f"| JPEG draft, {side} JPEGs -> {args.size} px, one core | images/s |")
    print("| --- | --- |")
    print(f"| full decode, then resize | {best['large_no_draft']:,.0f} |")
    print(f"| decoded at 1/2 scale (draft), then resize | {best['large']:,.0f} |")


if __name__ == "__main__":
    main()
