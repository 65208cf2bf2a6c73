"""Published checkpoints in and out: parity with the reference implementations (fixtures made by
tests/fixtures/make_pretrained_fixtures.py from open_clip and transformers on CPU), full-size
layouts mapped by shape, export round trips, and one-line errors."""

import importlib.util
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clipjax.config import default_config
from clipjax.models import model_spec
from clipjax.pretrained import layouts, tensors, workdir
from clipjax.pretrained.layouts import ConversionError

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "pretrained"
ROOT = FIXTURES.parents[2]
FORMATS = ("open_clip", "hf_clip", "hf_siglip")


def _import(fmt):
    if fmt == "open_clip":
        source = tensors.read_checkpoint(str(FIXTURES / "open_clip" / "model.safetensors"))
        return layouts.from_open_clip(source, activation="quick_gelu", head_width=32, text_head_width=32)
    return layouts.IMPORTERS[fmt](*tensors.read_hf_directory(str(FIXTURES / fmt)))


def _model(fmt):
    keys, params, vocab = _import(fmt)
    config, graphdef, params = workdir.assemble(keys, params, vocab)
    return config, params, nnx.merge(graphdef, params)


def _relative_error(got, want):
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def _outputs(model, params, images, tokens):
    image_emb = np.asarray(model.encode_image(jnp.asarray(images)))
    text_emb = np.asarray(model.encode_text(jnp.asarray(tokens, jnp.int32)))
    logits = float(np.exp(params["logit_scale"])) * image_emb @ text_emb.T
    if "logit_bias" in params:
        logits = logits + float(params["logit_bias"])
    return image_emb, text_emb, logits


@pytest.mark.parametrize("fmt", FORMATS)
def test_imported_embeddings_and_logits_equal_the_reference(fmt):
    reference = np.load(FIXTURES / f"{fmt}.npz")
    _, params, model = _model(fmt)
    image_emb, text_emb, logits = _outputs(model, params, reference["images"], reference["tokens"])
    assert _relative_error(image_emb, reference["image_emb"]) <= 1e-4
    assert _relative_error(text_emb, reference["text_emb"]) <= 1e-4
    assert _relative_error(logits, reference["logits"]) <= 1e-4


@pytest.mark.parametrize("fmt", ("hf_clip", "hf_siglip"))
def test_export_round_trip_and_transformers_reads_the_export(fmt, tmp_path):
    config, params, model = _model(fmt)
    tokenizer = type("Sizes", (), {"vocab_size": 64, "max_len": 12})()
    workdir.export(fmt, config, params, tokenizer, str(tmp_path))
    keys, again, vocab = layouts.IMPORTERS[fmt](*tensors.read_hf_directory(str(tmp_path)))
    _, _, again = workdir.assemble(keys, again, vocab)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit for bit
    # What transformers computes from the exported folder (the fixture script loads it).
    exported = np.load(FIXTURES / f"{fmt}_export.npz")
    reference = np.load(FIXTURES / f"{fmt}.npz")
    image_emb, text_emb, logits = _outputs(model, params, reference["images"], reference["tokens"])
    assert _relative_error(image_emb, exported["image_emb"]) <= 1e-4
    assert _relative_error(text_emb, exported["text_emb"]) <= 1e-4
    assert _relative_error(logits, exported["logits"]) <= 1e-4


def _openai_vit_shapes(width, layers, patch, image, t_width, t_layers, embed, ctx=77, vocab=49408):
    """The state dict of an OpenAI CLIP ViT, as shapes."""
    shapes = {
        "visual.conv1.weight": (width, 3, patch, patch),
        "visual.class_embedding": (width,),
        "visual.positional_embedding": ((image // patch) ** 2 + 1, width),
        "visual.ln_pre.weight": (width,),
        "visual.ln_pre.bias": (width,),
        "visual.ln_post.weight": (width,),
        "visual.ln_post.bias": (width,),
        "visual.proj": (width, embed),
        "token_embedding.weight": (vocab, t_width),
        "positional_embedding": (ctx, t_width),
        "ln_final.weight": (t_width,),
        "ln_final.bias": (t_width,),
        "text_projection": (t_width, embed),
        "logit_scale": (),
    }
    for prefix, w, n in (
        ("visual.transformer.resblocks", width, layers),
        ("transformer.resblocks", t_width, t_layers),
    ):
        for i in range(n):
            p = f"{prefix}.{i}"
            shapes.update(
                {
                    f"{p}.ln_1.weight": (w,),
                    f"{p}.ln_1.bias": (w,),
                    f"{p}.attn.in_proj_weight": (3 * w, w),
                    f"{p}.attn.in_proj_bias": (3 * w,),
                    f"{p}.attn.out_proj.weight": (w, w),
                    f"{p}.attn.out_proj.bias": (w,),
                    f"{p}.ln_2.weight": (w,),
                    f"{p}.ln_2.bias": (w,),
                    f"{p}.mlp.c_fc.weight": (4 * w, w),
                    f"{p}.mlp.c_fc.bias": (4 * w,),
                    f"{p}.mlp.c_proj.weight": (w, 4 * w),
                    f"{p}.mlp.c_proj.bias": (w,),
                }
            )
    return {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}


@pytest.mark.parametrize(
    "name,sizes",
    [
        ("ViT-B/16", dict(width=768, layers=12, patch=16, image=224, t_width=512, t_layers=12, embed=512)),
        ("ViT-L/14", dict(width=1024, layers=24, patch=14, image=224, t_width=768, t_layers=12, embed=768)),
    ],
)
def test_full_size_openai_layouts_map_onto_the_clipjax_model(name, sizes):
    found = {}

    def mapped(state):
        keys, params, vocab = layouts.from_open_clip(state, activation="quick_gelu")
        found.update(keys=keys, vocab=vocab)
        return params

    params = jax.eval_shape(mapped, _openai_vit_shapes(**sizes))  # shapes only: no weights
    config, _, _ = workdir.assemble(found["keys"], params, found["vocab"])
    spec = model_spec(config.model, image_size=config.data.image_size)
    assert (spec.image.width, spec.image.depth, spec.image.heads, spec.image.patch_size) == (
        sizes["width"],
        sizes["layers"],
        sizes["width"] // 64,
        sizes["patch"],
    )
    assert (spec.text.width, spec.text.heads, config.data.tokenizer.max_len) == (
        sizes["t_width"],
        sizes["t_width"] // 64,
        77,
    )
    assert spec.embed_dim == sizes["embed"] and config.data.image_size == 224, name


def test_unused_missing_and_misshapen_tensors_are_one_line():
    source = tensors.read_checkpoint(str(FIXTURES / "open_clip" / "model.safetensors"))
    extra = dict(source, **{"visual.extra_adapter.weight": np.zeros(3, np.float32)})
    with pytest.raises(
        ConversionError, match=r"^open_clip checkpoint: tensor 'visual.extra_adapter.weight' has no place"
    ):
        layouts.from_open_clip(extra, head_width=32)
    missing = {k: v for k, v in source.items() if k != "ln_final.bias"}
    with pytest.raises(ConversionError, match=r"^open_clip checkpoint: no tensor 'ln_final.bias'"):
        layouts.from_open_clip(missing, head_width=32)
    keys, params, vocab = layouts.from_open_clip(source, head_width=32)
    params["text_proj"]["kernel"] = params["text_proj"]["kernel"][:, :-1]
    with pytest.raises(ConversionError, match=r"^clipjax parameter text_proj/kernel has shape \(64, 48\)"):
        workdir.assemble(keys, params, vocab)
    resnet = {"visual.trunk.patch_embed.proj.weight": np.zeros((1, 1), np.float32)}
    with pytest.raises(ConversionError, match="not a CLIP ViT"):
        layouts.from_open_clip(resnet)


def test_an_architecture_the_format_cannot_express_is_refused():
    config = default_config()  # the demo's ResNet image tower
    spec = model_spec(config.model, image_size=config.data.image_size)
    with pytest.raises(ConversionError, match="--format hf_clip needs a ViT image tower"):
        layouts.to_hf_clip({}, spec, image_size=32, max_len=12, vocab_size=10)
    config.model.image.kind = "vit"
    spec = model_spec(config.model, image_size=config.data.image_size)
    with pytest.raises(ConversionError, match=r"cannot express model.image.patch_bias=True"):
        layouts.to_hf_clip({}, spec, image_size=32, max_len=12, vocab_size=10)


def test_the_fixture_script_reproduces_the_fixtures(tmp_path):
    for module in ("torch", "open_clip", "transformers"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    result = subprocess.run(
        [sys.executable, str(FIXTURES.parent / "make_pretrained_fixtures.py"), "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for npz in sorted(FIXTURES.glob("*.npz")):
        stored, fresh = np.load(npz), np.load(tmp_path / npz.name)
        for key in stored.files:
            np.testing.assert_array_equal(stored[key], fresh[key], err_msg=f"{npz.name}:{key}")


def _tiny_tokenizer_json(path):
    """A 64-token tokenizer.json like CLIP's in form: words w0..w61, start and end of text (the
    highest id, where CLIP's pooling reads), no padding section (CLIP's pads with end of text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {f"w{i}": i for i in range(62)}
    vocab.update({"<|startoftext|>": 62, "<|endoftext|>": 63})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 62), ("<|endoftext|>", 63)],
    )
    tok.save(str(path))


def test_import_cli_writes_a_workdir_that_loads_evaluates_and_exports(tmp_path):
    """`python -m clipjax.convert import` then `clipjax.load` and `export`, on the hf_clip fixture
    with a tokenizer.json in its folder: the loaded model tokenizes and embeds like the model
    assembled from the same tensors."""
    import shutil

    import clipjax

    folder = tmp_path / "hf_clip"
    shutil.copytree(FIXTURES / "hf_clip", folder)
    _tiny_tokenizer_json(folder / "tokenizer.json")
    env = {**__import__("os").environ, "JAX_PLATFORMS": "cpu"}
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "clipjax.convert", *args], cwd=ROOT, capture_output=True, text=True, env=env
    )
    result = run("import", "--format", "hf_clip", "--checkpoint", str(folder), "--out", str(tmp_path / "w"))
    assert result.returncode == 0, result.stderr[-3000:]
    model = clipjax.load(str(tmp_path / "w"), devices=jax.devices()[:1])
    assert model.tokenizer.encode(["w3 w5"])[0][:4].tolist() == [62, 3, 5, 63]
    assert model.config.data.tokenizer.pad_token == "<|endoftext|>"
    _, params, reference = _model("hf_clip")
    tokens = model.tokenizer.encode(["w3 w5 w7", "w1"])
    np.testing.assert_allclose(
        np.asarray(model.encode_text(["w3 w5 w7", "w1"])),
        np.asarray(reference.encode_text(jnp.asarray(tokens, jnp.int32))),
        rtol=1e-5,
        atol=1e-6,
    )
    # A second import into the same folder is refused, and nothing there changes.
    before = (tmp_path / "w" / "config.json").read_text()
    with pytest.raises(FileExistsError, match="holds a clipjax workdir already"):
        workdir.write_workdir(str(tmp_path / "w"), model.config, model.params, vocab_size=64)
    assert (tmp_path / "w" / "config.json").read_text() == before
    # Fine-tuned from, as configs/finetune_pretrained.py sets it up (here on the embedded data).
    from clipjax import trainer as train_lib
    from tests.test_train import load_config

    config = load_config("finetune_pretrained.py", str(tmp_path / "w"))
    assert config.init_from == str(tmp_path / "w") and config.model.text.pool == "argmax"
    config.data.name, config.data.data_dir = "shapes", str(tmp_path / "tfds")
    config.data.num_train, config.data.num_test, config.data.batch_size = 64, 32, 16
    config.steps, config.epochs, config.evals.at_end = 2, 0.0, False
    train_lib.train(config, str(tmp_path / "ft"), log=lambda _: None)
    assert (tmp_path / "ft" / "metrics.jsonl").exists()
    exported = run(
        "export", "--format", "hf_clip", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "e")
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(ConversionError, match="cannot express model.image.pool='cls'"):
        workdir.export("hf_siglip", model.config, model.params, model.tokenizer, str(tmp_path / "s"))


def test_open_clip_names_supply_what_the_file_does_not_record():
    assert layouts.open_clip_arch("ViT-B-32-quickgelu") == {"activation": "quick_gelu", "head_width": 64}
    assert layouts.open_clip_arch("ViT-H-14") == {"activation": "gelu", "head_width": 80}
    checkpoint = str(FIXTURES / "open_clip" / "model.safetensors")
    keys, _, _ = workdir.read_source("open_clip", checkpoint, arch="ViT-B-32-quickgelu", head_width=32)
    assert (keys["model.image.activation"], keys["model.image.heads"], keys["model.text.heads"]) == (
        "quick_gelu",
        2,
        1,
    )


def test_siglip_models_see_the_whole_image_and_clip_models_the_centre():
    from clipjax.api import prepare_images

    image = np.zeros((20, 60, 3), np.uint8)
    image[:, :10] = (255, 0, 0)  # a red band on the left sixth, the rest blue
    image[:, 10:] = (0, 0, 255)
    crop, squash = prepare_images(image, 8, "crop")[0], prepare_images(image, 8, "squash")[0]
    assert crop[:, :, 0].max() == 0  # the centre square holds no red
    assert squash[:, 0, 0].min() > 200 and squash[:, -1, 2].min() > 200  # the whole width kept
    # Imports record their reference's own preprocessing (tests/test_preprocessing_parity.py).
    for fmt in ("hf_siglip", "hf_clip"):
        assert workdir.read_source(fmt, str(FIXTURES / fmt))[0]["model.image_resize"] == fmt
