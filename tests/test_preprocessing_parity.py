"""Images of any size reach a model as its reference preprocesses them: converted models as open_clip
and transformers do (tests/fixtures/preprocessing.npz, written by
tests/fixtures/make_preprocessing_fixtures.py from the references on odd-sized images),
clipjax-trained ones as the evaluation pipeline decodes them; and empty batches embed to [0, d]."""

import importlib.util
import io
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import clipjax
from clipjax import api, convert
from clipjax.data.images import decode_image, fit_crop
from clipjax.models import spec
from clipjax.pretrained import layouts, preprocessing, tensors, workdir
from clipjax.pretrained.layouts import ConversionError
from tests.fixtures.make_preprocessing_fixtures import images
from tests.test_pretrained import _tiny_tokenizer_json

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
REFERENCE = np.load(FIXTURES / "preprocessing.npz")
FORMATS = ("open_clip", "hf_clip", "hf_siglip")
S = 32


def _checkpoint(fmt) -> str:
    return str(FIXTURES / "pretrained" / fmt / ("model.safetensors" if fmt == "open_clip" else ""))


def _imported(fmt) -> api.TrainedModel:
    """The fixture model configured as `clipjax.convert import` configures it (no workdir)."""
    if fmt == "open_clip":  # the file records no head widths: as tests/test_pretrained.py imports it
        source = tensors.read_checkpoint(_checkpoint(fmt))
        keys, params, vocab = layouts.from_open_clip(
            source, activation="quick_gelu", head_width=32, text_head_width=32
        )
        keys.update(preprocessing.recipe_keys(fmt, _checkpoint(fmt), S))
    else:
        keys, params, vocab = workdir.read_source(fmt, _checkpoint(fmt))
    config, graphdef, params = workdir.assemble(keys, params, vocab)
    return api.TrainedModel(config, 0, None, api.eval_mesh(jax.devices()[:1]), graphdef, params)


def test_imports_record_their_format_s_recipe_a_valid_image_resize():
    choices = spec.model_section().fields["image_resize"].choices
    assert set(choices) == {"crop", "squash", *preprocessing.RECIPES}
    assert all(preprocessing.describe(c) for c in choices)
    for fmt in FORMATS:
        # An open_clip file records no activation: name it, as the converter asks.
        named = {"activation": "quick_gelu"} if fmt == "open_clip" else {}
        assert workdir.read_source(fmt, _checkpoint(fmt), **named)[0]["model.image_resize"] == fmt


@pytest.mark.parametrize("fmt", FORMATS)
def test_recipes_give_the_reference_pixels(fmt):
    """Every pixel of every odd-sized image as the reference makes it (open_clip's transform,
    transformers' PIL backend); transformers' default torchvision backend resamples with torch's
    bicubic, a few levels apart on noise (documented in clipjax/pretrained/preprocessing.py)."""
    want = REFERENCE[f"pixels_{fmt}"]
    got = np.stack([api.prepare_images(im, S, fmt)[0] for im in images()])
    np.testing.assert_array_equal(got, want)
    if fmt != "open_clip":
        torchvision = want.astype(np.int16) + REFERENCE[f"delta_{fmt}_torchvision"]
        difference = np.abs(got.astype(np.int16) - torchvision)
        assert difference[0].max() == 0  # the smooth gradient: the same
        assert 0 < difference.max() <= 8  # noise: at most 8 levels of 255


@pytest.mark.parametrize("fmt", FORMATS)
def test_encode_image_of_imported_models_equals_the_reference(fmt):
    """encode_image of odd-sized images = the reference model's embedding of its own
    preprocessing of them (clipjax's own centre crop was up to 0.064 away on these)."""
    model = _imported(fmt)
    assert model.config.model.image_resize == fmt
    got = np.concatenate([model.encode_image(im) for im in images()])
    np.testing.assert_allclose(got, REFERENCE[f"emb_{fmt}"], atol=2e-6)


def test_clipjax_models_fit_images_as_the_evaluation_pipeline_decodes_them():
    """A clipjax-trained model (`crop`, `squash`) keeps clipjax's own preprocessing: an array
    passed to encode_image gets the pixels its PNG gets in the evaluation pipeline."""
    for im in images():
        png = io.BytesIO()
        Image.fromarray(im).save(png, "PNG")
        for resize in ("crop", "squash"):
            np.testing.assert_array_equal(
                api.prepare_images(im, S, resize)[0], decode_image(png.getvalue(), S, crop=fit_crop(resize))
            )


def test_empty_batches_embed_to_no_rows_of_the_embedding_width():
    model = _imported("hf_clip")
    d = int(model.config.model.embed_dim)
    for empty in (np.zeros((0, S, S, 3), np.uint8), np.zeros((0, 50, 70, 3), np.float32), []):
        emb = model.encode_image(empty)
        assert emb.shape == (0, d) and emb.dtype == np.float32
    images_emb = model.encode_image(images()[1])
    assert model.similarity(model.encode_image([]), images_emb).shape == (0, 1)
    assert model.similarity(images_emb, np.zeros((0, d), np.float32)).shape == (1, 0)


def _folder_with_preprocessor(tmp_path, fmt, **settings):
    folder = tmp_path / fmt
    shutil.copytree(FIXTURES / "pretrained" / fmt, folder)
    _tiny_tokenizer_json(folder / "tokenizer.json")
    if settings:
        (folder / "preprocessor_config.json").write_text(json.dumps(settings))
    return folder


def test_import_records_the_recipe_and_load_applies_it(tmp_path, capsys):
    """`clipjax.convert import` of a SigLIP folder: the workdir's config and checkpoint meta name
    transformers' SiglipImageProcessor, and clipjax.load's encode_image gives the reference's
    embeddings of odd-sized images."""
    folder = _folder_with_preprocessor(tmp_path, "hf_siglip")
    out = tmp_path / "w"
    convert.main(["import", "--format", "hf_siglip", "--checkpoint", str(folder), "--out", str(out)])
    assert json.loads((out / "config.json").read_text())["model"]["image_resize"] == "hf_siglip"
    model = clipjax.load(str(out), devices=jax.devices()[:1])
    checkpointer = clipjax.checkpoint.Checkpointer(str(out), create=False)
    try:
        resize = checkpointer.meta(0)["preprocessing"]["resize"]
    finally:
        checkpointer.close()
    assert resize.startswith("transformers' SiglipImageProcessor")
    got = np.concatenate([model.encode_image(im) for im in images()])
    np.testing.assert_allclose(got, REFERENCE["emb_hf_siglip"], atol=2e-6)


def test_preprocessor_config_gives_the_statistics_and_what_cannot_be_reproduced_is_refused(tmp_path, capsys):
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    published = {  # a Hugging Face CLIP folder's file, at the fixture's size
        "crop_size": {"height": S, "width": S},
        "do_center_crop": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": mean,
        "image_std": std,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": S},
    }
    folder = _folder_with_preprocessor(tmp_path, "hf_clip", **published)
    keys, _, _ = workdir.read_source("hf_clip", str(folder))
    assert (keys["model.image_resize"], keys["model.image_mean"], keys["model.image_std"]) == (
        "hf_clip",
        tuple(mean),
        tuple(std),
    )
    old_style = {**published, "size": S, "crop_size": S}  # sizes as one int (older transformers)
    (folder / "preprocessor_config.json").write_text(json.dumps(old_style))
    assert workdir.read_source("hf_clip", str(folder))[0]["model.image_mean"] == tuple(mean)
    for change, field in (({"resample": 2}, "resample"), ({"size": {"shortest_edge": 36}}, "size")):
        (folder / "preprocessor_config.json").write_text(json.dumps({**published, **change}))
        with pytest.raises(ConversionError, match=f"preprocessor_config.json: {field} is"):
            workdir.read_source("hf_clip", str(folder))
    # The command line: one line naming the file and the setting, exit status 2, no workdir.
    with pytest.raises(SystemExit) as exit_info:
        convert.main(
            ["import", "--format", "hf_clip", "--checkpoint", str(folder), "--out", str(tmp_path / "w")]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert "preprocessor_config.json: size is {'shortest_edge': 36}" in err[0]
    assert not (tmp_path / "w").exists()


def test_the_fixture_script_reproduces_the_fixture(tmp_path):
    for module in ("torch", "torchvision", "open_clip", "transformers"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    out = tmp_path / "preprocessing.npz"
    result = subprocess.run(
        [sys.executable, str(FIXTURES / "make_preprocessing_fixtures.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = np.load(out)
    assert sorted(fresh.files) == sorted(REFERENCE.files)
    for key in REFERENCE.files:
        np.testing.assert_array_equal(REFERENCE[key], fresh[key], err_msg=key)
