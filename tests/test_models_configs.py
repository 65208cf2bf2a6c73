"""The project's config files resolve into buildable models (catches drift
between config field names and what the towers read)."""

import importlib.util
import pathlib

import pytest
from flax import nnx

from clipjax.models import count_params, model_factory

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
CASES = [(path, arg) for path in sorted(CONFIG_DIR.glob("*.py")) for arg in ("", "tiny")]


def load_config(path, arg):
    spec = importlib.util.spec_from_file_location(f"_cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("path,arg", CASES, ids=[f"{p.stem}:{a}" for p, a in CASES])
def test_config_builds_abstract_model(path, arg):
    config = load_config(path, arg)
    model = nnx.eval_shape(model_factory(config, vocab_size=100))
    assert count_params(model) > 0
