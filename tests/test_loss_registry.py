"""An objective added from outside clipjax (one function, one registry line), trained with."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipjax import trainer
from clipjax.config import ConfigError, default_config, validate
from clipjax.losses import OBJECTIVES, register_objective
from clipjax.parallel import host_batch_to_global, make_mesh
from clipjax.schema import Field
from clipjax.trainer.state import init_train_state
from clipjax.trainer.step import make_loss_fn
from tests.helpers import source_and_tokenizer, tiny_demo

BUILT_IN = ("softmax", "sigmoid", "alignment", "multi_positive", "multi_positive_sigmoid", "fnc", "dcl")


def margin(c):
    """An image's mean similarity to the texts of other concepts, less its own text's, plus a margin."""
    sim = c.a @ c.b.T
    other = c.labels[:, None] != c.labels[None, :]
    negatives = jnp.sum(jnp.where(other, sim, 0.0), axis=1) / jnp.sum(other, axis=1)
    return c.settings["toy_margin"] + jnp.mean(negatives - jnp.diagonal(sim))


def numpy_margin(a, b, labels, margin):
    sim = np.asarray(a, np.float64) @ np.asarray(b, np.float64).T
    other = labels[:, None] != labels[None, :]
    return margin + np.mean((sim * other).sum(1) / other.sum(1) - np.diag(sim))


@pytest.fixture
def toy_margin():
    field = Field(0.5, "toy_margin: the margin", minimum=0.0)
    register_objective("toy_margin", margin, fields={"toy_margin": field}, uses=("labels",))
    try:
        yield
    finally:
        OBJECTIVES.pop("toy_margin")  # other tests in this process see the built-in ones only


def test_toy_objective_trains_and_its_loss_is_its_formula(toy_margin, tfds_dir, tmp_path):
    assert default_config().loss.toy_margin == 0.5
    config = tiny_demo(tfds_dir, **{"loss.name": "toy_margin", "loss.toy_margin": 0.05, "log_every": 1})
    trainer.train(config, str(tmp_path / "run"), stop_at=2, log=lambda _: None)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)

    # Step 1's loss is the toy's formula on the first batch's embeddings under the initial
    # parameters, with the batch's labels and the configured margin.
    source, tokenizer = source_and_tokenizer(config.data)
    batch = next(source.train_iterator(tokenizer, seed=config.seed))
    mesh = make_mesh(config.mesh)
    setup = init_train_state(config, mesh, vocab_size=tokenizer.vocab_size)
    loss_fn = jax.jit(make_loss_fn(config, setup.graphdef, mesh))
    loss, (a, b, _, _) = loss_fn(setup.state["params"], host_batch_to_global(batch, mesh), {}, 0)
    expected = numpy_margin(a, b, batch["label"], 0.05)
    # The batch repeats concepts, so the formula depends on the labels reaching the objective.
    assert abs(numpy_margin(a, b, np.arange(len(a)), 0.05) - expected) > 1e-4 * abs(expected)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert records[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_unknown_objective_is_one_line_naming_the_choices(tfds_dir):
    config = tiny_demo(tfds_dir)
    config.loss.name = "toy_margin"
    with pytest.raises(ConfigError) as error:
        validate(config, num_devices=8)
    message = str(error.value)
    assert message.startswith("loss.name: 'toy_margin' is not one of ('softmax', 'sigmoid', ")
    assert "\n" not in message and all(repr(name) in message for name in BUILT_IN + ("sogclr",))
