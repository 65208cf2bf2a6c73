"""SigLIP 2 NaFlex in and out (`--format hf_siglip2_naflex`: transformers' `Siglip2Model`), on the
fixture that tests/fixtures/make_pretrained_fixtures.py writes (`--only hf_siglip2_naflex`): the
position table resized as torch resizes it, the patches transformers' Siglip2ImageProcessor
makes of images of several sizes, transformers' embeddings and logits from the import and from
the export, and padded patches that change nothing."""

import json
import pathlib
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clipjax.config import default_config
from clipjax.models import model_factory, model_spec
from clipjax.models.naflex import Patches, resize_positions, valid_patches
from clipjax.pretrained import layouts, preprocessing, tensors, workdir
from clipjax.schema import ConfigError
from tests.fixtures.make_pretrained_fixtures import NAFLEX, siglip2_tokenizer_folder

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "pretrained"
FOLDER = FIXTURES / "hf_siglip2_naflex"
TOLERANCE = 1e-5  # relative to the largest value
FORMAT = "hf_siglip2_naflex"


def _relative_error(got, want):
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def _reference():
    return np.load(FIXTURES / "hf_siglip2_naflex.npz")


def _images(reference):
    return [reference[f"image_{i}"] for i in range(len(reference["spatial_shapes"]))]


def _model(folder=FOLDER):
    keys, params, vocab = layouts.IMPORTERS[FORMAT](*tensors.read_hf_directory(str(folder)))
    config, graphdef, params = workdir.assemble(keys, params, vocab)
    return config, params, nnx.merge(graphdef, params)


def _processor_inputs(reference) -> Patches:
    """The processor's patches as [0, 1] pixels (the model standardises them itself) and grids."""
    return Patches(
        jnp.asarray(reference["pixel_values"] * 0.5 + 0.5), jnp.asarray(reference["spatial_shapes"])
    )


def _assert_equal_outputs(model, params, reference, want):
    image_emb = np.asarray(model.encode_image(_processor_inputs(reference)))
    text_emb = np.asarray(model.encode_text(jnp.asarray(reference["tokens"], jnp.int32)))
    logits = float(np.exp(params["logit_scale"])) * image_emb @ text_emb.T + float(params["logit_bias"])
    assert _relative_error(image_emb, want["image_emb"]) <= TOLERANCE
    assert _relative_error(text_emb, want["text_emb"]) <= TOLERANCE
    assert _relative_error(logits, want["logits"]) <= TOLERANCE


def test_position_table_is_resized_as_torch_interpolates_it_antialiased():
    """Shrinking, growing and both at once, against F.interpolate(bilinear, antialias=True)."""
    reference = _reference()
    table = tensors.read_hf_directory(str(FOLDER))[0]["vision_model.embeddings.position_embedding.weight"]
    want = reference["positions"]
    got = np.asarray(
        resize_positions(jnp.asarray(table), jnp.asarray(reference["position_grids"]), want.shape[1])
    )
    for (rows, cols), g, w in zip(reference["position_grids"], got, want):
        assert _relative_error(g[: rows * cols], w[: rows * cols]) <= 1e-6, (rows, cols)


def test_naflex_patches_are_transformers_processor_patches():
    """Each fixture image (40 x 90, 64 x 64, 100 x 30, 10 x 13) resized, cut and padded as
    Siglip2ImageProcessor (PIL backend) does: the same grid, mask and pixels of the image."""
    reference = _reference()
    for i, image in enumerate(_images(reference)):
        patches, grid = preprocessing.naflex_patches(image, NAFLEX["patch"], NAFLEX["max_num_patches"])
        assert grid == tuple(reference["spatial_shapes"][i])
        valid = np.asarray(valid_patches(jnp.asarray([grid]), NAFLEX["max_num_patches"]))[0]
        np.testing.assert_array_equal(valid, reference["pixel_attention_mask"][i] == 1)
        pixels = (patches.astype(np.float32) / 255.0 - 0.5) / 0.5
        # The padding differs (the processor pads normalised zeros) and is masked anyway.
        np.testing.assert_allclose(pixels[valid], reference["pixel_values"][i][valid], rtol=0, atol=1e-6)


def test_imported_naflex_model_gives_transformers_embeddings_and_logits():
    reference = _reference()
    config, params, model = _model()
    assert config.model.image.naflex and config.data.image_size == NAFLEX["grid"] * NAFLEX["patch"]
    assert params["image_tower"]["pos"].shape == (NAFLEX["grid"] ** 2, 64)
    _assert_equal_outputs(model, params, reference, reference)


def test_naflex_export_reads_back_bit_for_bit_and_transformers_reads_it(tmp_path):
    config, params, model = _model()
    config.model.image.max_num_patches = NAFLEX["max_num_patches"]
    workdir.export(FORMAT, config, params, types.SimpleNamespace(vocab_size=2228, max_len=64), str(tmp_path))
    exported = json.loads((tmp_path / "config.json").read_text())
    assert (exported["model_type"], exported["vision_config"]["num_patches"]) == (
        "siglip2",
        NAFLEX["grid"] ** 2,
    )
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert (processor["patch_size"], processor["max_num_patches"]) == (
        NAFLEX["patch"],
        NAFLEX["max_num_patches"],
    )
    _, again, _ = _model(tmp_path)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # What transformers' Siglip2Model.from_pretrained computes from the export (the fixture script).
    _assert_equal_outputs(model, params, _reference(), np.load(FIXTURES / "hf_siglip2_naflex_export.npz"))


def test_converted_workdir_encodes_images_of_any_size(tmp_path):
    """`convert import` records the patch budget and the recipe; `clipjax.load(...).encode_image`
    of the raw images, of different sizes in one list, gives transformers' embeddings over the
    8 devices (the batch padded), and an image alone the embedding it has in the batch."""
    import clipjax
    from clipjax import convert

    folder = tmp_path / "naflex"
    shutil.copytree(FOLDER, folder)
    siglip2_tokenizer_folder(folder)
    convert.main(["import", "--format", FORMAT, "--checkpoint", str(folder), "--out", str(tmp_path / "w")])
    model = clipjax.load(str(tmp_path / "w"))
    image = model.config.model.image
    assert (image.naflex, image.max_num_patches, model.config.model.image_resize) == (True, 20, FORMAT)
    assert model.config.data.tokenizer.style == "siglip2"
    reference = _reference()
    images = _images(reference)
    embeddings = model.encode_image(images)
    assert _relative_error(embeddings, reference["image_emb"]) <= TOLERANCE
    np.testing.assert_allclose(model.encode_image(images[2])[0], embeddings[2], rtol=0, atol=1e-6)
    assert model.encode_image([]).shape == (0, 64)
    texts = [str(t) for t in reference["texts"]]
    assert _relative_error(model.encode_text(texts), reference["text_emb"]) <= TOLERANCE


def _tiny_naflex(pool: str):
    config = default_config()
    config.model.image.update(kind="vit", variant="tiny", pool=pool, naflex=True)
    config.data.image_size = 16
    return model_factory(config, vocab_size=50)()


@pytest.mark.parametrize("pool", ["map", "mean", "cls", "imported"])
def test_padded_patches_change_nothing(pool):
    """Whatever the padded patches hold, the embeddings are the same (masked as keys in every
    block and in the MAP head, and out of the mean), here through one jitted step at a fixed N."""
    reference = _reference()
    model = _model()[2] if pool == "imported" else _tiny_naflex(pool)
    inputs = _processor_inputs(reference)
    valid = valid_patches(inputs.grid, inputs.patches.shape[1])[..., None]
    noise = jax.random.uniform(jax.random.key(0), inputs.patches.shape)
    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda state, x: nnx.merge(graphdef, state).encode_image(x))
    clean = encode(state, inputs)
    noisy = encode(state, Patches(jnp.where(valid, inputs.patches, noise), inputs.grid))
    np.testing.assert_allclose(np.asarray(noisy), np.asarray(clean), rtol=0, atol=1e-6)
    assert not np.allclose(clean[0], clean[1], atol=1e-3)  # the images themselves do matter


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(image=dict(kind="vit", naflex=True, pool="attentional_pooler")), "does not mask padded"),
        (dict(image=dict(kind="vit"), image_resize=FORMAT), "needs model.image.naflex=True"),
        (
            dict(image=dict(kind="vit", naflex=True), decoder=dict(variant="tiny", input="embed")),
            "not yet with a captioning",
        ),
    ],
)
def test_naflex_settings_that_would_read_padding_are_refused(overrides, message):
    config = default_config()
    config.model.update(overrides)
    with pytest.raises(ConfigError, match=message):
        model_spec(config.model, image_size=32)
