"""Converted checkpoints as clipjax workdirs, and clipjax workdirs as Hugging Face or open_clip folders."""

from __future__ import annotations

import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import sentencepiece as spm
from flax import nnx

from clipjax import paths
from clipjax.config import apply_overrides, default_config
from clipjax.data.tokenizers import GEMMA_EOS, make_tokenizer
from clipjax.models import model_factory, model_spec
from clipjax.pretrained import layouts, open_clip_coca, preprocessing, tensors
from clipjax.pretrained.layouts import ConversionError
from clipjax.run_store import record

# A converted model evaluates on benchmarks, not on the embedded demo data: the evaluators of the
# training data's held-out split start switched off (`--config.evals.<name>.enabled=True`).
_HELD_OUT_EVALUATORS = ("zero_shot", "retrieval", "linear_probe", "knn", "embedding")


def tokenizer_keys(tokenizer_file: str | None, fmt: str) -> dict[str, Any]:
    """The `data.tokenizer.*` keys of a published tokenizer file, by its kind; for hf_siglip, the
    conventions of SigLIP 2 when the file holds Gemma's vocabulary, else SigLIP's."""
    if not tokenizer_file:
        return {}
    name = str(tokenizer_file)
    siglip = fmt in ("hf_siglip", "hf_siglip2_naflex")
    siglip2 = siglip and name.endswith((".json", ".model")) and _gemma_vocabulary(name)
    if name.endswith(".json"):
        keys = {"data.tokenizer.kind": "hf", "data.tokenizer.tokenizer_file": name}
        pad = _pad_token(name)
        if pad:
            keys["data.tokenizer.pad_token"] = pad
        if siglip2:
            keys["data.tokenizer.style"] = "siglip2"
        return keys
    if name.endswith(".model"):
        keys = {"data.tokenizer.kind": "sentencepiece", "data.tokenizer.model_file": name}
        if siglip:
            keys["data.tokenizer.style"] = "siglip2" if siglip2 else "siglip"
        return keys
    return {"data.tokenizer.kind": "clip_bpe", "data.tokenizer.vocab_file": name}


def _pad_token(tokenizer_file: str) -> str:
    """The padding token transformers would use with a tokenizer.json that names none: the
    `pad_token` of tokenizer_config.json beside it, else CLIP's `<|endoftext|>` when the
    vocabulary has it ('' when the file pads by itself)."""
    spec = json.loads(paths.read_text(tokenizer_file))
    if spec.get("padding"):
        return ""
    config_path = paths.join(str(tokenizer_file).rsplit("/", 1)[0], "tokenizer_config.json")
    if paths.exists(config_path):
        pad = json.loads(paths.read_text(config_path)).get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        if pad:
            return str(pad)
    vocab = (spec.get("model") or {}).get("vocab") or {}
    added = {t.get("content") for t in spec.get("added_tokens", [])}
    return "<|endoftext|>" if "<|endoftext|>" in vocab or "<|endoftext|>" in added else ""


def _gemma_vocabulary(tokenizer_file: str) -> bool:
    """Whether a tokenizer.json / sentencepiece file holds Gemma's `<eos>` (SigLIP 2's tokenizer)."""
    if tokenizer_file.endswith(".json"):
        spec = json.loads(paths.read_text(tokenizer_file))
        added = {t.get("content") for t in spec.get("added_tokens", [])}
        return GEMMA_EOS in added or GEMMA_EOS in ((spec.get("model") or {}).get("vocab") or {})
    model = spm.SentencePieceProcessor(model_proto=paths.read_bytes(tokenizer_file))
    return model.id_to_piece(model.piece_to_id(GEMMA_EOS)) == GEMMA_EOS


def find_tokenizer(checkpoint: str) -> str | None:
    """The tokenizer file a Hugging Face model folder ships (tokenizer.json, else spiece.model
    (SigLIP's), else tokenizer.model (SigLIP 2's Gemma model))."""
    if not paths.isdir(checkpoint):
        return None
    for name in ("tokenizer.json", "spiece.model", "tokenizer.model"):
        if paths.exists(paths.join(checkpoint, name)):
            return paths.join(checkpoint, name)
    return None


def read_source(
    fmt: str,
    checkpoint: str,
    *,
    activation: str | None = None,
    head_width: int | None = None,
    arch: str = "",
    log: Callable[[str], None] = lambda _: None,
):
    """(config keys, params, vocab size) of a published checkpoint in format `fmt`; for
    open_clip, `arch` (an open_clip model name) and the file's origin (OpenAI's releases are
    recognised) supply what the file does not record, and `activation` / `head_width` override
    them. `log` gets a note where the choice may surprise."""
    if fmt == "open_clip":
        keys, params, vocab = _read_open_clip(
            checkpoint, activation=activation, head_width=head_width, arch=arch, log=log
        )
    else:
        source, hf_config = tensors.read_hf_directory(checkpoint)
        keys, params, vocab = layouts.IMPORTERS[fmt](source, hf_config)
        if activation:
            keys["model.image.activation"] = keys["model.text.activation"] = activation
    # The reference's own image preprocessing, which clipjax.load's encode_image then applies.
    keys.update(
        preprocessing.recipe_keys(
            fmt, checkpoint, int(keys["data.image_size"]), int(keys.get("model.image.patch_size", 16))
        )
    )
    return keys, params, vocab


def _read_open_clip(checkpoint: str, *, activation, head_width, arch: str, log):
    """An open_clip file or folder. What the weights do not record comes from, first to last:
    --activation / --head_width, the open_clip_config.json beside the weights, the file being
    one of OpenAI's releases (QuickGELU), the --arch name."""
    checkpoint, model_cfg = tensors.open_clip_files(checkpoint)
    source, openai_file = tensors.read_open_clip_checkpoint(checkpoint)
    stated = layouts.open_clip_model_cfg(model_cfg) if model_cfg else {}
    by_name = layouts.open_clip_arch(arch) if arch else {}
    if stated and arch and by_name["activation"] != stated["image_activation"]:
        log(
            f"open_clip_config.json beside the weights says {stated['image_activation']}; it is used, "
            f"not the {by_name['activation']} that --arch {arch} implies"
        )
    importer, extra = layouts.from_open_clip, {}
    if open_clip_coca.is_coca(source):
        importer = open_clip_coca.from_open_clip_coca
        extra = {k: stated[k] for k in ("decoder_head_width", "pooler_heads") if k in stated}
    keys, params, vocab = importer(
        source,
        activation=layouts.open_clip_activation(
            arch=arch,
            activation=activation or stated.get("image_activation"),
            openai_file=openai_file,
            log=log,
        ),
        head_width=head_width or stated.get("head_width") or by_name.get("head_width", 64),
        text_head_width=stated.get("text_head_width", 64),
        **extra,
    )
    for tower in ("image", "text"):
        if stated and not activation:
            keys[f"model.{tower}.activation"] = stated[f"{tower}_activation"]
        if stated:
            keys[f"model.{tower}.norm_eps"] = stated[f"{tower}_norm_eps"]
    if stated and not activation and "model.decoder.activation" in keys:
        keys["model.decoder.activation"] = stated["decoder_activation"]
    return keys, params, vocab


def assemble(keys: dict[str, Any], params: dict, vocab_size: int, config=None):
    """(config, graphdef, params as jax arrays) after checking that `params` fill the model the
    keys describe exactly: every parameter present, with its shape, and nothing else. Params
    given as shapes (jax.ShapeDtypeStruct) are checked and returned as they are."""
    config = config if config is not None else default_config()
    apply_overrides(config, keys)
    model = nnx.eval_shape(model_factory(config, vocab_size=vocab_size))
    graphdef, _ = nnx.split(model)
    expected = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat_expected = dict(_flatten(expected))
    flat_params = dict(_flatten(params))
    for key in sorted(set(flat_expected) | set(flat_params)):
        if key not in flat_params:
            raise ConversionError(f"the checkpoint fills no clipjax parameter {key}")
        if key not in flat_expected:
            raise ConversionError(f"converted tensor {key} has no place in the clipjax model")
        if tuple(flat_expected[key].shape) != tuple(np.shape(flat_params[key])):
            raise ConversionError(
                f"clipjax parameter {key} has shape {tuple(flat_expected[key].shape)}, the checkpoint gives "
                f"{tuple(np.shape(flat_params[key]))}"
            )
    as_array = lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jnp.asarray(x, jnp.float32)  # noqa: E731
    return config, graphdef, jax.tree.map(as_array, params)


def _flatten(tree, prefix: str = ""):
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            yield from _flatten(value, path)
        else:
            yield path, value


def write_workdir(out: str, config: ml_collections.ConfigDict, params: dict, *, vocab_size: int) -> None:
    """A clipjax workdir at `out`: config.json and a step-0 checkpoint of the parameters with the
    tokenizer in its metadata, so `clipjax.load`, `clipjax.evaluate` and `config.init_from` use it."""
    for name in _HELD_OUT_EVALUATORS:
        getattr(config.evals, name).enabled = False
    tokenizer = make_tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size != vocab_size:
        raise ConversionError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, the checkpoint's embedding table {vocab_size}"
        )
    if record.holds_config(out):
        raise FileExistsError(f"--out {out!r} holds a clipjax workdir already; convert into a new folder")
    record.write_run(out, config, params, tokenizer)


def export(fmt: str, config, params: dict, tokenizer, out: str) -> dict:
    """A model folder at `out` of a clipjax model: Hugging Face's (model.safetensors, config.json;
    NaFlex: preprocessor_config.json with its patch budget) or open_clip's (open_clip_model.safetensors, open_clip_config.json, which
    `open_clip.create_model("local-dir:OUT")` reads); `layouts.EXPORT_FILES` names them."""
    spec = model_spec(config.model, image_size=config.data.image_size)
    numpy_params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    sizes = dict(
        image_size=int(config.data.image_size),
        max_len=int(tokenizer.max_len),
        vocab_size=int(tokenizer.vocab_size),
    )
    if fmt == "open_clip":
        sizes["image_resize"] = config.model.get("image_resize", "crop")
    exporter = layouts.EXPORTERS[fmt]
    if fmt == "open_clip" and spec.decoder is not None:
        exporter = open_clip_coca.to_open_clip_coca
    out_tensors, out_config = exporter(numpy_params, spec, **sizes)
    weights_file, config_file, *processor_file = layouts.EXPORT_FILES[fmt]
    paths.makedirs(out)
    tensors.write_safetensors(out_tensors, paths.join(out, weights_file))
    paths.write_atomic(paths.join(out, config_file), json.dumps(out_config, indent=2))
    if processor_file:  # NaFlex: the patch budget is the processor's setting
        settings = preprocessing.naflex_processor_settings(spec)
        paths.write_atomic(paths.join(out, processor_file[0]), json.dumps(settings, indent=2))
    return out_config
