"""open_clip's CoCa in and out: parity with open_clip (the fixture made by
tests/fixtures/make_pretrained_fixtures.py from a small seeded CoCa) for the contrastive
embeddings and the decoder's teacher-forced next-token logits, the export that open_clip loads
strictly, the full-size layouts mapped by shape, and one-line refusals."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clipjax.models import generate, model_spec
from clipjax.pretrained import layouts, open_clip_coca, tensors, workdir
from clipjax.pretrained.layouts import ConversionError
from tests.fixtures.make_pretrained_fixtures import coca_import_options

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "pretrained"
SIZES = type("Sizes", (), {"vocab_size": 64, "max_len": 12})()  # what the exporter reads of a tokenizer


def _source():
    return tensors.read_checkpoint(str(FIXTURES / "open_clip_coca" / "model.safetensors"))


def _model():
    keys, params, vocab = open_clip_coca.from_open_clip_coca(_source(), **coca_import_options())
    config, graphdef, params = workdir.assemble(keys, params, vocab)
    return config, params, nnx.merge(graphdef, params)


def _relative_error(got, want):
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def _outputs(model, params, images, tokens):
    image_emb, text_emb, caption = model.embed_and_caption(
        jnp.asarray(images), jnp.asarray(tokens, jnp.int32)
    )
    logits = float(np.exp(params["logit_scale"])) * np.asarray(image_emb) @ np.asarray(text_emb).T
    return {"image_emb": image_emb, "text_emb": text_emb, "logits": logits, "caption_logits": caption}


def _assert_parity(got: dict, want, tolerance=1e-5):
    errors = {key: _relative_error(got[key], want[key]) for key in got}
    assert max(errors.values()) <= tolerance, errors


def test_imported_coca_gives_open_clips_embeddings_and_next_token_logits():
    """Every position of the teacher-forced logits (pads too: the masks are open_clip's), and the
    contrastive embeddings; the encoders alone give the embeddings of the joint pass."""
    reference = np.load(FIXTURES / "open_clip_coca.npz")
    config, params, model = _model()
    got = _outputs(model, params, reference["images"], reference["tokens"])
    assert got["caption_logits"].shape == (3, 11, 64)
    _assert_parity(got, reference)
    np.testing.assert_allclose(
        model.encode_image(jnp.asarray(reference["images"])), got["image_emb"], atol=1e-6
    )
    np.testing.assert_allclose(
        model.encode_text(jnp.asarray(reference["tokens"])), got["text_emb"], atol=1e-6
    )
    spec = model_spec(config.model, image_size=config.data.image_size)
    assert (spec.image.heads, spec.image.pooler_heads, spec.text.heads, spec.decoder.heads) == (2, 3, 2, 4)


def test_coca_export_is_open_clips_state_dict_and_open_clip_computes_the_same(tmp_path):
    """`export --to open_clip` of the imported CoCa: exactly the names and shapes of open_clip's own
    state dict (the fixture file is its `state_dict()`; the fixture script loads the export with
    strict=True), every tensor bit for bit but the key biases (zeros: the softmax cancels them),
    an open_clip_config.json from which open_clip builds a CoCa, and open_clip's outputs of the
    export equal clipjax's."""
    config, params, model = _model()
    workdir.export("open_clip", config, params, SIZES, str(tmp_path))
    original = _source()
    exported = tensors.read_checkpoint(str(tmp_path / "open_clip_model.safetensors"))
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in original.items()}
    for name, value in original.items():
        if name.endswith("in_proj_bias"):
            width = value.shape[0] // 3
            np.testing.assert_array_equal(exported[name][width : 2 * width], 0.0)
            value = np.concatenate([value[:width], 0 * value[width : 2 * width], value[2 * width :]])
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    model_cfg = json.loads((tmp_path / "open_clip_config.json").read_text())["model_cfg"]
    assert model_cfg["multimodal_cfg"] == {
        "width": 48,
        "layers": 2,
        "heads": 4,
        "context_length": 12,
        "vocab_size": 64,
    }
    assert (model_cfg["vision_cfg"]["attn_pooler_heads"], model_cfg["vision_cfg"]["attn_pooler_queries"]) == (
        3,
        5,
    )
    assert model_cfg["text_cfg"]["embed_cls"] and model_cfg["custom_text"] and not model_cfg["quick_gelu"]
    reference = np.load(FIXTURES / "open_clip_coca.npz")
    got = _outputs(model, params, reference["images"], reference["tokens"])
    _assert_parity(got, np.load(FIXTURES / "open_clip_coca_export.npz"))


def test_a_coca_export_imports_back_from_its_folder_without_flags(tmp_path):
    """open_clip_config.json beside the weights supplies the heads of every attention and the
    activation; the CoCa layout is recognised by its decoder's tensors."""
    config, params, _ = _model()
    workdir.export("open_clip", config, params, SIZES, str(tmp_path))
    keys, again, vocab = workdir.read_source("open_clip", str(tmp_path), arch="")
    again_config, _, again = workdir.assemble(keys, again, vocab)
    assert again_config.model.to_dict() == {**config.model.to_dict(), "image_resize": "open_clip"}
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cached_generation_of_the_imported_coca_gives_its_teacher_forced_logits():
    """The text tower (its appended token left out) and the decoder one position at a time
    over their caches give the full pass's logits at every real position."""
    reference = np.load(FIXTURES / "open_clip_coca.npz")
    _, _, model = _model()
    images, tokens = jnp.asarray(reference["images"]), jnp.asarray(reference["tokens"], jnp.int32)
    full = jax.nn.log_softmax(model.embed_and_caption(images, tokens)[2], axis=-1)
    step = generate._step_fn(model, model.image_memory(images), bos_id=0)
    caches = generate._caches(model, images.shape[0])
    for i in range(tokens.shape[1] - 1):
        logp, caches = step(tokens[:, i : i + 1], caches, i)
        expected = jax.nn.log_softmax(full[:, i].at[:, 0].set(-jnp.inf), axis=-1)
        real = np.asarray(tokens[:, : i + 1] != 0).all(axis=1)  # no pad up to here
        np.testing.assert_allclose(logp[real, 1:], expected[real, 1:], atol=2e-5, err_msg=f"position {i}")


def _abstract(shapes: dict) -> dict:
    return {k: jax.ShapeDtypeStruct(tuple(v), jnp.float32) for k, v in shapes.items()}


@pytest.mark.parametrize(
    "arch,sizes",
    [
        # embed, image (width, depth, heads, patch), text and decoder (width, heads), pooler heads
        ("coca_ViT-B-32", dict(embed=512, image=(768, 12, 12, 32), text=(512, 8), pooler_heads=8)),
        ("coca_ViT-L-14", dict(embed=768, image=(1024, 24, 16, 14), text=(768, 12), pooler_heads=8)),
    ],
)
def test_full_size_coca_layouts_map_onto_the_clipjax_model(arch, sizes):
    """open_clip's published CoCa architectures (state-dict shapes and model_cfg from open_clip,
    no weights), with what their model_cfg says, fill a clipjax model of the same sizes."""
    published = json.loads((FIXTURES / "open_clip_coca_shapes.json").read_text())[arch]
    stated = layouts.open_clip_model_cfg(published["model_cfg"])
    found = {}

    def mapped(state):
        keys, params, vocab = open_clip_coca.from_open_clip_coca(
            state,
            activation=stated["decoder_activation"],
            head_width=stated["head_width"],
            text_head_width=stated["text_head_width"],
            decoder_head_width=stated["decoder_head_width"],
            pooler_heads=stated["pooler_heads"],
        )
        found.update(keys=keys, vocab=vocab)
        return params

    params = jax.eval_shape(mapped, _abstract(published["shapes"]))
    config, _, _ = workdir.assemble(found["keys"], params, found["vocab"])
    spec = model_spec(config.model, image_size=config.data.image_size)
    v, t, d = spec.image, spec.text, spec.decoder
    assert spec.embed_dim == sizes["embed"] and (v.width, v.depth, v.heads, v.patch_size) == sizes["image"]
    assert (v.pooler_queries, v.pooler_heads, v.pooler_width) == (256, sizes["pooler_heads"], sizes["embed"])
    assert (t.width, t.heads, d.width, d.heads, d.depth) == (*sizes["text"], *sizes["text"], 12)
    assert (config.data.image_size, config.data.tokenizer.max_len, found["vocab"]) == (224, 76, 49408)
    assert v.activation == t.activation == d.activation == "gelu"


def test_a_coca_the_format_cannot_express_and_a_broken_checkpoint_are_one_line():
    config, params, _ = _model()
    config.model.decoder.output_bias = True
    params["decoder"]["head"]["bias"] = jnp.zeros(64)
    with pytest.raises(
        ConversionError, match=r"^--format open_clip cannot express model.decoder.output_bias=True"
    ):
        workdir.export("open_clip", config, params, SIZES, "unused")
    missing = {k: v for k, v in _source().items() if k != "text_decoder.cross_attn.1.ln_1_kv.bias"}
    with pytest.raises(
        ConversionError,
        match=r"^open_clip CoCa checkpoint: no tensor 'text_decoder.cross_attn.1.ln_1_kv.bias'",
    ):
        open_clip_coca.from_open_clip_coca(missing, **coca_import_options())
    extra = dict(_source(), **{"text_decoder.adapter.weight": np.zeros(3, np.float32)})
    with pytest.raises(ConversionError, match=r"tensor 'text_decoder.adapter.weight' has no place"):
        open_clip_coca.from_open_clip_coca(extra, **coca_import_options())


def test_an_imported_coca_workdir_loads_embeds_and_captions(tmp_path):
    """`python -m clipjax.convert import` of an open_clip CoCa folder (here clipjax's export of the
    fixture, with a tokenizer.json beside it), then `clipjax.load`: its image embeddings are the
    assembled model's, and it writes captions with the imported decoder."""
    import clipjax
    from clipjax import convert
    from clipjax.api import prepare_images
    from tests.test_pretrained import _tiny_tokenizer_json

    config, params, model = _model()
    workdir.export("open_clip", config, params, SIZES, str(tmp_path / "oc"))
    _tiny_tokenizer_json(tmp_path / "oc" / "tokenizer.json")
    args = ["import", "--format", "open_clip", "--checkpoint", tmp_path / "oc", "--out", tmp_path / "w"]
    convert.main([str(a) for a in args])
    loaded = clipjax.load(str(tmp_path / "w"), devices=jax.devices()[:1])
    images = np.load(FIXTURES / "open_clip_coca.npz")["images"]
    pixels = prepare_images(images, 32, loaded.config.model.image_resize)
    np.testing.assert_allclose(
        loaded.encode_image(images), model.encode_image(jnp.asarray(pixels)), atol=1e-6
    )
    captions = loaded.caption(images, max_len=6)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
