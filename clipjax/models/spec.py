"""`config.model` declared once, and read into a `DualEncoderSpec` the builders use.

Image towers are plug-ins: a module with `FIELDS` (its `model.image.*` fields), `resolve(values,
image_size, path) -> spec` (its variant table plus cross-field checks) and `Tower` (the
nnx.Module built from the spec, called with `image_size`, `dtype`, `remat`, `attention`, `unroll`, `rngs`
keywords). Adding one is a new file and a line in `IMAGE_TOWERS`. A tower that a captioning decoder
(`model.decoder`) reads also has `encode(x) -> (pooled, tokens [B, N, token_dim])` and `token_dim`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import ml_collections

from clipjax.models import decoder, image_heads, resnet, text, vit
from clipjax.models.layers import ATTENTION_IMPLS, REMAT_POLICIES, remat_name
from clipjax.schema import ConfigError, Field, Section, merge_kinds, read_kind

IMAGE_TOWERS = {
    "vit": vit,
    "resnet": resnet,
}
LN_1_OVER_0_07 = math.log(1 / 0.07)
# CLIP's RGB statistics (the original OpenAI preprocessing), in [0, 1] units.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _attention_backend(value) -> str | None:
    if value == "cudnn" and jax.default_backend() != "gpu":
        return f"'cudnn' needs an NVIDIA GPU (this backend is {jax.default_backend()!r}); use 'dot_product_attention'"
    return None


def _finite(value) -> str | None:
    return None if math.isfinite(value) else "expected a finite number"


def _rgb(positive: bool):
    def check(value) -> str | None:
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if len(value) != 3 or not numbers or not all(math.isfinite(v) for v in value):
            return "expected three finite numbers (R, G, B) in [0, 1] units"
        if positive and min(value) <= 0:
            return "expected positive values"
        return None

    return check


@dataclasses.dataclass(frozen=True)
class _RematField(Field):
    """`model.remat`: a policy name, or the True / False of configs written before the names.

    Its ConfigDict slot is free-typed: a str slot would refuse `c.model.remat = True` in an old
    config file, the stored `true` of an old run's config.json and `--config.model.remat=True`
    (which ml_collections parses as a bool in a free-typed slot). The booleans become names here.
    """

    def config_value(self):
        return ml_collections.FieldReference(self.default, field_type=object)

    def validate(self, path: str, value: Any) -> Any:
        return super().validate(path, remat_name(value))


def image_section() -> Section:
    fields = {"kind": Field("resnet", "the image tower", choices=tuple(IMAGE_TOWERS))}
    fields.update(merge_kinds({kind: module.FIELDS for kind, module in IMAGE_TOWERS.items()}))
    return Section(fields, doc="the image tower; fields of another kind are tolerated")


def model_section() -> Section:
    return Section(
        {
            "embed_dim": Field(64, "the shared embedding dimension", minimum=1),
            "dtype": Field(
                "float32", "compute dtype; parameters stay float32", choices=("float32", "bfloat16")
            ),
            "remat": _RematField(
                "none",
                "what each block keeps for the backward pass: all (`none`), only its input (`full`), "
                "or what a jax.checkpoint_policies name says; True / False mean `full` / `none`",
                choices=REMAT_POLICIES,
            ),
            "attention": Field(
                "xla",
                "attention as einsums, through jax.nn.dot_product_attention, or its cuDNN kernel "
                "(GPU only); same parameters",
                choices=ATTENTION_IMPLS,
                check=_attention_backend,
            ),
            "unroll": Field(
                0,
                "blocks per loop iteration of each layer stack (0: no loop, fastest; 1: a rolled loop, "
                "compile time flat in depth); the parameters are the same",
                minimum=0,
            ),
            "logit_scale_init": Field(
                LN_1_OVER_0_07, "initial log logit scale (CLIP: ln(1/0.07))", check=_finite
            ),
            "logit_scale_max": Field(
                math.log(100.0), "the log scale is clamped to [0, this] after each step", check=_finite
            ),
            "logit_bias_init": Field(
                None, "initial logit bias: unset for softmax, -10.0 for sigmoid", type=float, check=_finite
            ),
            # With the model, not the data: a checkpoint's weights expect the statistics they were
            # trained with, and `clipjax.load` and evaluation read them from the stored config.
            "image_resize": Field(
                "crop",
                "how evaluation and clipjax.load fit an image to image_size: `crop` (shorter side, centre "
                "square, as the evaluation data) or `squash` (the whole image, aspect not kept); a converted "
                "model's reference preprocessing, which clipjax.load reproduces exactly: `open_clip`, "
                "`hf_clip` (centre square), `hf_siglip` (whole image) or `hf_siglip2_naflex` (a NaFlex "
                "model's: aspect kept, at most model.image.max_num_patches patches)",
                # The last four: clipjax.pretrained.preprocessing.RECIPES.
                choices=("crop", "squash", "open_clip", "hf_clip", "hf_siglip", "hf_siglip2_naflex"),
            ),
            "image_projection": Field(
                "linear",
                "from the image tower to the shared space: `linear`, or `none` (SigLIP; needs embed_dim "
                "equal to the tower's width)",
                choices=("linear", "none"),
            ),
            "text_projection_bias": Field(False, "the text projection has a bias (SigLIP's head)"),
            "image_mean": Field(
                CLIP_MEAN,
                "RGB mean subtracted from the [0, 1] pixels inside the model (CLIP's; SigLIP: 0.5s)",
                check=_rgb(positive=False),
            ),
            "image_std": Field(
                CLIP_STD,
                "RGB standard deviation the pixels are divided by after the mean (CLIP's; SigLIP: 0.5s)",
                check=_rgb(positive=True),
            ),
            "image": image_section(),
            "text": Section(dict(text.FIELDS), doc="the text Transformer"),
            "decoder": Section(
                dict(decoder.FIELDS),
                doc="a captioning decoder reading the image tokens (CoCa, LocCa); trained by loss.caption_weight",
            ),
            "image_heads": Section(
                dict(image_heads.FIELDS),
                doc="prototype heads of SigLIP 2's image-side losses (`image_losses`) and the mask token",
            ),
            "projector": Section(
                {
                    "layers": Field(2, "dense layers from the image tower to the loss's space", minimum=1),
                    "hidden": Field(0, "width of the hidden layers (0: the image tower's width)", minimum=0),
                },
                doc="`task = 'image_image'` only: the SimCLR MLP head (ReLU between layers; its output, "
                "of size embed_dim, feeds the loss; evaluation reads the tower before it)",
            ),
        },
        doc="the dual encoder",
    )


@dataclasses.dataclass(frozen=True)
class DualEncoderSpec:
    """Resolved, validated model hyper-parameters (see `model_spec`)."""

    image: Any  # the image tower's spec (vit.ViTSpec, resnet.ResNetSpec, ...)
    image_kind: str
    text: text.TextSpec
    embed_dim: int
    dtype: str
    remat: str  # one of layers.REMAT_POLICIES
    attention: str  # one of layers.ATTENTION_IMPLS
    unroll: int  # blocks per loop iteration of each layer stack; 0: all
    logit_scale_init: float
    logit_bias_init: float | None
    # The image input's standardisation, (pixels / 255 - mean) / std per RGB channel.
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    image_projection: str = "linear"
    text_projection_bias: bool = False
    # `config.task`: 'image_text' (two towers) or 'image_image' (SimCLR: the image tower and an
    # MLP projector of `projector_layers` layers, `projector_hidden` wide; no text tower).
    task: str = "image_text"
    projector_layers: int = 2
    projector_hidden: int = 0
    # The captioning decoder (`model.decoder`), None without one.
    decoder: decoder.DecoderSpec | None = None
    # The heads of SigLIP 2's image-side losses (`model.image_heads`), None without them.
    image_heads: image_heads.ImageHeadsSpec | None = None


TASKS = ("image_text", "image_image")


def model_spec(
    model_config: Any, *, image_size: int, path: str = "model", task: str = "image_text"
) -> DualEncoderSpec:
    """Check `config.model` (a ConfigDict or a dict, missing fields take their defaults) and
    resolve the towers' variants; raises ConfigError naming the key. `task` is `config.task`."""
    if task not in TASKS:
        raise ConfigError(f"task: unknown task {task!r} (expected one of {TASKS})")
    section = model_section()
    values = section.read(model_config, path)
    kind = values["image"]["kind"]
    tower = IMAGE_TOWERS[kind]
    image_values = read_kind(
        section.fields["image"], tower.FIELDS, kind, _get(model_config, "image"), f"{path}.image"
    )
    text_spec = text.resolve(values["text"], f"{path}.text")
    decoder_spec = decoder.resolve(values["decoder"], text_spec, f"{path}.decoder")
    if decoder_spec is not None and task != "image_text":
        raise ConfigError(f"{path}.decoder.variant: a captioning decoder needs captions (task='image_text')")
    if decoder_spec is not None and not hasattr(tower.Tower, "encode"):
        raise ConfigError(
            f"{path}.decoder.variant: the {kind!r} image tower gives no tokens for a decoder to read"
        )
    heads_spec = image_heads.resolve(values["image_heads"])
    naflex = kind == "vit" and image_values.get("naflex")
    if values["image_resize"] == "hf_siglip2_naflex" and not naflex:
        raise ConfigError(
            f"{path}.image_resize: 'hf_siglip2_naflex' fits images to a patch budget, which needs "
            f"{path}.image.naflex=True"
        )
    if naflex and (decoder_spec is not None or heads_spec is not None):
        # Both read every patch token: padded ones would need masks there too.
        raise ConfigError(
            f"{path}.image.naflex: not yet with a captioning decoder or the image-side losses "
            "(they would read the padded patches)"
        )
    if heads_spec is not None and kind != "vit":
        raise ConfigError(
            f"{path}.image_heads.prototypes: the image-side losses read patch tokens, which the {kind!r} "
            "image tower does not give (use model.image.kind='vit')"
        )
    if heads_spec is not None and image_values.get("pool") == "attentional_pooler":
        raise ConfigError(
            f"{path}.image_heads.prototypes: with model.image.pool='attentional_pooler' the tower's "
            "tokens are the pooler's queries, not patches"
        )
    return DualEncoderSpec(
        image=tower.resolve(image_values, image_size, f"{path}.image"),
        image_kind=kind,
        text=text_spec,
        embed_dim=values["embed_dim"],
        dtype=values["dtype"],
        remat=values["remat"],
        attention=values["attention"],
        unroll=values["unroll"],
        logit_scale_init=values["logit_scale_init"],
        logit_bias_init=values["logit_bias_init"],
        image_mean=tuple(float(v) for v in values["image_mean"]),
        image_std=tuple(float(v) for v in values["image_std"]),
        image_projection=values["image_projection"],
        text_projection_bias=values["text_projection_bias"],
        task=task,
        projector_layers=values["projector"]["layers"],
        projector_hidden=values["projector"]["hidden"],
        decoder=decoder_spec,
        image_heads=heads_spec,
    )


def config_model_spec(config: Any) -> DualEncoderSpec:
    """`model_spec` of a whole run config (its model section, image size and task)."""
    return model_spec(config.model, image_size=config.data.image_size, task=config.get("task", "image_text"))


def naflex_seq_lens(config: Any) -> tuple[int, ...]:
    """A NaFlex model's training sequence lengths (`data.naflex_seq_lens`; by default its patch
    budget, `model.image.max_num_patches`); () for any other model."""
    image = config_model_spec(config).image
    if not getattr(image, "naflex", False):
        return ()
    return tuple(int(n) for n in config.data.get("naflex_seq_lens", ()) or (image.max_num_patches,))


def _get(section, key):
    if section is None:
        return None
    try:
        return section[key]
    except (KeyError, AttributeError):
        return None


__all__ = [
    "ConfigError",
    "DualEncoderSpec",
    "IMAGE_TOWERS",
    "TASKS",
    "config_model_spec",
    "image_section",
    "model_section",
    "model_spec",
    "naflex_seq_lens",
]
