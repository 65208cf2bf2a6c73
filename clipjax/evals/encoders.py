"""A model's encoders at one set of parameters, as evaluators and the Python API use them."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from clipjax.evals.embed import embed_local, gather_rows, local_batch_size, process_share
from clipjax.parallel import batch_axes
from clipjax.parallel.activations import activation_sharding


@functools.lru_cache(maxsize=8)
def jitted_encoders(graphdef, mesh) -> tuple[Callable, Callable]:
    """(encode_image(params, images), encode_text(params, tokens)), compiled once per model
    structure and mesh: periodic evaluation reuses them instead of tracing new ones."""
    rows = NamedSharding(mesh, P(batch_axes(mesh)))

    def encode(method: str):
        def run(params, x):
            # Each device embeds its own rows, whatever layout the parameters have.
            with activation_sharding(mesh):
                return getattr(nnx.merge(graphdef, params), method)(x)

        return jax.jit(run, out_shardings=rows)

    return encode("encode_image"), encode("encode_text")


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
        return embed_local(
            lambda x: encode(self.params, x),
            np.asarray(inputs),
            length=length,
            mesh=self.mesh,
            batch_size=batch_size or self.batch_size,
        )

    def image(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] (or float in [0, 1]) at the model's resolution -> [N, d]."""
        return self._everyone(self.local_image, images)

    def tokens(self, tokens: np.ndarray) -> np.ndarray:
        """int32 token ids [N, L] -> [N, d]."""
        return self._everyone(self.local_tokens, tokens)

    @staticmethod
    def _everyone(local, inputs) -> np.ndarray:
        """Every process passes the same inputs, encodes its share and gets every embedding back."""
        inputs = np.asarray(inputs)
        share = process_share(len(inputs))
        return gather_rows(local(inputs[share.rows], share.length))

    def text(self, strings: Sequence[str]) -> np.ndarray:
        return self.tokens(self.tokenizer.encode(list(strings)))

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
