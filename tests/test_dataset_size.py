"""`data.num_train` comes from the dataset where it says how big it is, and a dataset smaller than
one global batch is refused: its batches would hold each pair several times."""

import json

import pytest

from clipjax import trainer as train_lib
from clipjax.checkpoint import Checkpointer
from clipjax.schema import ConfigError
from tests.test_own_data_eval import _config, _write_csv


def _steps(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [r["step"] for r in map(json.loads, f) if "loss" in r]


def test_a_num_train_that_contradicts_the_dataset_is_refused(tmp_path):
    """(One epoch of the 37 converted records is 4 steps of 8, resumed without a change of
    data.num_train: test_resume.py, case own_csv.)"""
    csv = _write_csv(tmp_path, "train", 37)
    config = _config(tmp_path, csv, **{"epochs": 1.0, "evals.at_end": False})
    config.steps, config.data.batch_size, config.data.test_fraction = 0, 8, 0.0
    config.data.num_train = 512  # the tiny demo's shapes count, left in place
    with pytest.raises(ConfigError, match=r"^data.num_train: 512 contradicts the 37 training examples"):
        train_lib.train(config, str(tmp_path / "other"), log=lambda _: None)
    assert not (tmp_path / "other" / "config.json").exists()  # refused before anything was written


def test_a_dataset_smaller_than_one_batch_is_refused_unless_allowed(tmp_path):
    csv = _write_csv(tmp_path, "train", 5)
    config = _config(tmp_path, csv, **{"evals.at_end": False})
    config.steps, config.data.test_fraction = 2, 0.0  # 5 examples, a batch of 16
    with pytest.raises(
        ConfigError, match=r"^data.batch_size: 16 is more than the 5 training examples of the dataset"
    ):
        train_lib.train(config, str(tmp_path / "run"), log=lambda _: None)
    assert Checkpointer(str(tmp_path / "run")).latest_step() is None
    config.data.allow_repeats_in_batch = True
    train_lib.train(config, str(tmp_path / "run"), log=lambda _: None)
    assert _steps(tmp_path / "run") == [1, 2]
