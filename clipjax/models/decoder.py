"""A captioning decoder that reads the image tower's tokens: CoCa's multimodal decoder, or a
LocCa / CapPa-style decoder with its own token embedding.

Why a decoder beside the contrastive heads: a captioning loss asks the image tokens to say what
is in the picture word by word, and it never pushes two images of one concept apart (the false
negatives clipjax studies). CoCa (Yu et al., 2022) adds it to CLIP at a small cost: the text tower
becomes a causal "unimodal decoder" whose last real token gives the contrastive embedding, and
a few more blocks (self-attention, cross-attention to the image, MLP) continue from its token
outputs to next-token logits. LocCa (Wan et al., 2024) and CapPa instead give the decoder its own
embedding of the caption and let it read every image token.

`model.decoder.*` chooses between the two (`input`), what the cross-attention reads
(`cross_attention`: all image tokens, or the `pooler_queries` outputs of an attentional pooler
over them, as CoCa), the sizes (a variant table like the towers'), and whether the output layer
is the transpose of the token embedding (`tie_embedding`). open_clip's CoCa, whose weights
`clipjax.pretrained.open_clip_coca` maps, reads the text tower's and the image tower's outputs as
they are (`text_tower_raw`, `tokens_raw`: its pooler lives in the image tower) and gives each
attention its own MLP (`block`). `variant = 'none'` (the default)
builds no decoder at all: a dual encoder's parameters and programs are then those of before.

Teacher forcing reads the caption's own tokens: position i sees tokens 0..i and predicts token
i + 1 (the tokenizers wrap each text as [bos] ... [eos], so generation starts from bos and
stops at eos). The causal mask alone keeps right-padding out of every real position.
Generation runs the same blocks one token at a time over a key/value cache (`init_cache`,
`step`), which gives the logits of the full pass position by position.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from clipjax.models.layers import (
    ACTIVATIONS,
    TOKENS,
    Attention,
    Dense,
    LayerNorm,
    MLP,
    Stack,
    TransformerBlock,
    attention_mask,
    embed_normal,
    empty_kv_cache,
    param,
    spec_from,
    transformer_sizes,
)
from clipjax.parallel.activations import constrain
from clipjax.schema import ConfigError, Field

VARIANTS: dict[str, dict[str, int]] = {
    "tiny": dict(width=64, depth=2, heads=4, mlp_dim=256),
    # CoCa-Base's multimodal decoder (12 blocks of its 24-block text side), and the L size.
    "B": dict(width=512, depth=12, heads=8, mlp_dim=2048),
    "L": dict(width=768, depth=12, heads=12, mlp_dim=3072),
}
SIZES = ("width", "depth", "heads", "mlp_dim")
INPUTS = ("text_tower", "text_tower_raw", "embed")
CROSS_ATTENTION = ("tokens", "pooler", "tokens_raw")
BLOCKS = ("one_mlp", "mlp_per_attention")

# `model.decoder.*`. Unset sizes come from the variant.
FIELDS: dict[str, Field] = {
    "variant": Field(
        "none", "preset sizes of the captioning decoder; `none`: no decoder", choices=("none", *VARIANTS)
    ),
    "width": Field(None, "token width", type=int, minimum=1),
    "depth": Field(None, "number of blocks", type=int, minimum=1),
    "heads": Field(None, "attention heads", type=int, minimum=1),
    "mlp_dim": Field(None, "hidden width of the MLP", type=int, minimum=1),
    "input": Field(
        "text_tower",
        "what the decoder continues from: the causal text tower's final-normed token outputs through a "
        "dense layer (CoCa: the text tower is the unimodal decoder; needs model.text.causal), its last "
        "block's outputs as they are (`text_tower_raw`: open_clip's CoCa; needs width equal to "
        "model.text.width) or its own embedding of the caption (`embed`: LocCa, CapPa)",
        choices=INPUTS,
    ),
    "cross_attention": Field(
        "tokens",
        "what each block's cross-attention reads: every image token through a dense layer and a LayerNorm "
        "(LocCa), the outputs of an attentional pooler over them (`pooler`, CoCa), or the image tower's "
        "tokens as they are (`tokens_raw`: open_clip's CoCa, whose tower pools them, "
        "model.image.pool=attentional_pooler; needs width equal to the tower's token width)",
        choices=CROSS_ATTENTION,
    ),
    "block": Field(
        "one_mlp",
        "a block's layout: self-attention, cross-attention, one MLP; or `mlp_per_attention`: self-attention "
        "and an MLP, then cross-attention (with a LayerNorm of its own on the image side) and another MLP "
        "(open_clip's CoCa)",
        choices=BLOCKS,
    ),
    "output_bias": Field(True, "the next-token output layer has a bias (open_clip's CoCa: none)"),
    "pooler_queries": Field(256, "learned queries of the attentional pooler (CoCa: 256)", minimum=1),
    "tie_embedding": Field(
        False,
        "next-token logits through the transposed token embedding (the decoder's own with input=embed, the "
        "text tower's otherwise) instead of a separate output layer",
    ),
    "tasks": Field(
        "caption",
        "what the decoder is trained to write: captions, or LocCa's three tasks (`locca`: captioning, "
        "referring expression text -> box, grounded captioning box -> text; needs input='embed' and "
        "data with object boxes; clipjax/models/locca.py)",
        choices=("caption", "locca"),
    ),
    "box_bins": Field(
        1000,
        "with tasks='locca': coordinate tokens a box edge is quantised to (S + 1 makes the pixel edges "
        "of S-pixel images exact)",
        minimum=2,
    ),
    "activation": Field("gelu_tanh", "the MLPs' non-linearity", choices=tuple(ACTIVATIONS)),
    "norm_eps": Field(1e-6, "LayerNorm epsilon", minimum=0.0),
}


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    width: int
    depth: int
    heads: int
    mlp_dim: int
    input: str = "text_tower"
    cross_attention: str = "tokens"
    pooler_queries: int = 256
    tie_embedding: bool = False
    tasks: str = "caption"
    box_bins: int = 1000
    activation: str = "gelu_tanh"
    norm_eps: float = 1e-6
    variant: str | None = None
    block: str = "one_mlp"
    output_bias: bool = True

    @property
    def from_text_tower(self) -> bool:
        """Whether the decoder continues from the text tower's states (CoCa) rather than
        embedding the caption itself."""
        return self.input != "embed"


def resolve(values: dict[str, Any], text_spec, path: str = "model.decoder") -> DecoderSpec | None:
    """None for `variant = 'none'`; else the variant's sizes overridden by every size set, checked
    against the text tower it continues from."""
    if values["variant"] == "none":
        return None
    sizes = transformer_sizes(values, VARIANTS, SIZES, path)
    from_text = values["input"] != "embed"
    if from_text and not text_spec.causal:
        raise ConfigError(
            f"{path}.input: {values['input']!r} continues from the text tower's tokens, which must not see "
            "the tokens they predict: set model.text.causal=True (or use input='embed')"
        )
    if values["input"] == "text_tower_raw" and sizes["width"] != text_spec.width:
        raise ConfigError(
            f"{path}.input: 'text_tower_raw' reads the text tower's {text_spec.width}-wide states as they are; "
            f"the decoder is {sizes['width']} wide (set {path}.width={text_spec.width})"
        )
    if from_text and values["tie_embedding"] and sizes["width"] != text_spec.width:
        raise ConfigError(
            f"{path}.tie_embedding: the text tower's embedding is {text_spec.width} wide, the decoder "
            f"{sizes['width']} (set {path}.width={text_spec.width} or tie_embedding=False)"
        )
    if values["tasks"] == "locca" and values["input"] != "embed":
        raise ConfigError(
            f"{path}.tasks: 'locca' writes task and box tokens the text tower does not know: set "
            f"{path}.input='embed'"
        )
    return spec_from(DecoderSpec, sizes, values)


class DecoderBlock(nnx.Module):
    """Pre-LN: x + causal self-attention, x + cross-attention to the image, x + MLP."""

    def __init__(self, width, heads, mlp_dim, *, activation, norm_eps, dtype, attention, rngs):
        norm = dict(epsilon=norm_eps, dtype=dtype, rngs=rngs)
        self.ln1 = LayerNorm(width, **norm)
        self.self_attn = Attention(width, heads, dtype=dtype, impl=attention, rngs=rngs)
        self.ln2 = LayerNorm(width, **norm)
        self.cross_attn = Attention(width, heads, dtype=dtype, impl=attention, rngs=rngs)
        self.ln3 = LayerNorm(width, **norm)
        self.mlp = MLP(width, mlp_dim, activation=activation, dtype=dtype, rngs=rngs)

    def __call__(self, x, image, mask):
        x = constrain(x, TOKENS)
        x = constrain(x + self.self_attn(self.ln1(x), mask=mask), TOKENS)
        x = constrain(x + self.cross_attn(self.ln2(x), image), TOKENS)
        return constrain(x + self.mlp(self.ln3(x)), TOKENS)

    def step(self, x, image, cache, index):
        """One position: x [B, 1, W] at `index`; cache (k, v) [B, max_len, heads, head_dim]."""
        y, cache = self.self_attn.cached(self.ln1(x), cache, index)
        x = x + y
        x = x + self.cross_attn(self.ln2(x), image)
        return x + self.mlp(self.ln3(x)), cache


class CrossAttentionBlock(nnx.Module):
    """Pre-LN: x + cross-attention(ln(x), ln_kv(image)), then x + MLP (open_clip's CoCa)."""

    def __init__(self, width, heads, mlp_dim, *, activation, norm_eps, dtype, attention, rngs):
        norm = dict(epsilon=norm_eps, dtype=dtype, rngs=rngs)
        self.ln1 = LayerNorm(width, **norm)
        self.ln_kv = LayerNorm(width, **norm)
        self.attn = Attention(width, heads, dtype=dtype, impl=attention, rngs=rngs)
        self.ln2 = LayerNorm(width, **norm)
        self.mlp = MLP(width, mlp_dim, activation=activation, dtype=dtype, rngs=rngs)

    def __call__(self, x, image):
        x = constrain(x + self.attn(self.ln1(x), self.ln_kv(image)), TOKENS)
        return constrain(x + self.mlp(self.ln2(x)), TOKENS)


class MLPPerAttentionBlock(nnx.Module):
    """`block = 'mlp_per_attention'`: a causal self-attention block with its MLP, then a
    cross-attention block with its own (open_clip's CoCa: `resblocks[i]`, `cross_attn[i]`)."""

    def __init__(self, width, heads, mlp_dim, *, rngs, **kwargs):
        self.self_block = TransformerBlock(width, heads, mlp_dim, **kwargs, rngs=rngs)
        self.cross_block = CrossAttentionBlock(width, heads, mlp_dim, **kwargs, rngs=rngs)

    def __call__(self, x, image, mask):
        return self.cross_block(self.self_block(x, mask), image)

    def step(self, x, image, cache, index):
        x, cache = self.self_block.step(x, cache, index)
        return self.cross_block(x, image), cache


BLOCK_CLASSES = {"one_mlp": DecoderBlock, "mlp_per_attention": MLPPerAttentionBlock}


class AttentionalPooler(nnx.Module):
    """`queries` learned vectors attend over the image tokens: a fixed-size summary (CoCa)."""

    def __init__(self, width, heads, queries, *, norm_eps, dtype, attention, rngs):
        self.queries = param(rngs, embed_normal, (queries, width), ("pos", "embed"))
        self.attn = Attention(width, heads, dtype=dtype, impl=attention, rngs=rngs)
        self.norm = LayerNorm(width, epsilon=norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, tokens):
        q = jnp.broadcast_to(self.queries[...].astype(tokens.dtype), (tokens.shape[0], *self.queries.shape))
        return self.norm(self.attn(q, tokens))


class CaptionDecoder(nnx.Module):
    """Image tokens + caption tokens -> next-token logits [B, L, vocab] (float32).

    `image_width`: the image tower's token width; `text_width`: the text tower's (input =
    'text_tower'). `memory(image_tokens)` is what the cross-attention reads, computed once per
    image; `__call__` is the teacher-forced pass, `step` one position of generation.
    """

    def __init__(
        self,
        spec: DecoderSpec,
        *,
        vocab_size: int,
        max_len: int,
        image_width: int,
        text_width: int,
        dtype: Any = jnp.float32,
        remat: str | bool = "none",
        attention: str = "xla",
        unroll: int = 1,
        rngs: nnx.Rngs,
    ):
        w = spec.width
        self.spec = spec
        self.max_len = max_len
        self.vocab_size = vocab_size
        self.dtype = jnp.dtype(dtype)
        norm = dict(epsilon=spec.norm_eps, dtype=dtype, rngs=rngs)
        if spec.input == "embed":
            self.embed = param(rngs, embed_normal, (vocab_size, w), ("vocab", "embed"))
            self.pos = param(rngs, embed_normal, (max_len, w), ("pos", "embed"))
            self.text_in = None
        else:
            self.embed = self.pos = None
            self.text_in = (
                Dense(text_width, w, names=("embed", "mlp"), dtype=dtype, rngs=rngs)
                if spec.input == "text_tower"
                else None
            )
        if spec.cross_attention == "tokens_raw":
            if image_width != w:
                raise ValueError(
                    f"model.decoder.cross_attention='tokens_raw' reads the image tower's {image_width}-wide "
                    f"tokens as they are; the decoder is {w} wide"
                )
            self.image_in = self.image_norm = None
        else:
            # The image tokens enter at the decoder's width, normalised (towers end with a LayerNorm
            # before pooling, not necessarily at this width).
            self.image_in = Dense(image_width, w, names=("embed", "mlp"), dtype=dtype, rngs=rngs)
            self.image_norm = LayerNorm(w, **norm)
        self.pooler = (
            AttentionalPooler(
                w,
                spec.heads,
                spec.pooler_queries,
                norm_eps=spec.norm_eps,
                dtype=dtype,
                attention=attention,
                rngs=rngs,
            )
            if spec.cross_attention == "pooler"
            else None
        )
        block = dict(activation=spec.activation, norm_eps=spec.norm_eps, dtype=dtype, attention=attention)
        self.layers = Stack(
            lambda r: BLOCK_CLASSES[spec.block](w, spec.heads, spec.mlp_dim, **block, rngs=r),
            spec.depth,
            remat=remat,
            unroll=unroll,
            rngs=rngs,
        )
        self.norm = LayerNorm(w, **norm)
        self.head = (
            None
            if spec.tie_embedding
            else Dense(
                w,
                vocab_size,
                names=("embed", "vocab"),
                use_bias=spec.output_bias,
                kernel_init=nnx.initializers.zeros_init(),
                rngs=rngs,
            )
        )

    def memory(self, image_tokens: jax.Array) -> jax.Array:
        """Image tower tokens [B, N, image_width] -> what cross-attention reads [B, M, width]."""
        x = image_tokens.astype(self.dtype)
        if self.image_in is None:
            return x
        x = self.image_norm(self.image_in(x))
        return x if self.pooler is None else self.pooler(x)

    def _inputs(self, tokens_or_states: jax.Array, start: int | jax.Array = 0) -> jax.Array:
        """The first block's input at positions start..: embedded token ids (input='embed') or the
        text tower's token outputs (input='text_tower', through a dense layer; 'text_tower_raw')."""
        if self.embed is None:
            x = tokens_or_states.astype(self.dtype)
            return x if self.text_in is None else self.text_in(x)
        length = tokens_or_states.shape[1]
        x = jnp.take(self.embed[...], tokens_or_states, axis=0).astype(self.dtype)
        pos = jax.lax.dynamic_slice_in_dim(self.pos[...], start, length, axis=0)
        return x + pos.astype(self.dtype)

    def output_layer(self, tied_embedding: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        """(weight [width, vocab], bias [vocab] or None), float32: the next-token logits are
        `features @ weight + bias`. `tied_embedding`: the text tower's table (input='text_tower')."""
        if self.head is not None:
            return self.head.kernel[...], None if self.head.bias is None else self.head.bias[...]
        table = self.embed[...] if self.embed is not None else tied_embedding
        return table.astype(jnp.float32).T, None

    def logits(self, features: jax.Array, tied_embedding: jax.Array | None) -> jax.Array:
        weight, bias = self.output_layer(tied_embedding)
        logits = jnp.einsum("bld,dv->blv", features, weight)
        return logits if bias is None else logits + bias

    def features(self, inputs: jax.Array, memory: jax.Array) -> jax.Array:
        """The final-normed states [B, L, width] (float32) the output layer reads: `__call__`
        without the logits, for a loss that computes them a slice of the vocabulary at a time."""
        length = inputs.shape[1]
        if length > self.max_len:
            raise ValueError(f"captions of length {length} exceed the decoder's max_len {self.max_len}")
        x = constrain(self._inputs(inputs), TOKENS)
        x = self.layers(x, memory, attention_mask(None, length, causal=True))
        return self.norm(x).astype(jnp.float32)

    def __call__(self, inputs: jax.Array, memory: jax.Array, tied_embedding=None) -> jax.Array:
        """inputs: token ids [B, L] (input='embed') or text tower states [B, L, text_width];
        memory: `memory(image_tokens)`. Logits [B, L, vocab]: row i predicts token i + 1."""
        return self.logits(self.features(inputs, memory), tied_embedding)

    def init_cache(self, batch: int) -> tuple[jax.Array, jax.Array]:
        """Empty keys and values of every block's self-attention: [depth, B, max_len, heads, head_dim]."""
        spec = self.spec
        return empty_kv_cache(spec.depth, batch, self.max_len, spec.heads, spec.width, self.dtype)

    def step(self, inputs, memory, cache, index, tied_embedding=None):
        """One position `index` of generation: inputs [B, 1] ids (or [B, 1, text_width] states) ->
        (logits [B, vocab], cache with that position's keys and values)."""
        x = self._inputs(inputs, index)
        x, cache = self.layers.scan_step(lambda block, h, c: block.step(h, memory, c, index), x, cache)
        return self.logits(self.norm(x).astype(jnp.float32), tied_embedding)[:, 0], cache
