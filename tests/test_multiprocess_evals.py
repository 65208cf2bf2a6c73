"""Two processes evaluate a checkpoint exactly as one does, each encoding only its share.

Each input count below is a multiple of neither the batch nor the process count, so every
process pads its last batch (and one classification record in each half is undecodable): a
padded or dropped row that counted would change the figures."""

import json
import subprocess
import sys

import pytest

from tests.benchmark_data import write_captions_like
from tests.test_classification_data import _SKIP_STATS, TinyClasses, _image, _png
from tests.test_multiprocess import _env, _launch_two_processes
from tests.helpers import ROOT

# clipjax.evaluate with a count of the rows each process hands its encoders, written at exit.
COUNTING_EVALUATE = """
import atexit, json, os, sys
from clipjax.evals.encoders import Encoders

import PIL.Image
from clipjax.data.decode import Decoder

rows = {"image": 0, "tokens": 0, "decoded": 0, "opened": 0}

def counting_calls(function, kind):
    def call(*args, **kwargs):
        rows[kind] += 1
        return function(*args, **kwargs)
    return call

# Each example a data source decodes, and each image file opened (caption and classification
# evaluators decode their own).
Decoder._image = counting_calls(Decoder._image, "decoded")
PIL.Image.open = counting_calls(PIL.Image.open, "opened")

def counting(method, kind):
    def encode(self, inputs, *args, **kwargs):
        rows[kind] += len(inputs)
        return method(self, inputs, *args, **kwargs)
    return encode

Encoders.local_image = counting(Encoders.local_image, "image")
Encoders.local_tokens = counting(Encoders.local_tokens, "tokens")
path = os.path.join(sys.argv.pop(1), "rows.%s.json" % os.environ.get("CLIPJAX_PROCESS_ID", "0"))
atexit.register(lambda: json.dump(rows, open(path, "w")))
from clipjax.evaluate import main
main()
"""


class DropClasses(TinyClasses):
    """tiny_classes with 23 test and 19 train records, two test images undecodable."""

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"test": self._examples("test", 23, bad=(5, 17)), "train": self._examples("train", 19)}

    def _examples(self, split, num, bad=()):
        for i in range(num):
            image = b"not an image" if i in bad else _png(_image(i, i % 3))
            yield f"{split}{i}", {"image": image, "label": i % 3}


@pytest.fixture
def checkpoint(tiny_run):
    return tiny_run.workdir


def test_two_processes_report_what_one_does_each_encoding_half(checkpoint, tmp_path):
    data = tmp_path / "data"
    DropClasses(data_dir=str(data)).download_and_prepare(download_config=_SKIP_STATS)
    # 9 records, the last two repeating the first two images: 7 images, 14 captions.
    write_captions_like(
        str(data), {"test": [[f"a {i}", f"the {i}"] for i in range(9)]}, image_of=lambda i: i % 7
    )
    flags = [
        "--config.evals.max_examples=101",
        "--config.evals.batch_size=24",  # 8 devices: 12 rows of each process per call
        "--config.evals.linear_probe.train_examples=77",
        "--config.evals.knn.train_examples=77",
        "--config.evals.classification.enabled=True",
        "--config.evals.classification.dataset=drop_classes",
        f"--config.evals.classification.data_dir={data}",
        "--config.evals.classification.batch_size=8",
        "--config.evals.classification.train_examples=15",
        "--config.evals.coco.enabled=True",
        f"--config.evals.coco.data_dir={data}",
        "--config.evals.coco.batch_size=8",
    ]

    def command(out):
        out.mkdir()
        return [
            sys.executable,
            "-c",
            COUNTING_EVALUATE,
            str(out),
            "--workdir",
            str(checkpoint),
            "--out",
            str(out),
            *flags,
        ]

    one = subprocess.run(
        command(tmp_path / "one"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(CLIPJAX_LOCAL_DEVICES="8"),
        timeout=600,
    )
    assert one.returncode == 0, one.stdout + one.stderr
    procs = _launch_two_processes(command(tmp_path / "two"))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out

    def report(name):
        return {k: v for k, v in json.load(open(tmp_path / name / "report.json")).items() if k != "timing"}

    single = report("one")
    assert single["num_examples"] == 101 and "skipped" not in single
    classes = single["classification"]["drop_classes"]
    assert (classes["num_examples"], classes["skipped"]) == (21, {"bad_image": 2})
    assert {"zero_shot", "linear_probe", "knn"} <= set(classes)
    coco = single["caption_retrieval"]["coco_captions"]
    assert (coco["num_images"], coco["num_captions"]) == (7, 18)
    assert report("two") == single

    rows = [
        json.load(open(tmp_path / name / f"rows.{i}.json"))
        for name, i in (("one", 0), ("two", 0), ("two", 1))
    ]
    for kind in ("image", "tokens"):
        alone, first, second = (r[kind] for r in rows)
        assert first + second == alone, kind
        # Every input set is split in two halves that differ by at most one row.
        assert 0 <= first - second <= 12, (kind, first, second)
    # Each process reads and decodes only its share: every example and image file once in all.
    for kind in ("decoded", "opened"):
        alone, first, second = (r[kind] for r in rows)
        assert alone and first + second == alone and first and second, (kind, alone, first, second)


def test_a_share_of_a_split_is_a_split_string_of_its_records(tmp_path):
    from clipjax.evals import classification_data as datasets
    from clipjax.evals.classification import _split_rows

    DropClasses(data_dir=str(tmp_path)).download_and_prepare(download_config=_SKIP_STATS)
    builder = datasets.get_builder("drop_classes", str(tmp_path))
    assert _split_rows(builder, "test", slice(12, 23)) == "test[12:23]"
    assert _split_rows(builder, "train[2:12]+test", slice(5, 15)) == "train[7:12]+test[0:5]"
    assert _split_rows(builder, "train[:50%]", slice(3, 9)) == "train[3:9]"
    assert _split_rows(builder, "test", slice(23, 23)) == ""
    train, test = (
        datasets.split_labels("drop_classes", str(tmp_path), s).tolist() for s in ("train", "test")
    )
    labels = datasets.split_labels("drop_classes", str(tmp_path), "train[7:12]+test[0:5]")
    assert labels.tolist() == train[7:12] + test[0:5]
