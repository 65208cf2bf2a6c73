"""A data source, an evaluator and an objective added from outside clipjax: each one class or
function plus one registry line, then trained with together."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clipjax
from clipjax import trainer
from clipjax.config import ConfigError, apply_overrides, validate
from clipjax.data.decode import BATCH_KEYS
from clipjax.data.sources import SOURCES, DataSource, register_source
from clipjax.evals import EVALUATORS, Evaluator, register_evaluator
from clipjax.losses import OBJECTIVES, register_objective
from clipjax.schema import Field
from tests.helpers import load_config

COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20)}
NAMES = list(COLORS)


def _examples(n, seed, image_size):
    """Solid squares of one colour each, captioned with the colour."""
    rng = np.random.default_rng(seed)
    color = rng.integers(0, len(NAMES), n)
    image = np.zeros((n, image_size, image_size, 3), np.uint8)
    image[:] = np.array([COLORS[NAMES[c]] for c in color], np.uint8)[:, None, None, :]
    captions = [f"a {NAMES[c]} square" for c in color]
    return {"image": image, "caption": captions, "color": color.astype(np.int32)}


class _ArrayBatches:
    """An endless, resumable batch iterator over in-memory arrays (the TrainIterator contract)."""

    def __init__(self, arrays, batch_size, tokenizer, offset, stride):
        self.arrays, self.batch_size, self.tokenizer = arrays, batch_size, tokenizer
        self.offset, self.stride, self.position = offset, stride, 0
        self.drop_counts = {}

    def __iter__(self):
        return self

    def __next__(self):
        n = len(self.arrays["color"])
        start = self.position * self.stride + self.offset
        idx = np.arange(start, start + self.batch_size) % n
        self.position += 1
        captions = [self.arrays["caption"][i] for i in idx]
        return {
            "image": self.arrays["image"][idx],
            "text": self.tokenizer.encode(captions),
            "text_id": np.array([hash(c) % 2**31 for c in captions], np.int32),
            "index": idx.astype(np.int32),
            "label": self.arrays["color"][idx],
        }

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = int(state["position"])


class ToyColorSource(DataSource):
    name = "toy_colors"
    FIELDS = {"toy_num_test": Field(48, "held-out toy examples", minimum=1)}

    def _split(self, split):
        n = self.config.num_train if split == "train" else self.config.toy_num_test
        return _examples(n, 0 if split == "train" else 1, self.config.image_size)

    def train_iterator(self, tokenizer, *, seed, process_index=0, process_count=1, start_example=0):
        local = self.config.batch_size // process_count
        offset = start_example + process_index * local
        return _ArrayBatches(self._split("train"), local, tokenizer, offset, self.config.batch_size)

    def eval_arrays(self, tokenizer, split="test", max_examples=None):
        arrays = self._split(split)
        n = min(max_examples or len(arrays["color"]), len(arrays["color"]))
        captions = arrays["caption"][:n]
        return {
            "image": arrays["image"][:n],
            "text": tokenizer.encode(captions),
            "text_id": np.arange(n, dtype=np.int32),
            "label": arrays["color"][:n],
            "color": arrays["color"][:n],
            "caption": np.array(captions),
        }

    def caption_texts(self):
        return list(self._split("train")["caption"])

    def zero_shot_tasks(self):
        return {"color": (NAMES, ["a {} square"])}


class PairedCosine(Evaluator):
    """Mean cosine similarity of each held-out image with its own caption."""

    kind = "toy_paired_cosine"
    FIELDS = {"examples": Field(16, "pairs averaged", minimum=1)}

    def run(self, encoders):
        arrays = self.data.heldout
        n = self.settings["examples"]
        image, text = encoders.image(arrays["image"][:n]), encoders.tokens(arrays["text"][:n])
        return {"toy": {"paired_cosine": float(np.mean(np.sum(image * text, axis=1))), "pairs": n}}


TRACED_OBJECTIVES = []


def image_to_text_infonce(c):
    """InfoNCE in one direction only (images pick their caption), in plain jnp over the batch."""
    TRACED_OBJECTIVES.append(c.a.shape)
    logits = jnp.exp(c.logit_scale) * c.a @ c.b.T
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits))


@pytest.fixture
def plugins():
    register_source(ToyColorSource)
    register_evaluator(PairedCosine)
    register_objective("toy_image_to_text", image_to_text_infonce)
    try:
        yield
    finally:
        # Other tests in this process must see the built-in registries only.
        SOURCES.pop(ToyColorSource.name)
        EVALUATORS.pop(PairedCosine.kind)
        OBJECTIVES.pop("toy_image_to_text")


def test_toy_source_and_evaluator_train_the_tiny_demo(plugins, tfds_dir, tmp_path):
    config = load_config("demo.py")  # built after registration: carries the toy source's fields
    assert config.data.toy_num_test == 48
    apply_overrides(
        config,
        {
            "data.name": "toy_colors",
            "data.num_train": 50_000,  # the toy source renders what it is told
            "data.data_dir": str(tmp_path / "data"),
            "data.toy_num_test": 40,
            "evals.toy.kind": "toy_paired_cosine",
            "evals.toy.examples": 12,
            "evals.linear_probe.train_examples": 64,
            "evals.knn.train_examples": 64,
            "loss.name": "toy_image_to_text",
        },
    )
    TRACED_OBJECTIVES.clear()
    report = trainer.train(config, str(tmp_path / "run"))

    # The toy objective was the loss of the step, over the global batch.
    assert (config.data.batch_size, config.model.embed_dim) in TRACED_OBJECTIVES
    assert json.load(open(tmp_path / "run" / "config.json"))["loss"]["name"] == "toy_image_to_text"

    # The toy evaluator ran next to the built-in ones, which used the toy source's data.
    assert report["toy"]["pairs"] == 12
    assert report["num_examples"] == 40
    assert set(report["zero_shot"]) == {"color", "mean_top1"}
    assert json.load(open(tmp_path / "run" / "report.json"))["toy"] == report["toy"]
    # Its number is what the restored model gives on the same pairs.
    model = clipjax.load(str(tmp_path / "run"))
    test = ToyColorSource(model.config.data).eval_arrays(model.tokenizer, max_examples=12)
    image = model.encode_image(test["image"])
    text = model.encode_text(list(test["caption"]))
    assert report["toy"]["paired_cosine"] == pytest.approx(
        float(np.mean(np.sum(image * text, axis=1))), rel=1e-5
    )
    # And training read the toy batches: the logged steps ran on them without drops.
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert records[-1]["step"] == config.steps and records[-1]["data_dropped"] == 0


def test_plugin_settings_are_checked_like_built_in_ones(plugins, tfds_dir):
    config = load_config("demo.py")
    config.data.data_dir = tfds_dir
    apply_overrides(config, {"evals.toy.kind": "toy_paired_cosine", "evals.toy.exampels": 3})
    with pytest.raises(ConfigError, match=r"^evals.toy.exampels: unknown key \(did you mean 'examples'\?\)$"):
        validate(config, num_devices=8)
    config = load_config("demo.py")
    apply_overrides(config, {"evals.other.kind": "no_such_evaluator"})
    with pytest.raises(ConfigError, match="evals.other.kind: unknown evaluator 'no_such_evaluator'"):
        validate(config, num_devices=8)
    config = load_config("demo.py")
    config.data.toy_num_test = 0
    config.data.name = "toy_colors"
    with pytest.raises(ConfigError, match="data.toy_num_test: 0 is below the minimum 1"):
        validate(config, num_devices=8)


def test_unregistered_plugins_are_unknown(tfds_dir):
    assert "toy_colors" not in SOURCES
    config = load_config("demo.py")
    config.data.name = "toy_colors"
    with pytest.raises(ConfigError, match="data.name: 'toy_colors' is not one of"):
        validate(config, num_devices=8)
    assert BATCH_KEYS == ("image", "text", "text_id", "index", "label")
