"""Load a trained dual encoder from a workdir, for notebooks, evaluation and downstream use.

    import clipjax
    model = clipjax.load("runs/demo")               # latest checkpoint
    img = model.encode_image(images_uint8)          # [N, d], unit norm
    txt = model.encode_text(["a red circle"])       # [M, d], unit norm
    probs = model.similarity(img, txt)               # cosine similarities x learned scale
    report = clipjax.api.evaluate_workdir("runs/demo", out="runs/demo/eval")

A face over the run store (`clipjax.run_store`), which reads the run and its checkpoints, and over
evaluation; nothing here imports the trainer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from PIL import Image

from clipjax.config import apply_overrides
from clipjax.data.images import fit_crop, square_rgb
from clipjax.data.sources import make_source
from clipjax.evals.encoders import Encoders
from clipjax.evals.workdir import evaluate_workdir  # noqa: F401 - part of the face
from clipjax.models.spec import config_model_spec
from clipjax.parallel import eval_mesh
from clipjax.pretrained import preprocessing
from clipjax.run_store.record import RestoreError, load_run_config  # noqa: F401 - part of the face
from clipjax.run_store.record import read_run, restore_params, run_tokenizer


def _texts(strings) -> list[str]:
    if isinstance(strings, (str, bytes)):
        return [strings]
    texts = list(strings)
    bad = [t for t in texts if not isinstance(t, (str, bytes))]
    if bad:
        raise TypeError(f"encode_text: expected strings, got {type(bad[0]).__name__} {bad[0]!r}")
    return texts


def prepare_images(images, image_size: int, resize: str = "crop") -> np.ndarray:
    """uint8 [N, S, S, 3] from the inputs `TrainedModel.encode_image` accepts (one-line errors)."""
    x = _uint8_images(images, image_size)
    if x.shape[1:3] == (image_size, image_size):
        return x
    fitted = [fit_image(im, image_size, resize) for im in x]
    return np.stack(fitted) if fitted else np.zeros((0, image_size, image_size, 3), np.uint8)


def prepare_patches(images, patch_size: int, max_num_patches: int) -> tuple[np.ndarray, np.ndarray]:
    """A NaFlex model's inputs (uint8 patches [N, max_num_patches, p * p * 3], int32 grid [N, 2]) from
    what `TrainedModel.encode_image` accepts, or a list of images of different sizes: each fitted
    as transformers' Siglip2ImageProcessor does (clipjax.data.naflex.naflex_patches)."""
    ragged = isinstance(images, (list, tuple)) and len({np.shape(im) for im in images}) > 1
    batches = [_uint8_images(im, 1) for im in images] if ragged else [_uint8_images(images, 1)]
    fitted = [preprocessing.naflex_patches(im, patch_size, max_num_patches) for b in batches for im in b]
    patches = np.zeros((len(fitted), max_num_patches, patch_size * patch_size * 3), np.uint8)
    for i, (image_patches, _) in enumerate(fitted):
        patches[i] = image_patches
    return patches, np.array([grid for _, grid in fitted], np.int32).reshape(-1, 2)


def _uint8_images(images, image_size: int) -> np.ndarray:
    """uint8 [N, H, W, 3] of the inputs `encode_image` accepts, checked (none: [0, S, S, 3])."""
    x = np.asarray(images)
    if x.dtype == bool or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise TypeError(
            f"encode_image: images must be uint8 in [0, 255] or float in [0, 1], got dtype {x.dtype}"
        )
    if x.ndim == 1 and x.size == 0:  # an empty list: no images
        x = np.zeros((0, image_size, image_size, 3), np.uint8)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    # A 3-dim array ending in 3 is one RGB image; a grayscale batch of width 3 needs [N, H, 3, 1].
    if x.ndim == 2 or (x.ndim == 3 and x.shape[-1] == 3):
        x = x[None]
    if x.ndim == 3:  # [N, H, W] grayscale
        x = np.repeat(x[..., None], 3, axis=-1)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(
            f"encode_image: expected [N, H, W, 3], [N, H, W, 1], [N, H, W] or one image, got shape {x.shape}"
        )
    if np.issubdtype(x.dtype, np.floating):
        if not np.all(np.isfinite(x)):
            raise ValueError("encode_image: images contain NaN or infinite values")
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise ValueError(
                f"encode_image: float images must lie in [0, 1], got values in [{x.min():g}, {x.max():g}] "
                "(pass uint8 for 0-255 pixels)"
            )
        x = np.round(x * 255.0)
    elif x.size and (x.min() < 0 or x.max() > 255):
        raise ValueError(f"encode_image: integer images must lie in [0, 255], got [{x.min()}, {x.max()}]")
    return x.astype(np.uint8)


def fit_image(image: np.ndarray, image_size: int, resize: str = "crop") -> np.ndarray:
    """uint8 [H, W, 3] -> [S, S, 3] as the model's `image_resize` says: a reference's own
    preprocessing for converted models (clipjax.pretrained.preprocessing), else clipjax's, the
    evaluation pipeline's (the centre square, or the whole image for `squash`)."""
    im = Image.fromarray(image)
    if resize in preprocessing.RECIPES:
        return preprocessing.fit(im, image_size, resize)
    crop = fit_crop(resize)
    return square_rgb(im, image_size, box=crop(*im.size) if crop else None)


@dataclasses.dataclass
class TrainedModel:
    """A restored dual encoder. Inputs are numpy; outputs are numpy [N, d] unit-norm embeddings."""

    config: Any
    step: int
    tokenizer: Any
    mesh: jax.sharding.Mesh
    graphdef: Any
    params: Any
    batch_size: int = 256

    def __post_init__(self):
        self.encoders = Encoders(
            self.graphdef, self.params, self.mesh, self.tokenizer, batch_size=self.batch_size
        )

    def tokenize(self, strings: str | Sequence[str]) -> np.ndarray:
        return self.tokenizer.encode(_texts(strings))

    def encode_image(self, images) -> np.ndarray:
        """Images -> [N, d] unit-norm embeddings.

        Accepted: uint8 (or other integers) in [0, 255], or float in [0, 1]; [N, H, W, 3] RGB,
        [N, H, W, 1] or [N, H, W] grayscale, or one [H, W, 3] / [H, W] image; none ([] or
        [0, H, W, 3]: [0, d]). Any size, fitted as `model.image_resize` says: a converted model
        as its reference preprocesses (open_clip's or transformers' processor, pixel for pixel);
        a clipjax-trained one as the evaluation pipeline decodes images (shorter side to the
        training resolution, centre crop). A NaFlex model (`model.image.naflex`) fits each image
        to its patch budget at its own aspect ratio, as transformers' Siglip2ImageProcessor does,
        and also takes a list of images of different sizes. NaN, infinite, bool, or float values
        outside [0, 1] are rejected with one line.
        """
        image = config_model_spec(self.config).image
        if getattr(image, "naflex", False):
            return self.encoders.image(prepare_patches(images, image.patch_size, image.max_num_patches))
        return self.encoders.image(
            prepare_images(
                images, int(self.config.data.image_size), self.config.model.get("image_resize", "crop")
            )
        )

    def encode_text(self, strings: str | Sequence[str]) -> np.ndarray:
        """A string or a list of strings -> [N, d] unit-norm embeddings ([0, d] for none)."""
        texts = _texts(strings)
        if not texts:
            return np.zeros((0, int(self.config.model.embed_dim)), np.float32)
        return self.encoders.text(texts)

    def caption(self, images, *, max_len: int = 0, method: str = "greedy", beams: int = 4) -> list[str]:
        """Images (as `encode_image` takes them) -> one generated caption each, by a model with a
        captioning decoder (`model.decoder`): `greedy`, or the most likely of `beams` kept by
        `beam` search; at most `max_len` tokens with bos and eos (0: the model's context)."""
        if not self.encoders.has_decoder:
            raise ValueError(
                "caption: this model has no captioning decoder (model.decoder.variant is 'none')"
            )
        if method not in ("greedy", "beam"):
            raise ValueError(f"caption: method must be 'greedy' or 'beam', got {method!r}")
        if max_len and not 2 <= max_len <= int(self.config.data.tokenizer.max_len):
            raise ValueError(
                f"caption: max_len {max_len} is outside 2..{self.config.data.tokenizer.max_len} (the model's context)"
            )
        pixels = prepare_images(
            images, int(self.config.data.image_size), self.config.model.get("image_resize", "crop")
        )
        if not len(pixels):
            return []
        tokens = self.encoders.caption_tokens(pixels, max_len=max_len, beams=beams if method == "beam" else 1)
        return [self.tokenizer.decode(row) for row in tokens]

    def locate(self, images, texts: Sequence[str]) -> np.ndarray:
        """Images and a caption of an object in each -> float32 [N, 4], the box (x_min, y_min,
        x_max, y_max, fractions of the image) where a decoder trained on LocCa's tasks
        (`model.decoder.tasks='locca'`) finds that object."""
        if self.config.model.decoder.get("tasks") != "locca":
            raise ValueError(
                "locate: this model's decoder was not trained on LocCa's tasks (model.decoder.tasks)"
            )
        pixels = prepare_images(
            images, int(self.config.data.image_size), self.config.model.get("image_resize", "crop")
        )
        if len(pixels) != len(texts):
            raise ValueError(f"locate: {len(pixels)} images but {len(texts)} texts (one each)")
        if not len(pixels):
            return np.zeros((0, 4), np.float32)
        return self.encoders.referring_boxes(pixels, self.tokenizer.encode(list(texts)))

    @property
    def logit_scale(self) -> float:
        return float(np.exp(np.asarray(self.params["logit_scale"])))

    def similarity(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        """Logits as the model was trained with: learned scale x cosine similarity (+ bias)."""
        logits = self.logit_scale * image_emb @ text_emb.T
        if "logit_bias" in self.params:
            logits = logits + float(np.asarray(self.params["logit_bias"]))
        return logits


def load(
    workdir: str, step: int | None = None, *, devices=None, config_overrides: dict | None = None
) -> TrainedModel:
    """Restore the parameters of a training run (latest checkpoint, or `step`) onto `devices`."""
    config, meta = read_run(workdir)
    config = apply_overrides(config, config_overrides or {})
    mesh = eval_mesh(devices)
    tokenizer = run_tokenizer(meta, make_source(config.data))  # the source is read only without meta
    graphdef, params, step = restore_params(workdir, config, tokenizer, mesh, step)
    return TrainedModel(
        config=config, step=step, tokenizer=tokenizer, mesh=mesh, graphdef=graphdef, params=params
    )
