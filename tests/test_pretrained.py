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
    for name in (p.name for p in FIXTURES.glob("*.json")):
        assert (FIXTURES / name).read_text() == (tmp_path / name).read_text(), name


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
    from tests.helpers import load_config

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


@pytest.mark.parametrize(
    "fmt,path,value",
    [
        ("hf_clip", "vision_config.hidden_size", 96),
        ("hf_clip", "vision_config.patch_size", 8),
        ("hf_clip", "vision_config.image_size", 64),
        ("hf_clip", "vision_config.num_hidden_layers", 3),
        ("hf_clip", "text_config.hidden_size", 32),
        ("hf_clip", "text_config.num_hidden_layers", 1),
        ("hf_clip", "text_config.max_position_embeddings", 77),
        ("hf_clip", "projection_dim", 512),
        ("hf_siglip", "vision_config.hidden_size", 96),
        ("hf_siglip", "vision_config.patch_size", 8),
        ("hf_siglip", "vision_config.image_size", 64),
        ("hf_siglip", "vision_config.num_hidden_layers", 3),
        ("hf_siglip", "text_config.intermediate_size", 256),
        ("hf_siglip", "text_config.vocab_size", 32000),
    ],
)
def test_a_config_json_that_contradicts_the_tensors_is_refused(fmt, path, value, tmp_path):
    import json
    import shutil

    folder = tmp_path / fmt
    shutil.copytree(FIXTURES / fmt, folder)
    config = json.loads((folder / "config.json").read_text())
    *sections, field = path.split(".")
    section = config
    for name in sections:
        section = section[name]
    stated = section[field]
    section[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError) as error:
        workdir.read_source(fmt, str(folder))
    assert str(error.value) == (
        f"{fmt} checkpoint: config.json says {path} {value}, the tensors give {stated}"
    )


def test_the_converter_refuses_a_contradicting_config_json_in_one_line(tmp_path, capsys):
    import json
    import shutil

    folder = tmp_path / "hf_clip"
    shutil.copytree(FIXTURES / "hf_clip", folder)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["hidden_size"] = 768
    (folder / "config.json").write_text(json.dumps(config))
    status, stderr = _convert(
        capsys, "import", "--format", "hf_clip", "--checkpoint", folder, "--out", tmp_path / "w"
    )
    assert (status, stderr) == (
        2,
        "clipjax.convert: hf_clip checkpoint: config.json says vision_config.hidden_size 768, "
        "the tensors give 64\n",
    )
    assert not (tmp_path / "w").exists()


def _convert(capsys, *args) -> tuple[int, str]:
    """(exit status, stderr) of `python -m clipjax.convert ARGS`, run in this process."""
    from clipjax import convert

    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        convert.main([str(a) for a in args])
    return stop.value.code, capsys.readouterr().err


def _zip(path, members):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name in members:
            archive.writestr(name, b"\0")
    return str(path)


def test_openai_torchscript_files_import_with_quick_gelu(tmp_path, monkeypatch):
    """An OpenAI release (a TorchScript archive: code/ and constants.pkl beside the data) is known
    without torch and imports with QuickGELU, whatever activation the --arch name implies; a
    torch.save state dict is not taken for one."""
    jit = _zip(
        tmp_path / "ViT-B-32.pt",
        ["ViT-B-32/version", "ViT-B-32/data.pkl", "ViT-B-32/constants.pkl", "ViT-B-32/code/__torch__/model.py",
         "ViT-B-32/data/0"],
    )  # fmt: skip
    pickle = _zip(
        tmp_path / "state.pt", ["archive/version", "archive/data.pkl", "archive/byteorder", "archive/data/0"]
    )
    assert tensors.is_torchscript(jit) and not tensors.is_torchscript(pickle)
    assert not tensors.is_torchscript(str(FIXTURES / "open_clip" / "model.safetensors"))
    # Reading the tensors out of either needs torch: the fixture's state dict stands in for them.
    state = tensors.read_checkpoint(str(FIXTURES / "open_clip" / "model.safetensors"))
    monkeypatch.setattr(tensors, "read_torch", lambda path: dict(state))
    notes = []
    keys, _, _ = workdir.read_source("open_clip", jit, arch="ViT-B-32", head_width=32, log=notes.append)
    assert (keys["model.image.activation"], keys["model.text.activation"]) == ("quick_gelu", "quick_gelu")
    assert notes == [
        "the checkpoint is a TorchScript archive, as OpenAI's releases are: it imports with QuickGELU "
        "(OpenAI's models use it), not the GELU that --arch ViT-B-32 implies; --activation overrides"
    ]
    keys, _, _ = workdir.read_source("open_clip", jit, head_width=32, activation="gelu")
    assert keys["model.image.activation"] == "gelu"  # the user's word stands
    # The plain state dict with an OpenAI name: GELU as the name says, with a note on the -quickgelu name.
    notes.clear()
    keys, _, _ = workdir.read_source("open_clip", pickle, arch="ViT-B-32", head_width=32, log=notes.append)
    assert keys["model.image.activation"] == "gelu" and notes[0].endswith("--arch ViT-B-32-quickgelu")


def test_openai_metadata_entries_mean_quick_gelu_and_nothing_means_a_refusal(tmp_path, capsys):
    from safetensors.numpy import save_file

    source = str(FIXTURES / "open_clip" / "model.safetensors")
    state = tensors.read_checkpoint(source)
    meta = {"input_resolution": 32, "context_length": 12, "vocab_size": 64}
    save_file(
        dict(state, **{k: np.array(v, np.int64) for k, v in meta.items()}),
        str(tmp_path / "openai.safetensors"),
    )
    keys, _, _ = workdir.read_source("open_clip", str(tmp_path / "openai.safetensors"), head_width=32)
    assert keys["model.image.activation"] == "quick_gelu"
    with pytest.raises(ConversionError, match=r"^--arch: open_clip files do not record the MLP activation;"):
        workdir.read_source("open_clip", source, head_width=32)
    args = (
        "import",
        "--format",
        "open_clip",
        "--checkpoint",
        source,
        "--tokenizer",
        "x.txt.gz",
        "--out",
        tmp_path / "w",
    )
    status, stderr = _convert(capsys, *args)
    assert status == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("clipjax.convert: --arch: open_clip files do not record the MLP activation")
    assert not (tmp_path / "w").exists()


def test_text_config_dict_is_read_as_transformers_reads_it(tmp_path):
    """Older CLIP config.json files also carry text_config_dict, whose values transformers prefers
    to text_config's: those are the ones checked against the tensors."""
    import json
    import shutil

    folder = tmp_path / "hf_clip"
    shutil.copytree(FIXTURES / "hf_clip", folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["hidden_size"] = 512  # overridden by text_config_dict below
    config["text_config_dict"] = {"hidden_size": 64}
    (folder / "config.json").write_text(json.dumps(config))
    keys, _, _ = workdir.read_source("hf_clip", str(folder))
    assert keys["model.text.width"] == 64
    config["text_config_dict"] = {"hidden_size": 64, "num_hidden_layers": 12}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ConversionError, match=r"config.json says text_config.num_hidden_layers 12, the tensors give 2"
    ):
        workdir.read_source("hf_clip", str(folder))


def test_open_clip_export_is_open_clips_state_dict_and_config(tmp_path):
    """`export --to open_clip` of the imported open_clip fixture: the state dict has exactly the
    names and shapes of open_clip's own (the fixture file is open_clip's `state_dict()`, so
    `load_state_dict(strict=True)` takes it), every tensor but the key bias (zeros: module
    docstring of layouts) equals open_clip's bit for bit, open_clip_config.json describes the
    model open_clip builds for it, and open_clip's embeddings of the export equal clipjax's."""
    import json

    config, params, model = _model("open_clip")
    tokenizer = type("Sizes", (), {"vocab_size": 64, "max_len": 12})()
    workdir.export("open_clip", config, params, tokenizer, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]
    original = tensors.read_checkpoint(str(FIXTURES / "open_clip" / "model.safetensors"))
    exported = tensors.read_checkpoint(str(tmp_path / "open_clip_model.safetensors"))
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in original.items()}
    for name, value in original.items():
        if name.endswith("in_proj_bias"):
            width = value.shape[0] // 3
            np.testing.assert_array_equal(exported[name][width : 2 * width], 0.0)
            value = np.concatenate([value[:width], 0 * value[width : 2 * width], value[2 * width :]])
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    assert json.loads((tmp_path / "open_clip_config.json").read_text()) == {
        "model_cfg": {
            "embed_dim": 48,
            "quick_gelu": True,
            "vision_cfg": {
                "width": 64,
                "layers": 2,
                "mlp_ratio": 4.0,
                "head_width": 32,
                "patch_size": 16,
                "image_size": 32,
            },
            "text_cfg": {
                "width": 64,
                "layers": 2,
                "mlp_ratio": 4.0,
                "heads": 2,
                "context_length": 12,
                "vocab_size": 64,
            },
        },  # fmt: skip
        "preprocess_cfg": {
            "mean": list(config.model.image_mean),
            "std": list(config.model.image_std),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    # What open_clip computes from the exported folder (the fixture script loads it strictly).
    reference, from_export = np.load(FIXTURES / "open_clip.npz"), np.load(FIXTURES / "open_clip_export.npz")
    image_emb, text_emb, logits = _outputs(model, params, reference["images"], reference["tokens"])
    assert _relative_error(image_emb, from_export["image_emb"]) <= 1e-4
    assert _relative_error(text_emb, from_export["text_emb"]) <= 1e-4
    assert _relative_error(logits, from_export["logits"]) <= 1e-4


def test_open_clip_export_refuses_what_open_clip_cannot_build():
    keys, params, vocab = _import("hf_siglip")
    config, _, params = workdir.assemble(keys, params, vocab)
    tokenizer = type("Sizes", (), {"vocab_size": 64, "max_len": 12})()
    with pytest.raises(ConversionError, match=r"^--format open_clip cannot express model.image.pool='map'"):
        workdir.export("open_clip", config, params, tokenizer, "unused")
    config, params, _ = _model("open_clip")
    config.model.text.activation = "gelu"
    with pytest.raises(ConversionError, match="QuickGELU is one flag for both towers in open_clip"):
        workdir.export("open_clip", config, params, tokenizer, "unused")


@pytest.mark.parametrize("activation,norm_eps", [("quick_gelu", 1e-5), ("gelu_tanh", 1e-6)])
def test_an_open_clip_export_imports_back_from_its_folder_without_flags(activation, norm_eps, tmp_path):
    """open_clip_config.json beside the weights (open_clip's folders, clipjax's exports) supplies
    what the state dict does not record: activations, heads of both towers, LayerNorm epsilons."""
    config, params, _ = _model("open_clip")
    for tower in (config.model.image, config.model.text):
        tower.activation, tower.norm_eps = activation, norm_eps
    tokenizer = type("Sizes", (), {"vocab_size": 64, "max_len": 12})()
    workdir.export("open_clip", config, params, tokenizer, str(tmp_path))
    for checkpoint in (tmp_path, tmp_path / "open_clip_model.safetensors"):
        keys, again, vocab = workdir.read_source("open_clip", str(checkpoint), arch="")
        again_config, _, again = workdir.assemble(keys, again, vocab)
        # The model as it was, now with open_clip's own image preprocessing (the export's).
        assert again_config.model.to_dict() == {**config.model.to_dict(), "image_resize": "open_clip"}
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(
        FileNotFoundError, match="no open_clip_model.safetensors or open_clip_pytorch_model.bin"
    ):
        workdir.read_source("open_clip", str(FIXTURES))
