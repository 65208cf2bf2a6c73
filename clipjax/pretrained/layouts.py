"""Where each tensor of a published checkpoint goes in clipjax, and back.

Three layouts come in: open_clip's / OpenAI CLIP's state dict (`visual.*`, `transformer.*`, fused
`in_proj` attention), Hugging Face `CLIPModel` and `SiglipModel` (`vision_model.*`,
`text_model.*`, separate q/k/v projections; SigLIP 2's NaFlex `Siglip2Model` is `SiglipModel`'s
with a linear patch embedding). Each importer returns the clipjax config keys that
describe the architecture (`model.*`, `data.image_size`, `data.tokenizer.max_len`) and the
parameters as clipjax's nested dict. `Tensors` hands each source tensor out once and names any
tensor left over, so a checkpoint of another architecture fails in one line instead of loading
half its weights. open_clip's CoCa, which adds a decoder, is `clipjax.pretrained.open_clip_coca`.

The conversions are transpositions and reshapes, nothing numerical:
  * torch `Linear` stores W [out, in] for y = x W^T + b; clipjax's Dense kernel is W^T [in, out];
  * attention projections become [in, heads, head_dim] (query/key/value) and [heads, head_dim,
    out] (output), the head index outermost in torch's flat `heads * head_dim` axis;
  * conv kernels go from OIHW to HWIO;
  * the key projection's bias is read and dropped: it adds q . b_k to every logit of a query's
    row, which the softmax cancels exactly, so clipjax's attention has none (exports write zeros);
  * the blocks of a tower are stacked on a leading layer axis.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from clipjax.models.spec import CLIP_MEAN, CLIP_STD


class ConversionError(ValueError):
    """A checkpoint that does not map onto (or from) a clipjax model; one line naming the tensor."""


class Tensors:
    """Source tensors, each to be taken exactly once (`check_all_used` names leftovers)."""

    def __init__(self, tensors: dict[str, Any], what: str, ignored: Callable[[str], bool] = lambda n: False):
        self._tensors = {k: v for k, v in tensors.items() if not ignored(k)}
        self._used: set[str] = set()
        self.what = what

    def has(self, name: str) -> bool:
        return name in self._tensors

    def take(self, name: str) -> np.ndarray:
        if name not in self._tensors:
            raise ConversionError(f"{self.what}: no tensor {name!r} (not the layout this format expects)")
        if name in self._used:
            raise ConversionError(f"{self.what}: tensor {name!r} would be used twice")
        self._used.add(name)
        value = self._tensors[name]
        if isinstance(value, jax.core.Tracer):  # mapping shapes only (jax.eval_shape)
            return value
        return np.asarray(value, np.float32)

    def layers(self, prefix: str) -> int:
        """How many blocks `prefix{i}.` holds (0, 1, ... contiguous)."""
        found = {int(m.group(1)) for k in self._tensors if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
        if found != set(range(len(found))):
            raise ConversionError(f"{self.what}: blocks {prefix}* are not numbered 0..{len(found) - 1}")
        return len(found)

    def check_all_used(self) -> None:
        left = sorted(set(self._tensors) - self._used)
        if left:
            more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
            raise ConversionError(f"{self.what}: tensor {left[0]!r} has no place in the clipjax model{more}")


# ----------------------------------------------------------------------------------------------
# Pieces shared by the layouts (import direction).


def _ln(t: Tensors, prefix: str) -> dict:
    return {"scale": t.take(f"{prefix}.weight"), "bias": t.take(f"{prefix}.bias")}


def _dense(t: Tensors, prefix: str) -> dict:
    return {"kernel": t.take(f"{prefix}.weight").T, "bias": t.take(f"{prefix}.bias")}


def _attention(q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b, heads: int) -> dict:
    del k_b  # cancelled by the softmax (module docstring)
    width_in, width = q_w.shape[1], q_w.shape[0]
    if width % heads:
        raise ConversionError(f"attention width {width} is not divisible by {heads} heads")
    hd = width // heads
    return {
        "query": q_w.T.reshape(width_in, heads, hd),
        "query_bias": q_b.reshape(heads, hd),
        # Keys and values may read another width than the queries (cross-attention).
        "key": k_w.T.reshape(k_w.shape[1], heads, hd),
        "value": v_w.T.reshape(v_w.shape[1], heads, hd),
        "value_bias": v_b.reshape(heads, hd),
        "out": o_w.T.reshape(heads, hd, o_w.shape[0]),
        "out_bias": o_b,
    }


def _fused_attention(t: Tensors, prefix: str, heads: int) -> dict:
    w, b = t.take(f"{prefix}.in_proj_weight"), t.take(f"{prefix}.in_proj_bias")
    n = w.shape[0] // 3
    return _attention(
        w[:n], b[:n], w[n : 2 * n], b[n : 2 * n], w[2 * n :], b[2 * n :],
        t.take(f"{prefix}.out_proj.weight"), t.take(f"{prefix}.out_proj.bias"), heads,
    )  # fmt: skip


def _separate_attention(t: Tensors, prefix: str, heads: int) -> dict:
    parts = [t.take(f"{prefix}.{p}_proj.{k}") for p in ("q", "k", "v", "out") for k in ("weight", "bias")]
    return _attention(*parts, heads)


def _stack(blocks: list[dict]) -> dict:
    def stack(*xs):
        return jnp.stack(xs) if isinstance(xs[0], jax.core.Tracer) else np.stack(xs)

    return jax.tree.map(stack, *blocks)


def _number(x) -> float:
    """A scalar parameter's value for the config (any value when only shapes are mapped)."""
    return 0.0 if isinstance(x, jax.core.Tracer) else float(x)


def _open_clip_block(t: Tensors, p: str, heads: int) -> dict:
    return {
        "ln1": _ln(t, f"{p}.ln_1"),
        "attn": _fused_attention(t, f"{p}.attn", heads),
        "ln2": _ln(t, f"{p}.ln_2"),
        "mlp": {"fc1": _dense(t, f"{p}.mlp.c_fc"), "fc2": _dense(t, f"{p}.mlp.c_proj")},
    }


def _open_clip_blocks(t: Tensors, prefix: str, heads: int) -> dict:
    return {"blocks": _stack([_open_clip_block(t, f"{prefix}{i}", heads) for i in range(t.layers(prefix))])}


def _hf_blocks(t: Tensors, prefix: str, heads: int) -> dict:
    blocks = []
    for i in range(t.layers(prefix)):
        p = f"{prefix}{i}"
        blocks.append(
            {
                "ln1": _ln(t, f"{p}.layer_norm1"),
                "attn": _separate_attention(t, f"{p}.self_attn", heads),
                "ln2": _ln(t, f"{p}.layer_norm2"),
                "mlp": {"fc1": _dense(t, f"{p}.mlp.fc1"), "fc2": _dense(t, f"{p}.mlp.fc2")},
            }
        )
    return {"blocks": _stack(blocks)}


def _conv_kernel(oihw: np.ndarray) -> np.ndarray:
    return oihw.transpose(2, 3, 1, 0)


def _grid(num_positions: int, what: str) -> int:
    side = int(round(num_positions**0.5))
    if side * side != num_positions:
        raise ConversionError(f"{what}: {num_positions} position embeddings are not a square grid")
    return side


def _clip_architecture(
    *, embed, v_width, v_depth, v_heads, v_mlp, patch, image_size, t_width, t_depth, t_heads, t_mlp, ctx,
    activation, norm_eps,
) -> dict:  # fmt: skip
    """The clipjax config keys of a CLIP ViT (either source layout)."""
    return {
        "model.embed_dim": embed,
        "model.image.kind": "vit",
        "model.image.width": v_width,
        "model.image.depth": v_depth,
        "model.image.heads": v_heads,
        "model.image.mlp_dim": v_mlp,
        "model.image.patch_size": patch,
        "model.image.pool": "cls",
        "model.image.patch_embed": "conv",
        "model.image.patch_bias": False,
        "model.image.ln_pre": True,
        "model.image.activation": activation,
        "model.image.norm_eps": norm_eps,
        "model.text.width": t_width,
        "model.text.depth": t_depth,
        "model.text.heads": t_heads,
        "model.text.mlp_dim": t_mlp,
        "model.text.pool": "argmax",
        "model.text.causal": True,
        "model.text.pad_mask": False,
        "model.text.activation": activation,
        "model.text.norm_eps": norm_eps,
        "model.image_projection": "linear",
        "model.text_projection_bias": False,
        "model.image_mean": CLIP_MEAN,
        "model.image_std": CLIP_STD,
        "data.image_size": image_size,
        "data.tokenizer.max_len": ctx,
    }


# ----------------------------------------------------------------------------------------------
# Importers: tensors -> (config keys, params).

# Metadata entries of OpenAI's releases, checked against the weights rather than mapped.
_OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")


# open_clip architectures whose image tower has other than 64 channels per attention head.
OPEN_CLIP_HEAD_WIDTHS = {"ViT-H-14": 80, "ViT-H-16": 80, "ViT-g-14": 88, "ViT-bigG-14": 104}


# The ViTs OpenAI released, by their open_clip names: weights under these names come from OpenAI
# (QuickGELU, `-quickgelu`) or from open_clip's own training (GELU), and only the file can tell.
OPENAI_VIT_NAMES = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336")


def open_clip_activation(
    *, arch: str, activation: str | None, openai_file: str | None, log: Callable[[str], None]
) -> str:
    """The MLP activation of an open_clip file, which the file does not record: `activation` when
    given; QuickGELU for a file recognised as one of OpenAI's (`openai_file` says why); else what
    the `arch` name implies. With none of these the import is refused rather than guessed: GELU
    in place of QuickGELU moves the embeddings by about 1% (and the reverse as much)."""
    if activation:
        return activation
    if openai_file:
        if arch and not arch.endswith("-quickgelu"):
            log(
                f"the checkpoint is {openai_file}: it imports with QuickGELU (OpenAI's models use it), "
                f"not the GELU that --arch {arch} implies; --activation overrides"
            )
        return "quick_gelu"
    if not arch:
        raise ConversionError(
            "--arch: open_clip files do not record the MLP activation; name the model (OpenAI's weights: "
            "--arch ViT-B-32-quickgelu; open_clip-trained: --arch ViT-B-32) or give --activation"
        )
    if arch in OPENAI_VIT_NAMES:
        log(
            f"--arch {arch} imports with GELU, as open_clip-trained {arch} weights need; OpenAI's own {arch} "
            f"weights use QuickGELU: --arch {arch}-quickgelu"
        )
    return open_clip_arch(arch)["activation"]


def open_clip_model_cfg(model_cfg: dict) -> dict[str, Any]:
    """What an open_clip_config.json's `model_cfg` (open_clip's Hugging Face folders, clipjax's
    open_clip exports) says that the weights do not: per tower the activation and LayerNorm
    epsilon, and the channels per head (the `to_open_clip` config read back)."""
    vision, text = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}

    def activation(tower: dict) -> str:
        if model_cfg.get("quick_gelu"):
            return "quick_gelu"
        return "gelu_tanh" if (tower.get("act_kwargs") or {}).get("approximate") == "tanh" else "gelu"

    settings = {
        "image_activation": activation(vision),
        "text_activation": activation(text),
        "head_width": int(vision.get("head_width", 64)),
        "image_norm_eps": float((vision.get("norm_kwargs") or {}).get("eps", 1e-5)),
        "text_norm_eps": float((text.get("norm_kwargs") or {}).get("eps", 1e-5)),
    }
    if "heads" in text and "width" in text:
        settings["text_head_width"] = int(text["width"]) // int(text["heads"])
    # A CoCa's (open_clip builds its decoder's MLPs with the plain activation).
    decoder = model_cfg.get("multimodal_cfg") or {}
    settings["decoder_activation"] = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    if "heads" in decoder and "width" in decoder:
        settings["decoder_head_width"] = int(decoder["width"]) // int(decoder["heads"])
    if "attn_pooler_heads" in vision:
        settings["pooler_heads"] = int(vision["attn_pooler_heads"])
    return settings


def open_clip_arch(name: str) -> dict[str, Any]:
    """What an open_clip model name (`--arch`, e.g. ViT-B-32-quickgelu) says that the weights do
    not: the activation and the image tower's channels per head."""
    base = name.removesuffix("-quickgelu")
    return {
        "activation": "quick_gelu" if name.endswith("-quickgelu") else "gelu",
        "head_width": OPEN_CLIP_HEAD_WIDTHS.get(base, 64),
    }


def open_clip_vit(t: Tensors, head_width: int) -> tuple[dict, int]:
    """(clipjax params, image size) of the ViT trunk of an open_clip `visual.*` (patch and position
    embeddings, class token, ln_pre, blocks): what its CLIP and CoCa share."""
    conv = t.take("visual.conv1.weight")
    pos = t.take("visual.positional_embedding")
    tower = {
        "patch": {"kernel": _conv_kernel(conv)},
        "cls": t.take("visual.class_embedding"),
        "pos": pos,
        "ln_pre": _ln(t, "visual.ln_pre"),
        "encoder": _open_clip_blocks(t, "visual.transformer.resblocks.", conv.shape[0] // head_width),
    }
    return tower, _grid(pos.shape[0] - 1, t.what) * conv.shape[-1]


def from_open_clip(
    tensors: dict[str, Any], *, activation: str = "gelu", head_width: int = 64, text_head_width: int = 64
) -> tuple[dict, dict, int]:
    """open_clip / OpenAI CLIP ViT state dict -> (config keys, params, vocab size).

    The head count is not stored in the weights: open_clip's models use `head_width` channels
    per head in the image tower (64, more for H, g and bigG: `open_clip_arch`) and 64 in the
    text tower. Nor is the activation: OpenAI's own models use QuickGELU (open_clip's
    `-quickgelu` names), models trained by open_clip GELU.
    """
    t = Tensors(tensors, "open_clip checkpoint", ignored=lambda n: n in _OPENAI_METADATA or n == "attn_mask")
    if not t.has("visual.conv1.weight") or t.has("visual.trunk.patch_embed.proj.weight"):
        raise ConversionError(
            "open_clip checkpoint: not a CLIP ViT (no visual.conv1.weight); ResNet (ModifiedResNet) and "
            "timm image towers have no clipjax equivalent"
        )
    image_tower, image_size = open_clip_vit(t, head_width)
    tok = t.take("token_embedding.weight")
    t_pos = t.take("positional_embedding")
    t_width = tok.shape[1]
    for name, expected in (
        ("input_resolution", image_size),
        ("context_length", t_pos.shape[0]),
        ("vocab_size", tok.shape[0]),
    ):
        if name in tensors and int(np.asarray(tensors[name])) != expected:
            raise ConversionError(
                f"open_clip checkpoint: {name} {int(np.asarray(tensors[name]))} != {expected}"
            )
    patch, _, _, v_width = image_tower["patch"]["kernel"].shape  # HWIO
    v_heads, t_heads = v_width // head_width, t_width // text_head_width
    params = {
        "image_tower": {**image_tower, "norm": _ln(t, "visual.ln_post")},
        "image_proj": {"kernel": t.take("visual.proj")},
        "text_tower": {
            "embed": tok,
            "pos": t_pos,
            "encoder": _open_clip_blocks(t, "transformer.resblocks.", t_heads),
            "norm": _ln(t, "ln_final"),
        },
        "text_proj": {"kernel": t.take("text_projection")},
        "logit_scale": t.take("logit_scale").reshape(()),
    }
    keys = _clip_architecture(
        embed=params["image_proj"]["kernel"].shape[1],
        v_width=v_width,
        v_depth=params["image_tower"]["encoder"]["blocks"]["ln1"]["scale"].shape[0],
        v_heads=v_heads,
        v_mlp=params["image_tower"]["encoder"]["blocks"]["mlp"]["fc1"]["kernel"].shape[-1],
        patch=patch,
        image_size=image_size,
        t_width=t_width,
        t_depth=params["text_tower"]["encoder"]["blocks"]["ln1"]["scale"].shape[0],
        t_heads=t_heads,
        t_mlp=params["text_tower"]["encoder"]["blocks"]["mlp"]["fc1"]["kernel"].shape[-1],
        ctx=t_pos.shape[0],
        activation=activation,
        norm_eps=1e-5,
    )
    if t.has("logit_bias"):  # open_clip's SigLIP-loss models
        params["logit_bias"] = t.take("logit_bias").reshape(())
        keys["model.logit_bias_init"] = _number(params["logit_bias"])
    t.check_all_used()
    return keys, params, tok.shape[0]


_HF_ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}


def _activation(hf_config: dict, what: str) -> str:
    act = hf_config.get("hidden_act", "quick_gelu")
    if act not in _HF_ACTIVATIONS:
        raise ConversionError(
            f"{what}: hidden_act {act!r} has no clipjax equivalent ({sorted(_HF_ACTIVATIONS)})"
        )
    return _HF_ACTIVATIONS[act]


def _hf_config(config: dict) -> dict:
    """config.json as transformers reads it: older CLIP files also carry `text_config_dict` /
    `vision_config_dict`, whose values take precedence over `text_config` / `vision_config`."""
    config = dict(config)
    for tower in ("text_config", "vision_config"):
        if config.get(f"{tower}_dict"):
            config[tower] = {**(config.get(tower) or {}), **config[f"{tower}_dict"]}
    return config


def _check_config(what: str, config: dict, checks: list[tuple[str, Any]]) -> None:
    """Each `section.field` that config.json states against the value the tensors give: the file
    describes the model to transformers, and one that contradicts the weights is not the model's
    (transformers itself refuses most of these). A field config.json leaves out is not checked."""
    for path, actual in checks:
        *sections, field = path.split(".")
        section = config
        for name in sections:
            section = section.get(name) or {}
        stated = section.get(field)
        if stated is not None and stated != actual:
            raise ConversionError(f"{what}: config.json says {path} {stated!r}, the tensors give {actual!r}")


def _tower_config_checks(prefix: str, blocks: dict, width: int) -> list[tuple[str, Any]]:
    return [
        (f"{prefix}.hidden_size", int(width)),
        (f"{prefix}.num_hidden_layers", int(blocks["ln1"]["scale"].shape[0])),
        (f"{prefix}.intermediate_size", int(blocks["mlp"]["fc1"]["kernel"].shape[-1])),
    ]


def _towers_config_checks(params: dict, conv, grid: int, tok, t_pos) -> list[tuple[str, Any]]:
    """The config.json fields both Hugging Face layouts (CLIP, SigLIP) state about their towers,
    with the values the imported tensors give."""
    return [
        *_tower_config_checks("vision_config", params["image_tower"]["encoder"]["blocks"], conv.shape[0]),
        ("vision_config.patch_size", int(conv.shape[-1])),
        ("vision_config.image_size", int(grid * conv.shape[-1])),
        *_tower_config_checks("text_config", params["text_tower"]["encoder"]["blocks"], tok.shape[1]),
        ("text_config.vocab_size", int(tok.shape[0])),
        ("text_config.max_position_embeddings", int(t_pos.shape[0])),
    ]


def _position_ids(name: str) -> bool:
    return name.endswith("embeddings.position_ids")  # a buffer of older transformers versions


def from_hf_clip(tensors: dict[str, Any], config: dict) -> tuple[dict, dict, int]:
    """Hugging Face `CLIPModel` tensors + config.json -> (config keys, params, vocab size)."""
    t = Tensors(tensors, "hf_clip checkpoint", ignored=_position_ids)
    config = _hf_config(config)
    v_cfg, t_cfg = config.get("vision_config", {}), config.get("text_config", {})
    conv = t.take("vision_model.embeddings.patch_embedding.weight")
    v_pos = t.take("vision_model.embeddings.position_embedding.weight")
    grid = _grid(v_pos.shape[0] - 1, "hf_clip checkpoint")
    v_heads, t_heads = int(v_cfg["num_attention_heads"]), int(t_cfg["num_attention_heads"])
    tok = t.take("text_model.embeddings.token_embedding.weight")
    t_pos = t.take("text_model.embeddings.position_embedding.weight")
    params = {
        "image_tower": {
            "patch": {"kernel": _conv_kernel(conv)},
            "cls": t.take("vision_model.embeddings.class_embedding"),
            "pos": v_pos,
            "ln_pre": _ln(t, "vision_model.pre_layrnorm"),
            "encoder": _hf_blocks(t, "vision_model.encoder.layers.", v_heads),
            "norm": _ln(t, "vision_model.post_layernorm"),
        },
        "image_proj": {"kernel": t.take("visual_projection.weight").T},
        "text_tower": {
            "embed": tok,
            "pos": t_pos,
            "encoder": _hf_blocks(t, "text_model.encoder.layers.", t_heads),
            "norm": _ln(t, "text_model.final_layer_norm"),
        },
        "text_proj": {"kernel": t.take("text_projection.weight").T},
        "logit_scale": t.take("logit_scale").reshape(()),
    }
    t.check_all_used()
    _check_config(
        "hf_clip checkpoint",
        config,
        [
            *_towers_config_checks(params, conv, grid, tok, t_pos),
            ("projection_dim", int(params["image_proj"]["kernel"].shape[1])),
        ],
    )
    v_act, t_act = _activation(v_cfg, "hf_clip vision_config"), _activation(t_cfg, "hf_clip text_config")
    keys = _clip_architecture(
        embed=params["image_proj"]["kernel"].shape[1],
        v_width=conv.shape[0],
        v_depth=params["image_tower"]["encoder"]["blocks"]["ln1"]["scale"].shape[0],
        v_heads=v_heads,
        v_mlp=params["image_tower"]["encoder"]["blocks"]["mlp"]["fc1"]["kernel"].shape[-1],
        patch=conv.shape[-1],
        image_size=grid * conv.shape[-1],
        t_width=tok.shape[1],
        t_depth=params["text_tower"]["encoder"]["blocks"]["ln1"]["scale"].shape[0],
        t_heads=t_heads,
        t_mlp=params["text_tower"]["encoder"]["blocks"]["mlp"]["fc1"]["kernel"].shape[-1],
        ctx=t_pos.shape[0],
        activation=v_act,
        norm_eps=float(v_cfg.get("layer_norm_eps", 1e-5)),
    )
    keys["model.text.activation"] = t_act
    keys["model.text.norm_eps"] = float(t_cfg.get("layer_norm_eps", 1e-5))
    return keys, params, tok.shape[0]


def _linear_patches_as_conv(weight, what: str):
    """A NaFlex `Linear` patch embedding [width, p * p * 3] (patches flattened row, column,
    channel) as the conv weight [width, 3, p, p] that computes the same embedding."""
    p = int(round((weight.shape[1] / 3) ** 0.5))
    if 3 * p * p != weight.shape[1]:
        raise ConversionError(f"{what}: a patch embedding over {weight.shape[1]} values is not p x p x 3")
    return weight.reshape(weight.shape[0], p, p, 3).transpose(0, 3, 1, 2)


def from_hf_siglip(tensors: dict[str, Any], config: dict, fmt: str = "hf_siglip") -> tuple[dict, dict, int]:
    """Hugging Face `SiglipModel` tensors + config.json -> (config keys, params, vocab size); with
    `fmt` hf_siglip2_naflex, `Siglip2Model`'s: the same but for a linear patch embedding."""
    naflex = fmt == "hf_siglip2_naflex"
    what = f"{fmt} checkpoint"
    t = Tensors(tensors, what, ignored=_position_ids)
    config = _hf_config(config)
    v_cfg, t_cfg = config.get("vision_config", {}), config.get("text_config", {})
    v_heads, t_heads = int(v_cfg["num_attention_heads"]), int(t_cfg["num_attention_heads"])
    conv = t.take("vision_model.embeddings.patch_embedding.weight")
    if naflex:
        conv = _linear_patches_as_conv(conv, what)
    v_pos = t.take("vision_model.embeddings.position_embedding.weight")
    grid = _grid(v_pos.shape[0], what)
    head = "vision_model.head"
    probe = t.take(f"{head}.probe").reshape(-1)
    tok = t.take("text_model.embeddings.token_embedding.weight")
    t_pos = t.take("text_model.embeddings.position_embedding.weight")
    params = {
        "image_tower": {
            "patch": {
                "kernel": _conv_kernel(conv),
                "bias": t.take("vision_model.embeddings.patch_embedding.bias"),
            },
            "pos": v_pos,
            "encoder": _hf_blocks(t, "vision_model.encoder.layers.", v_heads),
            "norm": _ln(t, "vision_model.post_layernorm"),
            "map_head": {
                "probe": probe,
                "attn": _fused_attention(t, f"{head}.attention", v_heads),
                "norm": _ln(t, f"{head}.layernorm"),
                "mlp": {"fc1": _dense(t, f"{head}.mlp.fc1"), "fc2": _dense(t, f"{head}.mlp.fc2")},
            },
        },
        "text_tower": {
            "embed": tok,
            "pos": t_pos,
            "encoder": _hf_blocks(t, "text_model.encoder.layers.", t_heads),
            "norm": _ln(t, "text_model.final_layer_norm"),
        },
        "text_proj": _dense(t, "text_model.head"),
        "logit_scale": t.take("logit_scale").reshape(()),
        "logit_bias": t.take("logit_bias").reshape(()),
    }
    t.check_all_used()
    blocks = params["image_tower"]["encoder"]["blocks"]
    text_blocks = params["text_tower"]["encoder"]["blocks"]
    v_width = conv.shape[0]
    _check_config(
        what,
        config,
        [
            *_towers_config_checks(params, conv, grid, tok, t_pos),
            ("text_config.projection_size", int(params["text_proj"]["kernel"].shape[1])),
            *([("vision_config.num_patches", grid * grid)] if naflex else []),
        ],
    )
    if params["text_proj"]["kernel"].shape[1] != v_width:
        raise ConversionError(
            f"{what}: text head projects to {params['text_proj']['kernel'].shape[1]}, the image "
            f"tower's width is {v_width}; clipjax compares them without an image projection"
        )
    v_act, t_act = _activation(v_cfg, f"{fmt} vision_config"), _activation(t_cfg, f"{fmt} text_config")
    keys = {
        "model.embed_dim": v_width,
        "model.image.kind": "vit",
        "model.image.width": v_width,
        "model.image.depth": blocks["ln1"]["scale"].shape[0],
        "model.image.heads": v_heads,
        "model.image.mlp_dim": blocks["mlp"]["fc1"]["kernel"].shape[-1],
        "model.image.patch_size": conv.shape[-1],
        "model.image.pool": "map",
        "model.image.patch_embed": "conv",
        "model.image.patch_bias": True,
        "model.image.ln_pre": False,
        "model.image.activation": v_act,
        "model.image.norm_eps": float(v_cfg.get("layer_norm_eps", 1e-6)),
        "model.text.width": tok.shape[1],
        "model.text.depth": text_blocks["ln1"]["scale"].shape[0],
        "model.text.heads": t_heads,
        "model.text.mlp_dim": text_blocks["mlp"]["fc1"]["kernel"].shape[-1],
        "model.text.pool": "final",
        "model.text.causal": False,
        "model.text.pad_mask": False,
        "model.text.activation": t_act,
        "model.text.norm_eps": float(t_cfg.get("layer_norm_eps", 1e-6)),
        "model.image_projection": "none",
        "model.text_projection_bias": True,
        "model.logit_bias_init": _number(params["logit_bias"]),
        "model.image_mean": (0.5, 0.5, 0.5),
        "model.image_std": (0.5, 0.5, 0.5),
        "data.image_size": grid * conv.shape[-1],
        "data.tokenizer.max_len": t_pos.shape[0],
    }
    if naflex:  # the position table is data.image_size's grid, resized to each image's
        keys["model.image.naflex"] = True
    return keys, params, tok.shape[0]


# ----------------------------------------------------------------------------------------------
# Exporters: clipjax params -> Hugging Face tensors + config.json.


def _inv_ln(ln: dict, prefix: str, out: dict) -> None:
    out[f"{prefix}.weight"], out[f"{prefix}.bias"] = ln["scale"], ln["bias"]


def _inv_dense(dense: dict, prefix: str, out: dict) -> None:
    out[f"{prefix}.weight"] = np.ascontiguousarray(dense["kernel"].T)
    out[f"{prefix}.bias"] = dense["bias"]


def _inv_attention(attn: dict, prefix: str, out: dict, *, fused: bool) -> None:
    flat = lambda w: np.ascontiguousarray(w.reshape(w.shape[0], -1).T)  # noqa: E731
    q, k, v = flat(attn["query"]), flat(attn["key"]), flat(attn["value"])
    qb, vb = attn["query_bias"].reshape(-1), attn["value_bias"].reshape(-1)
    kb = np.zeros_like(qb)  # clipjax has none: the softmax cancels it
    o = np.ascontiguousarray(attn["out"].reshape(-1, attn["out"].shape[-1]).T)
    if fused:
        out[f"{prefix}.in_proj_weight"] = np.concatenate([q, k, v])
        out[f"{prefix}.in_proj_bias"] = np.concatenate([qb, kb, vb])
    else:
        for name, w, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
            out[f"{prefix}.{name}_proj.weight"], out[f"{prefix}.{name}_proj.bias"] = w, b
    out[f"{prefix}.out_proj.weight"], out[f"{prefix}.out_proj.bias"] = o, attn["out_bias"]


# A block's tensor names in each export layout: ln1, attention, ln2, fc1, fc2, fused q/k/v.
_HF_BLOCK = ("layer_norm1", "self_attn", "layer_norm2", "mlp.fc1", "mlp.fc2", False)
_OPEN_CLIP_BLOCK = ("ln_1", "attn", "ln_2", "mlp.c_fc", "mlp.c_proj", True)


def _inv_blocks(stacked: dict, prefix: str, out: dict, names: tuple = _HF_BLOCK) -> None:
    ln1, attn, ln2, fc1, fc2, fused = names
    for i in range(stacked["ln1"]["scale"].shape[0]):
        block = jax.tree.map(lambda x, i=i: np.asarray(x[i]), stacked)
        p = f"{prefix}{i}"
        _inv_ln(block["ln1"], f"{p}.{ln1}", out)
        _inv_attention(block["attn"], f"{p}.{attn}", out, fused=fused)
        _inv_ln(block["ln2"], f"{p}.{ln2}", out)
        _inv_dense(block["mlp"]["fc1"], f"{p}.{fc1}", out)
        _inv_dense(block["mlp"]["fc2"], f"{p}.{fc2}", out)


_TO_HF_ACTIVATION = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def _require(spec, checks: list[tuple[str, Any, Any]], fmt: str) -> None:
    for key, value, wanted in checks:
        if value != wanted:
            raise ConversionError(
                f"--format {fmt} cannot express {key}={value!r} (the format needs {wanted!r}); "
                "this model cannot be exported to it"
            )


def _hf_towers(params: dict, spec, fmt: str, checks: list, out: dict) -> None:
    """Checks the architecture against `checks`, then writes what both Hugging Face layouts share:
    the patch and position embeddings, the blocks and final norm of both towers, the token
    embedding and the logit scale (shape [] for CLIP, [1] for SigLIP: as transformers has it)."""
    if spec.image_kind != "vit":
        raise ConversionError(
            f"--format {fmt} needs a ViT image tower; model.image.kind is {spec.image_kind!r}"
        )
    _require(spec, checks, fmt)
    img, txt = params["image_tower"], params["text_tower"]
    out["vision_model.embeddings.patch_embedding.weight"] = np.ascontiguousarray(
        img["patch"]["kernel"].transpose(3, 2, 0, 1)
    )
    out["vision_model.embeddings.position_embedding.weight"] = img["pos"]
    _inv_blocks(img["encoder"]["blocks"], "vision_model.encoder.layers.", out)
    _inv_ln(img["norm"], "vision_model.post_layernorm", out)
    out["text_model.embeddings.token_embedding.weight"] = txt["embed"]
    out["text_model.embeddings.position_embedding.weight"] = txt["pos"]
    _inv_blocks(txt["encoder"]["blocks"], "text_model.encoder.layers.", out)
    _inv_ln(txt["norm"], "text_model.final_layer_norm", out)
    scale = np.asarray(params["logit_scale"], np.float32)
    out["logit_scale"] = scale.reshape(()) if fmt == "hf_clip" else scale.reshape(1)


def _hf_tower_config(tower, kind: str, **extra) -> dict:
    return {
        "model_type": kind,
        "hidden_size": tower.width,
        "intermediate_size": tower.mlp_dim,
        "num_attention_heads": tower.heads,
        "num_hidden_layers": tower.depth,
        "hidden_act": _TO_HF_ACTIVATION[tower.activation],
        "layer_norm_eps": tower.norm_eps,
        **extra,
    }


def _clip_layout_checks(spec) -> list[tuple[str, Any, Any]]:
    """What CLIP's layout (OpenAI's, open_clip's and transformers' CLIPModel) fixes."""
    v, t = spec.image, spec.text
    return [
        ("model.image.pool", getattr(v, "pool", None), "cls"),
        ("model.image.patch_embed", getattr(v, "patch_embed", None), "conv"),
        ("model.image.patch_bias", getattr(v, "patch_bias", None), False),
        ("model.image.ln_pre", getattr(v, "ln_pre", None), True),
        ("model.text.pool", t.pool, "argmax"),
        ("model.text.causal", t.causal, True),
        ("model.text.pad_mask", t.pad_mask, False),
        ("model.image_projection", spec.image_projection, "linear"),
        ("model.text_projection_bias", spec.text_projection_bias, False),
    ]


def to_hf_clip(params: dict, spec, *, image_size: int, max_len: int, vocab_size: int) -> tuple[dict, dict]:
    """clipjax params of a CLIP-layout model -> (Hugging Face CLIPModel tensors, config.json)."""
    v, t = spec.image, spec.text
    checks = [*_clip_layout_checks(spec), ("model.logit_bias (set)", "logit_bias" in params, False)]
    out: dict[str, np.ndarray] = {}
    _hf_towers(params, spec, "hf_clip", checks, out)
    out["vision_model.embeddings.class_embedding"] = params["image_tower"]["cls"]
    _inv_ln(params["image_tower"]["ln_pre"], "vision_model.pre_layrnorm", out)
    out["visual_projection.weight"] = np.ascontiguousarray(params["image_proj"]["kernel"].T)
    out["text_projection.weight"] = np.ascontiguousarray(params["text_proj"]["kernel"].T)
    config = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": spec.embed_dim,
        "logit_scale_init_value": float(np.asarray(params["logit_scale"])),
        "vision_config": _hf_tower_config(
            v,
            "clip_vision_model",
            patch_size=v.patch_size,
            image_size=image_size,
            projection_dim=spec.embed_dim,
        ),
        # eos_token_id 2 selects transformers' pooling at the highest token id, which is
        # clipjax's `argmax` pooling whatever the tokenizer's end-of-text id.
        "text_config": _hf_tower_config(
            t,
            "clip_text_model",
            max_position_embeddings=max_len,
            vocab_size=vocab_size,
            projection_dim=spec.embed_dim,
            eos_token_id=2,
            bos_token_id=0,
            pad_token_id=1,
        ),
    }
    return out, config


def to_hf_siglip(
    params: dict, spec, *, image_size: int, max_len: int, vocab_size: int, fmt: str = "hf_siglip"
) -> tuple[dict, dict]:
    """clipjax params of a SigLIP-layout model -> (Hugging Face SiglipModel tensors, config.json);
    with `fmt` hf_siglip2_naflex, `Siglip2Model`'s (the parameters are the same: a fixed-resolution
    model exports as a NaFlex one at its grid, and the reverse)."""
    v, t = spec.image, spec.text
    checks = [
        ("model.image.pool", getattr(v, "pool", None), "map"),
        ("model.image.patch_embed", getattr(v, "patch_embed", None), "conv"),
        ("model.image.patch_bias", getattr(v, "patch_bias", None), True),
        ("model.image.ln_pre", getattr(v, "ln_pre", None), False),
        ("model.text.pool", t.pool, "final"),
        ("model.text.causal", t.causal, False),
        ("model.text.pad_mask", t.pad_mask, False),
        ("model.image_projection", spec.image_projection, "none"),
        ("model.text_projection_bias", spec.text_projection_bias, True),
        ("model.logit_bias (set)", "logit_bias" in params, True),
    ]
    out: dict[str, np.ndarray] = {}
    _hf_towers(params, spec, fmt, checks, out)
    out["vision_model.embeddings.patch_embedding.bias"] = params["image_tower"]["patch"]["bias"]
    head = params["image_tower"]["map_head"]
    out["vision_model.head.probe"] = head["probe"].reshape(1, 1, -1)
    _inv_attention(head["attn"], "vision_model.head.attention", out, fused=True)
    _inv_ln(head["norm"], "vision_model.head.layernorm", out)
    _inv_dense(head["mlp"]["fc1"], "vision_model.head.mlp.fc1", out)
    _inv_dense(head["mlp"]["fc2"], "vision_model.head.mlp.fc2", out)
    _inv_dense(params["text_proj"], "text_model.head", out)
    out["logit_bias"] = np.asarray(params["logit_bias"], np.float32).reshape(1)
    text = dict(max_position_embeddings=max_len, vocab_size=vocab_size, projection_size=spec.embed_dim)
    if fmt == "hf_siglip2_naflex":
        kernel = params["image_tower"]["patch"]["kernel"]  # HWIO: flattened, NaFlex's patch order
        out["vision_model.embeddings.patch_embedding.weight"] = np.ascontiguousarray(
            kernel.reshape(-1, kernel.shape[-1]).T
        )
        vision = _hf_tower_config(
            v, "siglip2_vision_model", patch_size=v.patch_size, num_patches=(image_size // v.patch_size) ** 2
        )
        text_config = _hf_tower_config(t, "siglip2_text_model", **text)
        return out, dict(
            architectures=["Siglip2Model"],
            model_type="siglip2",
            vision_config=vision,
            text_config=text_config,
        )
    config = {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "vision_config": _hf_tower_config(
            v, "siglip_vision_model", patch_size=v.patch_size, image_size=image_size
        ),
        "text_config": _hf_tower_config(t, "siglip_text_model", **text),
    }
    return out, config


# ----------------------------------------------------------------------------------------------
# Exporter: clipjax params -> open_clip state dict + open_clip_config.json.


def _open_clip_tower_config(tower, fmt: str, extra: dict) -> dict:
    """open_clip's sizes of a tower; its MLP width is int(width * mlp_ratio), which must give
    clipjax's mlp_dim back exactly."""
    ratio = tower.mlp_dim / tower.width
    if int(tower.width * ratio) != tower.mlp_dim:
        raise ConversionError(f"--format {fmt} cannot express mlp_dim {tower.mlp_dim} on width {tower.width}")
    config = {"width": tower.width, "layers": tower.depth, "mlp_ratio": ratio, **extra}
    if tower.activation == "gelu_tanh":
        config["act_kwargs"] = {"approximate": "tanh"}  # torch's GELU with the tanh approximation
    if tower.norm_eps != 1e-5:  # open_clip's LayerNorm default
        config["norm_kwargs"] = {"eps": tower.norm_eps}
    return config


def open_clip_towers_config(
    spec, checks: list, *, image_size: int, max_len: int, vocab_size: int, fmt: str = "open_clip"
) -> dict:
    """What the `model_cfg` of open_clip's CLIP and CoCa share, after checking the architecture
    against `checks`: the shared width, the QuickGELU flag (one for every tower in open_clip, so
    they must agree on it) and both towers' sizes."""
    v, t = spec.image, spec.text
    if spec.image_kind != "vit":
        raise ConversionError(
            f"--format {fmt} needs a ViT image tower; model.image.kind is {spec.image_kind!r}"
        )
    _require(spec, checks, fmt)
    quick = v.activation == "quick_gelu"
    if (t.activation == "quick_gelu") != quick:
        raise ConversionError(
            f"--format {fmt} cannot express model.image.activation={v.activation!r} with "
            f"model.text.activation={t.activation!r}: QuickGELU is one flag for both towers in open_clip"
        )
    return {
        "embed_dim": spec.embed_dim,
        "quick_gelu": quick,
        "vision_cfg": _open_clip_tower_config(
            v, fmt, {"head_width": v.width // v.heads, "patch_size": v.patch_size, "image_size": image_size}
        ),
        "text_cfg": _open_clip_tower_config(
            t, fmt, {"heads": t.heads, "context_length": max_len, "vocab_size": vocab_size}
        ),
    }


def open_clip_visual(img: dict, out: dict) -> None:
    """Writes the `visual.*` tensors open_clip's CLIP and CoCa share (`open_clip_vit` and ln_post)."""
    out["visual.conv1.weight"] = np.ascontiguousarray(img["patch"]["kernel"].transpose(3, 2, 0, 1))
    out["visual.class_embedding"] = img["cls"]
    out["visual.positional_embedding"] = img["pos"]
    _inv_ln(img["ln_pre"], "visual.ln_pre", out)
    _inv_blocks(img["encoder"]["blocks"], "visual.transformer.resblocks.", out, _OPEN_CLIP_BLOCK)
    _inv_ln(img["norm"], "visual.ln_post", out)


def open_clip_export(params: dict, spec, out: dict, model_cfg: dict, image_resize: str) -> tuple[dict, dict]:
    """(state dict, open_clip_config.json) from the tensors and `model_cfg` of a model: the logit
    scale and bias added, and `preprocess_cfg`."""
    out["logit_scale"] = np.asarray(params["logit_scale"], np.float32).reshape(())
    if "logit_bias" in params:  # a sigmoid-loss model: open_clip's init_logit_bias makes the parameter
        out["logit_bias"] = np.asarray(params["logit_bias"], np.float32).reshape(())
        model_cfg["init_logit_bias"] = float(out["logit_bias"])
    preprocess_cfg = {
        "mean": list(spec.image_mean),
        "std": list(spec.image_std),
        "interpolation": "bicubic",
        "resize_mode": "shortest" if image_resize == "crop" else "squash",
    }
    return out, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def to_open_clip(
    params: dict, spec, *, image_size: int, max_len: int, vocab_size: int, image_resize: str = "crop"
) -> tuple[dict, dict]:
    """clipjax params of a CLIP-layout model -> (open_clip `CLIP` state dict, open_clip_config.json:
    `model_cfg`, the arguments of `open_clip.model.CLIP`, and `preprocess_cfg`)."""
    model_cfg = open_clip_towers_config(
        spec, _clip_layout_checks(spec), image_size=image_size, max_len=max_len, vocab_size=vocab_size
    )
    txt = params["text_tower"]
    out: dict[str, np.ndarray] = {
        "visual.proj": params["image_proj"]["kernel"],
        "token_embedding.weight": txt["embed"],
        "positional_embedding": txt["pos"],
        "text_projection": params["text_proj"]["kernel"],
    }
    open_clip_visual(params["image_tower"], out)
    _inv_blocks(txt["encoder"]["blocks"], "transformer.resblocks.", out, _OPEN_CLIP_BLOCK)
    _inv_ln(txt["norm"], "ln_final", out)
    return open_clip_export(params, spec, out, model_cfg, image_resize)


IMPORTERS = {
    "open_clip": from_open_clip,
    "hf_clip": from_hf_clip,
    "hf_siglip": from_hf_siglip,
    "hf_siglip2_naflex": functools.partial(from_hf_siglip, fmt="hf_siglip2_naflex"),
}
EXPORTERS = {
    "hf_clip": to_hf_clip,
    "hf_siglip": to_hf_siglip,
    "hf_siglip2_naflex": functools.partial(to_hf_siglip, fmt="hf_siglip2_naflex"),
    "open_clip": to_open_clip,
}
# A Hugging Face model folder's config (a name a clipjax workdir uses too, for its own config).
HF_CONFIG = "config.json"
# The files each export writes: (weights, config, and a NaFlex model's processor settings).
EXPORT_FILES = {
    "hf_clip": ("model.safetensors", HF_CONFIG),
    "hf_siglip": ("model.safetensors", HF_CONFIG),
    "hf_siglip2_naflex": ("model.safetensors", HF_CONFIG, "preprocessor_config.json"),
    "open_clip": ("open_clip_model.safetensors", "open_clip_config.json"),
}
