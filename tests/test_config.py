"""Each config mistake gets one clear line naming the key, before anything compiles."""

import json

import pytest

from clipjax.config import ConfigError, config_from_dict, default_config, translate_legacy_flags, validate


def _error(config, **kw):
    kw.setdefault("num_devices", 8)
    with pytest.raises(ConfigError) as info:
        validate(config, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_are_valid():
    assert validate(default_config(), num_devices=8) == (8, 1, 1)


def test_unknown_key():
    c = default_config()
    c.model.unlock()
    c.model.widht = 3
    assert _error(c).startswith("model.widht: unknown key")


def test_unknown_nested_key():
    c = default_config()
    c.optim.unlock()
    c.optim.learning_rate = 1e-3
    message = _error(c)
    assert "optim.learning_rate" in message and "lr" in message


def test_batch_not_divisible_by_batch_axes():
    c = default_config()
    c.data.batch_size = 100
    message = _error(c)
    assert "data.batch_size=100" in message and "8-way" in message


def test_batch_not_divisible_by_processes():
    c = default_config()
    c.data.batch_size = 24
    c.mesh.shape = (1, 1, -1)  # no batch parallelism, so only the process count matters
    assert "16 processes" in _error(c, process_count=16)


def test_mesh_does_not_match_devices():
    c = default_config()
    c.mesh.shape = (4, 1, 1)
    assert "needs 4 devices but 8 are available" in _error(c)
    c.mesh.shape = (3, -1, 1)
    assert "mesh.shape" in _error(c)


def test_missing_data_directory(tmp_path):
    c = default_config()
    c.data.name = "image_text_folder"
    c.data.source = str(tmp_path / "nowhere.csv")
    assert "data.source" in _error(c) and "nowhere.csv" in _error(c)
    (tmp_path / "captions.csv").write_text("image,caption\n")
    c.data.source = str(tmp_path / "captions.csv")
    # A data_dir that does not exist yet is created when the data is prepared, as for shapes.
    c.data.data_dir = str(tmp_path / "missing_dir")
    validate(c, num_devices=8)


def test_bad_choices():
    c = default_config()
    c.loss.name = "hinge"
    assert "loss.name" in _error(c)
    c = default_config()
    c.loss.name = "sigmoid"
    assert "model.logit_bias_init" in _error(c)
    c = default_config()
    c.model.image.kind = "mlp"
    assert "model.image.kind" in _error(c)


def test_model_errors_surface_before_building():
    c = default_config()
    c.model.image.kind = "vit"
    c.model.image.variant = "tiny"
    c.model.image.patch_size = 5  # does not divide the 32 px images
    assert "model.image" in _error(c)
    c = default_config()
    c.model.text.width = 100
    c.model.text.heads = 3
    assert "model.text" in _error(c)


def test_old_evals_keys_still_work_on_the_command_line_and_in_stored_configs():
    argv = [
        "prog",
        "--config.evals.zero_shot=False",
        "--config.evals.classification=cifar10",
        "--config.evals.probe_train_examples=100",
        "--config.steps=3",
    ]
    assert translate_legacy_flags(argv) == [
        "prog",
        "--config.evals.zero_shot.enabled=False",
        "--config.evals.classification.dataset=cifar10",
        "--config.evals.classification.enabled=True",
        "--config.evals.linear_probe.train_examples=100",
        "--config.evals.knn.train_examples=100",
        "--config.evals.classification.train_examples=100",
        "--config.steps=3",
    ]
    # A config.json written by the first release.
    stored = json.loads(json.dumps(default_config().to_dict()))
    stored["evals"] = {
        "at_end": True,
        "every": 0,
        "batch_size": 500,
        "max_examples": 2000,
        "zero_shot": False,
        "retrieval": True,
        "linear_probe": True,
        "knn": False,
        "probe_train_examples": 7,
        "classification": "cifar10",
        "classification_data_dir": "/d",
    }
    c = config_from_dict(stored)
    assert c.evals.zero_shot.enabled is False and c.evals.knn.enabled is False
    assert c.evals.retrieval.enabled is True
    assert (c.evals.classification.dataset, c.evals.classification.data_dir) == ("cifar10", "/d")
    assert c.evals.classification.enabled is True and c.evals.linear_probe.train_examples == 7


def test_stored_config_round_trips_with_types():
    c = default_config()
    c.model.image.kind = "vit"
    c.model.image.width = 96
    back = config_from_dict(json.loads(json.dumps(c.to_dict())))
    assert back.to_dict() == c.to_dict()
    # Unset fields stay typed placeholders: an override of one is checked like any other.
    back.model.text.width = 128
    with pytest.raises(TypeError):
        back.model.text.heads = "eight"
    assert back.sharding_rules == c.sharding_rules and isinstance(back.mesh.shape, tuple)


def test_every_logical_axis_has_a_sharding_rule():
    from clipjax.models.layers import LOGICAL_AXES

    assert {name for name, _ in default_config().sharding_rules} == set(LOGICAL_AXES)


def test_wrong_types_and_bounds_name_the_key():
    c = default_config()
    c.checkpoint_every = 0
    assert _error(c).startswith("checkpoint_every: 0 is below the minimum 1")
    c = default_config()
    c.model.image.widths = (64, 0)
    assert _error(c).startswith("model.image.widths: expected a non-empty sequence of positive integers")
    c = default_config()
    c.model.image.blocks_per_stage = "two"  # a free-typed field: the schema's check catches it
    assert _error(c).startswith("model.image.blocks_per_stage: expected a non-negative integer")


def test_naflex_batches_refuse_what_they_do_not_go_with(monkeypatch):
    c = default_config()
    c.data.naflex_seq_lens = (16,)
    assert _error(c).startswith("data.naflex_seq_lens: sequence lengths are for a NaFlex model")
    c.model.image.kind, c.model.image.naflex = "vit", True
    c.data.naflex_seq_lens = (16, 16)
    assert _error(c).startswith("data.naflex_seq_lens: expected distinct positive patch counts")
    c.data.naflex_seq_lens = (16, 64)
    validate(c, num_devices=8)
    from clipjax.data.sources.shapes import ShapesSource

    monkeypatch.setattr(ShapesSource, "supports_naflex", False)
    assert _error(c).startswith("model.image.naflex: the data.name='shapes' source gives no NaFlex")
    monkeypatch.undo()
    c.task = "image_image"
    assert _error(c).startswith("task: 'image_image' draws square views on device")


def _float_keys(config, prefix=""):
    """Every field of `config` typed float (placeholders included), as dotted keys."""
    for name in config.keys():
        value = config[name]
        if hasattr(value, "keys"):
            yield from _float_keys(value, f"{prefix}{name}.")
        elif config.get_type(name) is float:
            yield f"{prefix}{name}"


def test_non_finite_floats_are_refused_in_every_float_field():
    keys = sorted(_float_keys(default_config()))
    assert {"optim.lr", "optim.weight_decay", "optim.warmup_fraction", "epochs"} <= set(keys)
    for key in keys:
        for bad in (float("nan"), float("inf"), float("-inf")):
            c = default_config()
            *parents, leaf = key.split(".")
            section = c
            for p in parents:
                section = section[p]
            section[leaf] = bad
            assert _error(c) == f"{key}: must be a finite number, got {bad!r}"
    # ...and inside sequences of numbers (the image statistics).
    c = default_config()
    c.model.image_mean = (0.5, float("nan"), 0.5)
    assert _error(c) == "model.image_mean: must be a finite number, got (0.5, nan, 0.5)"


def test_config_json_is_strict_json():
    from clipjax.config import config_json

    text = config_json(default_config())
    assert json.loads(text, parse_constant=lambda token: pytest.fail(token)) == json.loads(text)
    c = default_config()
    c.optim.warmup_fraction = float("nan")
    with pytest.raises(ConfigError, match="^optim.warmup_fraction: must be a finite number, got nan$"):
        config_json(c)


@pytest.mark.parametrize(
    "key,meant",
    [
        ("optim.learning_rate", "optim.lr"),
        ("optim.wd", "optim.weight_decay"),
        ("data.batch", "data.batch_size"),
        ("batch_size", "data.batch_size"),
        ("num_epochs", "epochs"),
        ("optim.warmup", "optim.warmup_fraction"),
        ("optim.lrr", "optim.lr"),  # spelling still counts
    ],
)
def test_unknown_keys_are_pointed_at_the_key_they_mean(key, meant):
    from clipjax.cli import check_override_keys

    with pytest.raises(ConfigError) as info:
        check_override_keys([f"--config.{key}=1"], default_config())
    assert str(info.value) == f"--config.{key}: unknown key (did you mean '{meant}'?)"
    # The same hint where a config file sets the key: the schema's own check.
    section, _, leaf = key.rpartition(".")
    if section == "optim":
        c = default_config()
        c.optim.unlock()
        c.optim[leaf] = 1.0
        assert _error(c) == f"{key}: unknown key (did you mean '{meant.rpartition('.')[2]}'?)"
