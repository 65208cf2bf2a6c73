"""A model's encoders at one set of parameters, as evaluators and the Python API use them."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from clipjax.losses.captioning import caption_targets, caption_token_losses
from clipjax.models import generate, locca
from clipjax.models.naflex import Patches
from clipjax.evals.embed import embed_local, gather_rows, local_batch_size, process_share
from clipjax.parallel import batch_axes
from clipjax.parallel.activations import activation_sharding


@functools.lru_cache(maxsize=8)
def jitted_encoders(graphdef, mesh) -> tuple[Callable, Callable]:
    """(encode_image(params, images), encode_text(params, tokens)), compiled once per model
    structure and mesh: periodic evaluation reuses them instead of tracing new ones."""
    rows = NamedSharding(mesh, P(batch_axes(mesh)))

    def encode(method: str):
        def run(params, *x):
            # A NaFlex model's images come as two arrays, its patches and their grids.
            x = x[0] if len(x) == 1 else Patches(*x)
            # Each device embeds its own rows, whatever layout the parameters have.
            with activation_sharding(mesh):
                return getattr(nnx.merge(graphdef, params), method)(x)

        return jax.jit(run, out_shardings=rows)

    return encode("encode_image"), encode("encode_text")


@functools.lru_cache(maxsize=8)
def jitted_captioner(graphdef, mesh, max_len: int, bos_id: int, eos_id: int, beams: int) -> Callable:
    """caption(params, images) -> int32 [B, max_len] token ids, each device captioning its rows:
    greedy for beams = 1, else the best of `beams` (clipjax.models.generate)."""
    rows = NamedSharding(mesh, P(batch_axes(mesh)))

    def run(params, images):
        with activation_sharding(mesh):
            model = nnx.merge(graphdef, params)
            options = dict(max_len=max_len, bos_id=bos_id, eos_id=eos_id)
            if beams <= 1:
                return generate.greedy_captions(model, images, **options)
            return generate.beam_captions(model, images, beams=beams, **options)[0]

    return jax.jit(run, out_shardings=rows)


@functools.lru_cache(maxsize=8)
def jitted_caption_loss(graphdef, mesh, vocab_chunk: int = 0) -> Callable:
    """loss(params, images, tokens) -> float32 [B, 2]: each caption's teacher-forced cross-entropy
    summed over its real target tokens, and their number (a LocCa decoder: its captioning task),
    the logits `vocab_chunk` vocabulary entries at a time as in training."""
    rows = NamedSharding(mesh, P(batch_axes(mesh)))

    def run(params, images, tokens):
        with activation_sharding(mesh):
            model = nnx.merge(graphdef, params)
            layout, sequences = locca.locca_tokens(model.decoder), None
            if layout is not None:
                b = tokens.shape[0]
                no_box, caption = jnp.zeros((b, 4), jnp.float32), jnp.zeros((b,), jnp.int32)
                sequences = locca.task_sequences(tokens, no_box, caption, layout)
            _, _, losses = caption_token_losses(
                model, images, tokens, vocab_chunk=vocab_chunk, sequences=sequences
            )
        count = caption_targets(tokens)[1] if sequences is None else sequences[1]
        return jnp.stack([losses.sum(axis=1), count.sum(axis=1)], axis=1)

    return jax.jit(run, out_shardings=rows)


@functools.lru_cache(maxsize=8)
def jitted_patch_tokens(graphdef, mesh) -> Callable:
    """patches(params, images) -> float32 [B, patches, width]: a ViT's final-normed patch tokens
    (without a class token)."""
    rows = NamedSharding(mesh, P(batch_axes(mesh)))

    def run(params, images):
        with activation_sharding(mesh):
            model = nnx.merge(graphdef, params)
            tokens = model.image_tower.encode(model._standardize(images))[1]
            return tokens[:, tokens.shape[1] - model.image_tower.num_patches :].astype(jnp.float32)

    return jax.jit(run, out_shardings=rows)


@functools.lru_cache(maxsize=8)
def jitted_referring_boxes(graphdef, mesh) -> Callable:
    """boxes(params, images, tokens) -> float32 [B, 4]: the box a LocCa decoder writes for the
    object each caption describes (`generate.referring_boxes`)."""
    rows = NamedSharding(mesh, P(batch_axes(mesh)))

    def run(params, images, tokens):
        with activation_sharding(mesh):
            return generate.referring_boxes(nnx.merge(graphdef, params), images, tokens)

    return jax.jit(run, out_shardings=rows)


class Encoders:
    """numpy in, numpy out: unit-norm embeddings computed sharded over `mesh`.

    `memo(key, fn)` keeps a value for the life of this object, so evaluators that need the
    same embeddings (the held-out images, say) compute them once per evaluation.
    """

    def __init__(self, graphdef, params: Any, mesh, tokenizer, *, batch_size: int = 256):
        self.graphdef, self.params, self.mesh, self.tokenizer = graphdef, params, mesh, tokenizer
        self.batch_size = int(batch_size)
        self._encode_image, self._encode_text = jitted_encoders(graphdef, mesh)
        self._memo: dict = {}

    def local_batch_size(self, batch_size: int = 0) -> int:
        """Rows each process gives one encoder call of `batch_size` rows (0: the encoders' own)."""
        return local_batch_size(self.mesh, batch_size or self.batch_size)

    def local_image(self, images: np.ndarray, length: int, batch_size: int = 0) -> np.ndarray:
        """This process's images (at most `length`, which every process passes alike) -> [n, d],
        in calls of `batch_size` images of all processes (0: the encoders' own)."""
        return self._local(self._encode_image, images, length, batch_size)

    def local_tokens(self, tokens: np.ndarray, length: int) -> np.ndarray:
        """This process's token ids (at most `length`, which every process passes alike) -> [n, d]."""
        return self._local(self._encode_text, tokens, length)

    def _local(self, encode, inputs, length: int, batch_size: int = 0) -> np.ndarray:
        """`encode(params, *arrays)` of this process's rows: `inputs` is an array, or a tuple of
        arrays with rows alike (images and their captions)."""
        inputs = tuple(map(np.asarray, inputs)) if isinstance(inputs, tuple) else np.asarray(inputs)
        return embed_local(
            lambda *xs: encode(self.params, *xs),
            inputs,
            length=length,
            mesh=self.mesh,
            batch_size=batch_size or self.batch_size,
        )

    def image(self, images: np.ndarray | tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """uint8 [N, H, W, 3] (or float in [0, 1]) at the model's resolution -> [N, d]; a NaFlex
        model: (patches [N, M, p * p * 3], grid [N, 2])."""
        return self._everyone(self.local_image, images)

    def tokens(self, tokens: np.ndarray) -> np.ndarray:
        """int32 token ids [N, L] -> [N, d]."""
        return self._everyone(self.local_tokens, tokens)

    @staticmethod
    def _everyone(local, inputs) -> np.ndarray:
        """Every process passes the same inputs (an array, or a tuple of arrays with rows alike),
        encodes its share and gets every embedding back."""
        if isinstance(inputs, tuple):
            share = process_share(len(inputs[0]))
            return gather_rows(local(tuple(np.asarray(x)[share.rows] for x in inputs), share.length))
        inputs = np.asarray(inputs)
        share = process_share(len(inputs))
        return gather_rows(local(inputs[share.rows], share.length))

    def text(self, strings: Sequence[str]) -> np.ndarray:
        return self.tokens(self.tokenizer.encode(list(strings)))

    def local_caption_tokens(
        self, images: np.ndarray, length: int, *, max_len: int = 0, beams: int = 1, batch_size: int = 0
    ) -> np.ndarray:
        """This process's images (at most `length`, alike in every process) -> generated token ids
        [n, max_len] (0: the tokenizer's context), from bos to eos and pads after."""
        max_len = int(max_len or self.tokenizer.max_len)
        bos, eos = getattr(self.tokenizer, "bos_id", None), getattr(self.tokenizer, "eos_id", None)
        if bos is None or eos is None:
            raise ValueError("captioning needs a tokenizer with bos and eos ids (this one has none)")
        caption = jitted_captioner(self.graphdef, self.mesh, max_len, int(bos), int(eos), int(beams))
        return self._local(caption, images, length, batch_size)

    @property
    def has_decoder(self) -> bool:
        return "decoder" in self.params

    def local_caption_loss(
        self, images: np.ndarray, tokens: np.ndarray, length: int, vocab_chunk: int = 0
    ) -> np.ndarray:
        """This process's (images, caption token ids) -> [n, 2]: each caption's cross-entropy sum
        over its real targets, and their count (teacher forcing)."""
        loss = jitted_caption_loss(self.graphdef, self.mesh, int(vocab_chunk))
        return self._local(loss, (images, tokens), length)

    def local_patch_tokens(self, images: np.ndarray, length: int) -> np.ndarray:
        """This process's images -> a ViT's patch tokens [n, patches, width]."""
        return self._local(jitted_patch_tokens(self.graphdef, self.mesh), images, length)

    def local_referring_boxes(self, images: np.ndarray, tokens: np.ndarray, length: int) -> np.ndarray:
        """This process's (images, caption token ids) -> [n, 4]: the box a LocCa decoder writes for
        the object each caption describes."""
        return self._local(jitted_referring_boxes(self.graphdef, self.mesh), (images, tokens), length)

    def caption_tokens(self, images: np.ndarray, *, max_len: int = 0, beams: int = 1) -> np.ndarray:
        """uint8 [N, H, W, 3] at the model's resolution -> token ids [N, max_len], every process alike."""
        return self._everyone(
            lambda x, n: self.local_caption_tokens(x, n, max_len=max_len, beams=beams), images
        )

    def referring_boxes(self, images: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Images and caption token ids -> float32 [N, 4] boxes (a LocCa decoder), every process alike."""
        images, tokens = np.asarray(images), np.asarray(tokens)
        share = process_share(len(images))
        return gather_rows(self.local_referring_boxes(images[share.rows], tokens[share.rows], share.length))

    @property
    def logit_scale(self):
        return self.params["logit_scale"]

    @property
    def logit_bias(self):
        return self.params.get("logit_bias")

    def memo(self, key, compute: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]
