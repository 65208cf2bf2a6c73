"""Image-text pairs -> ArrayRecord shards, on every core, resumably: `python -m clipjax.data.convert`.

    python -m clipjax.data.convert ~/photos/captions.csv --data_dir ~/clipjax_data
    python -m clipjax.data.convert ~/photos --data_dir ~/clipjax_data --test_fraction 0.05
    python -m clipjax.data.convert 'shards/{00000..00099}.tar' --data_dir ~/clipjax_data

SOURCE is a CSV (image,caption), a folder of images with same-named .txt captions, or webdataset
tar shards; what is written and how: `clipjax.data.prepare.convert`. The last line printed is
the training flags that read the output. Mistakes are one line (exit status 2).
"""

from __future__ import annotations

import sys

from absl import app, flags

from clipjax import paths
from clipjax.data.prepare import convert

PROG = "python -m clipjax.data.convert"
FLAGS = flags.FLAGS


def _fail(message: str):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse(argv: list[str]) -> list[str]:
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _fail(str(e).strip().splitlines()[0])


def main(argv: list[str]) -> None:
    missing = [name for name, given in (("source", argv[1:]), ("--data_dir", FLAGS.data_dir)) if not given]
    if missing:
        _fail(f"the following arguments are required: {', '.join(missing)}")
    if len(argv) > 2:
        _fail(f"unrecognized arguments: {' '.join(argv[2:])}")
    source = argv[1]
    try:
        result = convert.convert(
            source,
            FLAGS.data_dir,
            test_fraction=FLAGS.test_fraction,
            shard_size=FLAGS.shard_size,
            workers=FLAGS.workers,
            webdataset=True if FLAGS.webdataset else None,
            progress=not FLAGS.quiet,
        )
    except (OSError, ValueError) as e:  # the message says it all; the traceback would not help
        _fail(str(e))
    if not result.records:
        print(f"convert: {result.version_dir} is converted already")
    else:
        counts = ", ".join(f"{split} {n}" for split, n in result.records.items())
        print(
            f"convert: wrote {sum(result.records.values())} records ({counts}) to {result.version_dir}; "
            f"{len(result.converted)} unit(s) converted now, {len(result.done_before)} by an earlier run"
        )
    if FLAGS.webdataset or convert.is_webdataset(source):
        train = (
            f"--config.data.name=tfds --config.data.tfds_name=image_text_folder/{result.config} "
            "--config.data.tfds_caption_key=caption"
        )
        if FLAGS.test_fraction:
            train += " --config.data.tfds_eval_split=test"
    else:
        train = (
            f"--config.data.name=image_text_folder --config.data.source={paths.resolve(source)} "
            f"--config.data.test_fraction={FLAGS.test_fraction}"
        )
    print(f"convert: train on it with {train} --config.data.data_dir={paths.resolve(FLAGS.data_dir)}")


def run() -> None:
    flags.DEFINE_string("data_dir", None, "where the dataset goes (data.data_dir when training)")
    flags.DEFINE_float("test_fraction", 0.02, "share held out as the test split")
    flags.DEFINE_integer("shard_size", 1000, "pairs per output shard (CSV or folder)")
    flags.DEFINE_integer("workers", 0, "worker processes (0: one per available core)")
    flags.DEFINE_bool("webdataset", False, "the source names tar shards (a list file)")
    flags.DEFINE_bool("quiet", False, "no progress bar")
    app.run(main, flags_parser=_parse)


if __name__ == "__main__":
    run()
