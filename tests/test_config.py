"""Each config mistake gets one clear line naming the key, before anything compiles."""
import pytest

from clipjax.config import ConfigError, default_config, validate


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
    assert "unknown key 'model.widht'" in _error(c)


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
    c.data.data_dir = str(tmp_path / "missing_dir")
    assert "data.data_dir" in _error(c) and "missing_dir" in _error(c)


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
