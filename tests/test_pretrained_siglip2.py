"""SigLIP 2 at fixed resolution in and out (`--format hf_siglip`: transformers' `SiglipModel`
layout, the Gemma tokenizer beside it): parity with transformers on the fixture that
tests/fixtures/make_pretrained_fixtures.py writes (`--only hf_siglip2`), the tokenizer found and
used as SigLIP 2's, and the 256k-token embedding table of the full-size model sharded."""

import json
import math
import pathlib
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clipjax.models import model_factory
from clipjax.parallel.mesh import make_mesh, param_shardings
from clipjax.pretrained import layouts, tensors, workdir
from tests.fixtures.make_pretrained_fixtures import siglip2_tokenizer_folder

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "pretrained"
FOLDER = FIXTURES / "hf_siglip2"
TOLERANCE = 1e-5  # relative to the largest value


def _relative_error(got, want):
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def _model(folder=FOLDER):
    keys, params, vocab = layouts.from_hf_siglip(*tensors.read_hf_directory(str(folder)))
    config, graphdef, params = workdir.assemble(keys, params, vocab)
    return config, params, nnx.merge(graphdef, params)


def _assert_equal_outputs(model, params, reference, want):
    image_emb = np.asarray(model.encode_image(jnp.asarray(reference["images"])))
    text_emb = np.asarray(model.encode_text(jnp.asarray(reference["tokens"], jnp.int32)))
    logits = float(np.exp(params["logit_scale"])) * image_emb @ text_emb.T + float(params["logit_bias"])
    assert _relative_error(image_emb, want["image_emb"]) <= TOLERANCE
    assert _relative_error(text_emb, want["text_emb"]) <= TOLERANCE
    assert _relative_error(logits, want["logits"]) <= TOLERANCE


def test_imported_siglip2_gives_transformers_embeddings_and_logits():
    reference = np.load(FIXTURES / "hf_siglip2.npz")
    config, params, model = _model()
    assert (config.model.text.width, config.model.image.width, config.data.tokenizer.max_len) == (32, 64, 64)
    assert params["text_tower"]["embed"].shape[0] == 2228  # the Gemma-style vocabulary
    assert (config.model.text.activation, config.model.text.norm_eps) == ("gelu_tanh", 1e-6)
    _assert_equal_outputs(model, params, reference, reference)


def test_siglip2_export_reads_back_bit_for_bit_and_transformers_reads_it(tmp_path):
    config, params, model = _model()
    sizes = types.SimpleNamespace(vocab_size=2228, max_len=64)
    workdir.export("hf_siglip", config, params, sizes, str(tmp_path))
    exported_config = json.loads((tmp_path / "config.json").read_text())["text_config"]
    assert (exported_config["vocab_size"], exported_config["max_position_embeddings"]) == (2228, 64)
    assert (exported_config["hidden_size"], exported_config["projection_size"]) == (32, 64)
    _, again, _ = _model(tmp_path)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # What transformers' SiglipModel.from_pretrained computes from the export (the fixture script).
    _assert_equal_outputs(
        model, params, np.load(FIXTURES / "hf_siglip2.npz"), np.load(FIXTURES / "hf_siglip2_export.npz")
    )


@pytest.mark.parametrize("tokenizer_file", ["tokenizer.json", "tokenizer.model"])
def test_import_takes_the_gemma_tokenizer_beside_the_checkpoint(tokenizer_file, tmp_path, capsys):
    """`convert import` of a SigLIP 2 folder: the Gemma tokenizer beside the weights (tokenizer.json
    first, as published; a folder with only tokenizer.model uses that) is used as SigLIP 2 was
    trained, so the loaded model turns the fixture's texts into transformers' ids and embeddings."""
    import clipjax
    from clipjax import convert

    folder = tmp_path / "siglip2"
    shutil.copytree(FOLDER, folder)
    siglip2_tokenizer_folder(folder)
    for name in {"tokenizer.json", "tokenizer.model"} - {tokenizer_file}:
        (folder / name).unlink()
    convert.main(
        ["import", "--format", "hf_siglip", "--checkpoint", str(folder), "--out", str(tmp_path / "w")]
    )
    model = clipjax.load(str(tmp_path / "w"), devices=jax.devices()[:1])
    kind = {"tokenizer.json": "hf", "tokenizer.model": "sentencepiece"}[tokenizer_file]
    assert (model.config.data.tokenizer.kind, model.config.data.tokenizer.style) == (kind, "siglip2")
    reference = np.load(FIXTURES / "hf_siglip2.npz")
    texts = [str(t) for t in reference["texts"]]
    np.testing.assert_array_equal(model.tokenize(texts), reference["tokens"])
    assert _relative_error(model.encode_text(texts), reference["text_emb"]) <= TOLERANCE


def _hf_siglip_shapes(*, width, layers, mlp, patch, image, t_width, t_layers, t_mlp, vocab, ctx):
    """The state dict of a Hugging Face SiglipModel, as shapes."""
    shapes = {
        "vision_model.embeddings.patch_embedding.weight": (width, 3, patch, patch),
        "vision_model.embeddings.patch_embedding.bias": (width,),
        "vision_model.embeddings.position_embedding.weight": ((image // patch) ** 2, width),
        "vision_model.head.probe": (1, 1, width),
        "vision_model.head.attention.in_proj_weight": (3 * width, width),
        "vision_model.head.attention.in_proj_bias": (3 * width,),
        "vision_model.head.attention.out_proj.weight": (width, width),
        "vision_model.head.attention.out_proj.bias": (width,),
        "vision_model.head.mlp.fc1.weight": (mlp, width),
        "vision_model.head.mlp.fc1.bias": (mlp,),
        "vision_model.head.mlp.fc2.weight": (width, mlp),
        "vision_model.head.mlp.fc2.bias": (width,),
        "text_model.embeddings.token_embedding.weight": (vocab, t_width),
        "text_model.embeddings.position_embedding.weight": (ctx, t_width),
        "text_model.head.weight": (width, t_width),
        "text_model.head.bias": (width,),
        "logit_scale": (1,),
        "logit_bias": (1,),
    }
    for name in ("vision_model.post_layernorm", "vision_model.head.layernorm", "text_model.final_layer_norm"):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (t_width if name.startswith("text") else width,)
    for prefix, w, n, m in (("vision_model", width, layers, mlp), ("text_model", t_width, t_layers, t_mlp)):
        for i in range(n):
            p = f"{prefix}.encoder.layers.{i}"
            for norm in ("layer_norm1", "layer_norm2"):
                shapes[f"{p}.{norm}.weight"] = shapes[f"{p}.{norm}.bias"] = (w,)
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes[f"{p}.self_attn.{proj}.weight"], shapes[f"{p}.self_attn.{proj}.bias"] = (w, w), (w,)
            shapes[f"{p}.mlp.fc1.weight"], shapes[f"{p}.mlp.fc1.bias"] = (m, w), (m,)
            shapes[f"{p}.mlp.fc2.weight"], shapes[f"{p}.mlp.fc2.bias"] = (w, m), (w,)
    return {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}


def test_full_size_siglip2_maps_and_its_256k_embedding_table_is_sharded():
    """SigLIP 2 So400m/16 at 256 px (shapes only, nothing allocated) maps onto the clipjax model, and
    under the default sharding rules its 256,000 x 1152 token embedding table (1.2 GB in float32)
    is split over the devices of an FSDP mesh, not copied onto each."""
    sizes = dict(width=1152, layers=27, mlp=4304, patch=16, image=256, t_width=1152, t_layers=27, t_mlp=4304)
    hf_config = {
        "vision_config": {"num_attention_heads": 16, "hidden_act": "gelu_pytorch_tanh"},
        "text_config": {"num_attention_heads": 16, "hidden_act": "gelu_pytorch_tanh", "vocab_size": 256000},
    }
    found = {}

    def mapped(state):
        keys, params, vocab = layouts.from_hf_siglip(state, hf_config)
        found.update(keys=keys, vocab=vocab)
        return params

    params = jax.eval_shape(mapped, _hf_siglip_shapes(**sizes, vocab=256000, ctx=64))
    config, _, _ = workdir.assemble(found["keys"], params, found["vocab"])
    assert (found["vocab"], config.data.tokenizer.max_len, config.data.image_size) == (256000, 64, 256)
    abstract_model = nnx.eval_shape(model_factory(config, vocab_size=found["vocab"]))
    table = (256000, 1152)
    for shape in ((1, 8, 1), (2, 4, 1), (1, 4, 2)):
        mesh = make_mesh(types.SimpleNamespace(axes=("data", "fsdp", "model"), shape=shape))
        sharding = param_shardings(abstract_model, mesh, config.sharding_rules)["text_tower"]["embed"]
        parts = math.prod(table) // math.prod(sharding.shard_shape(table))
        assert parts == 8 // shape[0] // shape[2], (shape, sharding.spec)
