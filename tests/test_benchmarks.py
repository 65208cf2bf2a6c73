"""The classification benchmarks, each on a stand-in with the real dataset's features, splits and
class names (tests/benchmark_data.py), scored by encoders whose right answer is known."""

import numpy as np
import pytest

from clipjax.config import ConfigError, default_config, validate
from clipjax.evals import EVALUATORS
from clipjax.evals.classification import BENCHMARKS
from clipjax.evals.runner import enabled_evaluators
from tests.benchmark_data import label_of, real_builder, write_classification_like

NUM_EVAL = 11  # not a multiple of the batch size: the last batch is short


class KnownAnswerEncoders:
    """Image -> one-hot of the class drawn in its pixels (mapped through `wrong`, when given;
    plus a heavier `decoy` class, when given); prompt -> one-hot of the class it names."""

    def __init__(self, num_classes, names, templates, *, wrong=None, decoy=None):
        self.num_classes = num_classes
        self.prompt_class = {}
        for c, name in enumerate(names):
            for t in templates:
                self.prompt_class.setdefault(t.format(name), c)
        self.wrong, self.decoy = wrong, decoy
        self.prompts_seen: list[str] = []

    def _one_hot(self, classes):
        out = np.zeros((len(classes), self.num_classes), np.float32)
        out[np.arange(len(classes)), classes] = 1.0
        return out

    def image(self, images):
        labels = label_of(images)
        if self.wrong is not None:
            labels = self.wrong[labels]
        emb = self._one_hot(labels)
        if self.decoy is not None:
            emb[:, self.decoy] = 1.5
        return emb / np.linalg.norm(emb, axis=1, keepdims=True)

    def text(self, strings):
        self.prompts_seen += list(strings)
        return self._one_hot([self.prompt_class[s] for s in strings])

    # One process: its share of the images is all of them.
    def local_batch_size(self, batch_size):
        return batch_size

    def local_image(self, images, length, batch_size=0):
        return self.image(images)


@pytest.fixture(scope="module")
def benchmark_dir(tmp_path_factory):
    """Every benchmark's stand-in: NUM_EVAL examples of spread-out classes in its evaluation
    split, and a train split of every class present (for the probes)."""
    root = tmp_path_factory.mktemp("benchmarks")
    written = {}
    for section, benchmark in BENCHMARKS.items():
        num_classes = (
            real_builder(benchmark.dataset, str(root / "scratch")).info.features["label"].num_classes
        )
        labels = np.linspace(0, num_classes - 1, NUM_EVAL).astype(int)
        # ImageNet-A/R: 200 of the 1000 classes; here the few drawn above, not class 1 (the decoy).
        splits = {benchmark.split: labels.tolist(), "train": np.repeat(labels, 2).tolist()}
        written[section] = write_classification_like(
            benchmark.dataset, str(root / "tfds"), splits, scratch=str(root / "scratch")
        )
    return root / "tfds", written


def _evaluator(section, data_dir, **settings):
    config = default_config()
    config.data.image_size = 16
    getattr(config.evals, section).enabled = True
    getattr(config.evals, section).data_dir = str(data_dir)
    getattr(config.evals, section).batch_size = 4
    for key, value in settings.items():
        setattr(getattr(config.evals, section), key, value)
    enabled = enabled_evaluators(config.evals)
    return EVALUATORS["classification"](section, enabled[section], None, config), config


@pytest.mark.parametrize("section", sorted(BENCHMARKS))
def test_benchmark_scores_a_known_answer_exactly(benchmark_dir, section):
    data_dir, _ = benchmark_dir
    benchmark = BENCHMARKS[section]
    evaluator, config = _evaluator(section, data_dir)
    validate(config, num_devices=8)  # the section's own checks pass on the prepared stand-in
    if section.startswith("imagenet"):
        assert len(evaluator.zero_shot_task()[1]) == 80  # CLIP's ensemble; two of them below, for speed
        evaluator, _ = _evaluator(section, data_dir, templates="stl10")
    names, templates = evaluator.zero_shot_task()
    num_classes = len(names)

    right = KnownAnswerEncoders(num_classes, names, templates)
    result = evaluator.run(right)["classification"][benchmark.dataset]
    assert result["split"] == benchmark.split and result["num_examples"] == NUM_EVAL
    assert result["zero_shot"]["top1"] == 1.0 and result["zero_shot"]["top5"] == 1.0
    # The published class names went into the prompts, not label ids or WordNet ids.
    first = {"imagenet": "tench", "cifar10": "airplane", "food101": "apple pie", "caltech101": "accordion"}
    if section.startswith("imagenet"):
        assert any("tench" in p for p in right.prompts_seen) and not any(
            "n0144" in p for p in right.prompts_seen
        )
    elif section in first:
        assert any(first[section] in p for p in right.prompts_seen)

    # Every image mapped to another class: top-1 is 0; top-5 follows the tie rule (lower index first).
    wrong = np.roll(np.arange(num_classes), 1)
    result = evaluator.run(KnownAnswerEncoders(num_classes, names, templates, wrong=wrong))
    zero_shot = result["classification"][benchmark.dataset]["zero_shot"]
    assert zero_shot["top1"] == 0.0
    labels = np.linspace(0, num_classes - 1, NUM_EVAL).astype(int)
    if benchmark.present_classes_only:
        # Only the split's classes compete, all at 0: the five of lowest index are in the top 5.
        expected_top5 = np.mean(np.searchsorted(np.unique(labels), labels) < 5)
    else:
        # Class c scores 0, behind the wrong class c - 1 and the c - 1 others of lower index.
        expected_top5 = np.mean(labels < 5)
    assert zero_shot["top5"] == pytest.approx(expected_top5)


@pytest.mark.parametrize("section,restricted", [("imagenet_r", True), ("imagenet_sketch", False)])
def test_imagenet_a_and_r_score_only_their_classes(benchmark_dir, section, restricted):
    data_dir, _ = benchmark_dir
    evaluator, _ = _evaluator(section, data_dir, templates="stl10")
    names, templates = evaluator.zero_shot_task()
    # Class 1 outscores the right class, but ImageNet-R does not have it: not a candidate there.
    decoyed = KnownAnswerEncoders(len(names), names, templates, decoy=1)
    top1 = evaluator.run(decoyed)["classification"][BENCHMARKS[section].dataset]["zero_shot"]["top1"]
    assert top1 == (1.0 if restricted else 0.0)


def test_probes_and_knn_on_a_benchmark_train_split(benchmark_dir):
    data_dir, _ = benchmark_dir
    evaluator, _ = _evaluator("cifar10", data_dir, linear_probe=True, knn=True, train_examples=50)
    names, templates = evaluator.zero_shot_task()
    result = evaluator.run(KnownAnswerEncoders(len(names), names, templates))["classification"]["cifar10"]
    assert result["linear_probe"]["top1"] == 1.0 and result["knn"]["top1@k1"] == 1.0


def test_max_examples_and_split_are_per_section(benchmark_dir):
    data_dir, _ = benchmark_dir
    evaluator, _ = _evaluator("cifar100", data_dir, split="train", max_examples=7)
    names, templates = evaluator.zero_shot_task()
    result = evaluator.run(KnownAnswerEncoders(len(names), names, templates))["classification"]["cifar100"]
    assert (result["split"], result["num_examples"]) == ("train", 7)


def test_a_benchmark_that_is_not_prepared_is_one_line(tmp_path):
    config = default_config()
    config.evals.imagenet.enabled = True
    config.evals.imagenet.data_dir = str(tmp_path)
    with pytest.raises(ConfigError, match=r"^evals.imagenet.dataset: .*imagenet2012.*not prepared") as info:
        validate(config, num_devices=8)
    assert "\n" not in str(info.value)


class CaptionAnswerEncoders:
    """Image -> one-hot of the image number drawn in its pixels; caption 'image I, caption J'
    -> one-hot of I (mapped through `wrong`, when given)."""

    def __init__(self, num_images, wrong=None):
        self.num_images, self.wrong = num_images, wrong

    def _one_hot(self, rows):
        out = np.zeros((len(rows), self.num_images), np.float32)
        out[np.arange(len(rows)), rows] = 1.0
        return out

    def image(self, images):
        return self._one_hot(label_of(images))

    def text(self, strings):
        rows = np.array([int(s.split(",")[0].split()[-1]) for s in strings])
        return self._one_hot(rows if self.wrong is None else self.wrong[rows])

    # One process: its share of the images is all of them.
    def local_batch_size(self, batch_size):
        return batch_size

    def local_image(self, images, length, batch_size=0):
        return self.image(images)


def _captions(num_images, per_image):
    return [[f"image {i}, caption {j}" for j in range(per_image(i))] for i in range(num_images)]


def test_coco_section_scores_several_captions_per_image(tmp_path):
    from tests.benchmark_data import write_captions_like

    captions = _captions(9, lambda i: 5)
    captions[3] = ["   "]  # no usable caption: skipped and counted
    name = write_captions_like(str(tmp_path), {"train": _captions(2, lambda i: 1), "test": captions})
    config = default_config()
    config.data.image_size = 16
    config.evals.coco.enabled = True
    config.evals.coco.data_dir = str(tmp_path)
    config.evals.coco.batch_size = 4
    validate(config, num_devices=8)
    settings = enabled_evaluators(config.evals)["coco"]
    evaluator = EVALUATORS["caption_retrieval"]("coco", settings, None, config)
    result = evaluator.run(CaptionAnswerEncoders(9))["caption_retrieval"]["coco_captions"]
    assert name == "coco_captions/2014" and result["split"] == "test"
    assert (result["num_images"], result["num_captions"], result["skipped"]) == (8, 40, {"no_caption": 1})
    for direction in ("image_to_text", "text_to_image"):
        assert result[direction]["R@1"] == 1.0
    wrong = np.roll(np.arange(9), 1)
    result = evaluator.run(CaptionAnswerEncoders(9, wrong=wrong))["caption_retrieval"]["coco_captions"]
    assert result["image_to_text"]["R@1"] == 0.0 and result["text_to_image"]["R@1"] == 0.0


def test_records_with_the_same_image_are_one_image_with_all_their_captions(tmp_path):
    """One caption per record, each image in several records (a converted Flickr30k CSV)."""
    from tests.benchmark_data import write_captions_like

    rows = [[f"image {i % 4}, caption {i // 4}"] for i in range(12)]  # 4 images x 3 captions
    name = write_captions_like(
        str(tmp_path), {"test": rows}, name="own_pairs", config=None, image_of=lambda i: i % 4
    )
    config = default_config()
    config.data.image_size = 16
    config.evals.coco.enabled = True
    config.evals.coco.dataset = name
    config.evals.coco.data_dir = str(tmp_path)
    settings = enabled_evaluators(config.evals)["coco"]
    result = EVALUATORS["caption_retrieval"]("coco", settings, None, config).run(CaptionAnswerEncoders(4))
    own = result["caption_retrieval"]["own_pairs"]
    assert (own["num_images"], own["num_captions"]) == (4, 12)
    assert own["image_to_text"]["R@1"] == 1.0 and own["text_to_image"]["R@1"] == 1.0


def test_caption_keys_are_checked_in_one_line(tmp_path):
    from tests.benchmark_data import write_captions_like

    write_captions_like(str(tmp_path), {"test": _captions(2, lambda i: 2)})
    config = default_config()
    config.evals.coco.enabled = True
    config.evals.coco.data_dir = str(tmp_path)
    config.evals.coco.caption_key = "captions/txt"
    with pytest.raises(ConfigError, match=r"^evals.coco.caption_key: 'captions/txt' is not a text feature"):
        validate(config, num_devices=8)


_STREAMING_SCRIPT = r"""
import json, resource, sys
import numpy as np
from clipjax.config import default_config
from clipjax.evals import EVALUATORS
from clipjax.evals.runner import enabled_evaluators
from tests.test_benchmarks import KnownAnswerEncoders

data_dir, size, batch, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
config = default_config()
config.data.image_size = size
config.evals.cifar10.update(enabled=True, data_dir=data_dir, batch_size=batch, max_examples=limit)
evaluator = EVALUATORS["classification"]("cifar10", enabled_evaluators(config.evals)["cifar10"], None, config)
names, templates = evaluator.zero_shot_task()
encoders = KnownAnswerEncoders(len(names), names, templates)
evaluator.settings = {**evaluator.settings, "max_examples": 2 * batch}
evaluator.run(encoders)  # everything imported and allocated once
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
evaluator.settings = {**evaluator.settings, "max_examples": limit}
result = evaluator.run(encoders)["classification"]["cifar10"]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_kib": after - before, "top1": result["zero_shot"]["top1"], "n": result["num_examples"]}))
"""


def test_an_evaluation_streams_with_memory_bounded_by_a_few_batches(tmp_path):
    """2,000 images of 96 px (55 MB decoded) in batches of 50 (1.4 MB): the peak resident memory
    of the evaluation grows by a few batches, not by the split (the 50,000 images of ImageNet's
    validation split at 224 px would be 7.5 GB)."""
    import json
    import subprocess
    import sys

    from tests.helpers import ROOT

    size, batch, count = 96, 50, 2000
    labels = (np.arange(count) % 10).tolist()
    write_classification_like(
        "cifar10", str(tmp_path / "tfds"), {"test": labels}, image_size=size, scratch=str(tmp_path / "s")
    )
    out = subprocess.run(
        [sys.executable, "-c", _STREAMING_SCRIPT, str(tmp_path / "tfds"), str(size), str(batch), str(count)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    assert measured["n"] == count and measured["top1"] == 1.0
    whole_split_kib = count * size * size * 3 / 1024
    assert measured["growth_kib"] < whole_split_kib / 5, (measured, whole_split_kib)
