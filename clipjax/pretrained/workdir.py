"""Converted checkpoints as clipjax workdirs, and clipjax workdirs as Hugging Face folders."""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from clipjax import paths
from clipjax.checkpoint import Checkpointer
from clipjax.config import apply_overrides, config_json, default_config
from clipjax.data.tokenizers import make_tokenizer
from clipjax.models import model_factory, model_spec
from clipjax.pretrained import layouts, tensors
from clipjax.pretrained.layouts import ConversionError
from clipjax.resume import checkpoint_meta

# A converted model evaluates on benchmarks, not on the embedded demo data: the evaluators of the
# training data's held-out split start switched off (`--config.evals.<name>.enabled=True`).
_HELD_OUT_EVALUATORS = ("zero_shot", "retrieval", "linear_probe", "knn", "embedding")


def tokenizer_keys(tokenizer_file: str | None, fmt: str) -> dict[str, Any]:
    """The `data.tokenizer.*` keys of a published tokenizer file, by its kind."""
    if not tokenizer_file:
        return {}
    name = str(tokenizer_file)
    if name.endswith(".json"):
        keys = {"data.tokenizer.kind": "hf", "data.tokenizer.tokenizer_file": name}
        pad = _pad_token(name)
        if pad:
            keys["data.tokenizer.pad_token"] = pad
        return keys
    if name.endswith(".model"):
        keys = {"data.tokenizer.kind": "sentencepiece", "data.tokenizer.model_file": name}
        if fmt == "hf_siglip":
            keys["data.tokenizer.style"] = "siglip"
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


def find_tokenizer(checkpoint: str) -> str | None:
    """The tokenizer file a Hugging Face model folder ships (tokenizer.json, else spiece.model)."""
    if not paths.isdir(checkpoint):
        return None
    for name in ("tokenizer.json", "spiece.model"):
        if paths.exists(paths.join(checkpoint, name)):
            return paths.join(checkpoint, name)
    return None


def read_source(
    fmt: str, checkpoint: str, *, activation: str | None = None, head_width: int | None = None, arch: str = ""
):
    """(config keys, params, vocab size) of a published checkpoint in format `fmt`; for
    open_clip, `arch` (an open_clip model name) supplies what the file does not record, and
    `activation` / `head_width` override it."""
    if fmt == "open_clip":
        source = tensors.read_checkpoint(checkpoint)
        known = layouts.open_clip_arch(arch) if arch else {"activation": "gelu", "head_width": 64}
        return layouts.from_open_clip(
            source,
            activation=activation or known["activation"],
            head_width=head_width or known["head_width"],
        )
    source, hf_config = tensors.read_hf_directory(checkpoint)
    keys, params, vocab = layouts.IMPORTERS[fmt](source, hf_config)
    if activation:
        keys["model.image.activation"] = keys["model.text.activation"] = activation
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
    if paths.exists(paths.join(out, "config.json")):
        raise FileExistsError(f"--out {out!r} holds a clipjax workdir already; convert into a new folder")
    checkpointer = Checkpointer(out)
    try:
        meta = checkpoint_meta(config, tokenizer, examples_seen=0, data_offset=0)
        checkpointer.save(0, {"params": params}, meta=meta)
        checkpointer.wait()
    finally:
        checkpointer.close()
    paths.write_atomic(paths.join(out, "config.json"), config_json(config))


def export(fmt: str, config, params: dict, tokenizer, out: str) -> dict:
    """A Hugging Face model folder at `out` (model.safetensors, config.json) of a clipjax model."""
    spec = model_spec(config.model, image_size=config.data.image_size)
    numpy_params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    out_tensors, hf_config = layouts.EXPORTERS[fmt](
        numpy_params,
        spec,
        image_size=int(config.data.image_size),
        max_len=int(tokenizer.max_len),
        vocab_size=int(tokenizer.vocab_size),
    )
    paths.makedirs(out)
    tensors.write_safetensors(out_tensors, paths.join(out, "model.safetensors"))
    paths.write_atomic(paths.join(out, "config.json"), json.dumps(hf_config, indent=2))
    return hf_config
