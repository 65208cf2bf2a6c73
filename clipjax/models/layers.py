"""Building blocks shared by the towers.

All parameters are float32 ``nnx.Param`` carrying logical axis names; the
``dtype`` of a layer is only the compute dtype (inputs and weights are cast at
use). Layers keep no RNG or statistics state, so ``nnx.split(model)`` yields
parameters only and a pure jitted step can carry them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from clipjax.parallel.activations import constrain
from clipjax.schema import ConfigError

Initializer = Callable[..., jax.Array]
Array = jax.Array

# Logical layouts of the activations (clipjax/parallel/activations.py): a token sequence, its
# attention heads, and one vector per example.
TOKENS = ("batch", "length", "act_embed")
HEADS = ("batch", "length", "act_heads", None)
POOLED = ("batch", "act_embed")

LAYERS = "layers"
CONV_KERNEL_NAMES = ("conv_h", "conv_w", "conv_in", "conv_out")
# Every logical axis name a parameter may carry; `config.sharding_rules` maps each to a mesh axis.
LOGICAL_AXES = (
    LAYERS,
    "embed",
    "mlp",
    "heads",
    "head_dim",
    "vocab",
    "patch",
    *CONV_KERNEL_NAMES,
    "proj",
    "pos",
)

zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()
lecun_normal = nnx.initializers.lecun_normal()
he_normal = nnx.initializers.he_normal()
# Embedding tables and learned position / class tokens: small fixed scale, as in
# CLIP and ViT, rather than fan-in scaling (fan-in of a table is meaningless).
embed_normal = nnx.initializers.truncated_normal(stddev=0.02)

# How `Attention` computes softmax(q k^T / sqrt(d)) v (`model.attention`): "xla" spells it out as
# einsums; "dot_product_attention" hands it to `jax.nn.dot_product_attention` and lets JAX pick
# the kernel (up to jax 0.10 that is its XLA path on every backend); "cudnn" asks that function
# for cuDNN's fused flash attention by name (NVIDIA GPUs only, bf16/fp16 compute).
ATTENTION_IMPLS = ("xla", "dot_product_attention", "cudnn")
# What a `Stack` keeps for the backward pass (`model.remat`): "none" keeps every activation;
# "full" only each block's input, recomputing the rest; the other names are
# `jax.checkpoint_policies` that also keep some intermediates (e.g. matmul outputs) to trade
# memory for less recomputation. Only policies usable as they are: the others are factories.
REMAT_POLICIES = (
    "none",
    "full",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "nothing_saveable",
    "everything_saveable",
)


# The MLP's non-linearity (`model.image.activation`, `model.text.activation`): GELU by its tanh
# approximation (the default, as big_vision and SigLIP compute it), exact GELU (open_clip's
# nn.GELU), or OpenAI CLIP's QuickGELU, x * sigmoid(1.702 x).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def remat_name(value: Any) -> Any:
    """The policy name of a `remat` setting: configs before the named policies said True/False."""
    if isinstance(value, bool):
        return "full" if value else "none"
    return value


def transformer_sizes(values: dict[str, Any], variants: dict, sizes: Sequence[str], path: str) -> dict:
    """A variant's sizes (`values['variant']` in `variants`) overridden by each of `sizes` that
    `values` sets; a ConfigError naming the key unless the width splits evenly into heads."""
    out = {**variants[values["variant"]], **{k: values[k] for k in sizes if values[k] is not None}}
    if out["width"] % out["heads"]:
        raise ConfigError(f"{path}.width: {out['width']} is not divisible by {path}.heads={out['heads']}")
    return out


def spec_from(cls: type, sizes: dict, values: dict[str, Any]):
    """The spec dataclass `cls` of resolved `sizes`, every other field read from `values`."""
    rest = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name not in sizes}
    return cls(**sizes, **rest)


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], names: Sequence[str]) -> nnx.Param:
    """A float32 Param annotated with one logical axis name per dimension.

    Flax shards annotated Variables eagerly at creation by default, which needs a
    mesh; the towers must also build on a single device with no mesh (tests,
    notebooks, ``nnx.eval_shape``), so eager sharding is only kept when a mesh is
    actually active. Under a mesh, use ``nnx.logical_axis_rules`` to map the
    logical names, or switch eager sharding off with ``nnx.use_eager_sharding``.
    """
    shape = tuple(int(s) for s in shape)
    names = tuple(names)
    if len(names) != len(shape):
        raise ValueError(f"{len(names)} axis names {names} for shape {shape}")
    eager = nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty
    value = nnx.with_partitioning(init, names)(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, eager_sharding=eager)


class Dense(nnx.Module):
    """``x @ kernel + bias`` over the last axis of ``x``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        names: tuple[str, str] = ("embed", "mlp"),
        use_bias: bool = True,
        kernel_init: Initializer = lecun_normal,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.kernel = param(rngs, kernel_init, (in_features, out_features), names)
        self.bias = param(rngs, zeros, (out_features,), names[1:]) if use_bias else None
        self.dtype = jnp.dtype(dtype)

    def __call__(self, x: Array) -> Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis; statistics in float32 even under bf16."""

    def __init__(
        self,
        features: int,
        *,
        names: tuple[str] = ("embed",),
        epsilon: float = 1e-6,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.scale = param(rngs, ones, (features,), names)
        self.bias = param(rngs, zeros, (features,), names)
        self.epsilon = epsilon
        self.dtype = jnp.dtype(dtype)

    def __call__(self, x: Array) -> Array:
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * self.scale[...] + self.bias[...]
        return y.astype(self.dtype)


class GroupNorm(nnx.Module):
    """GroupNorm for NHWC maps: per example, over space and channel groups.

    Used instead of BatchNorm so the model holds no running statistics and the
    forward pass does not depend on the batch composition.
    """

    def __init__(
        self,
        features: int,
        groups: int,
        *,
        names: tuple[str] = ("conv_out",),
        epsilon: float = 1e-6,
        scale_init: Initializer = ones,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if features % groups:
            raise ValueError(f"{features} channels not divisible into {groups} groups")
        self.scale = param(rngs, scale_init, (features,), names)
        self.bias = param(rngs, zeros, (features,), names)
        self.groups = groups
        self.epsilon = epsilon
        self.dtype = jnp.dtype(dtype)

    def __call__(self, x: Array) -> Array:
        b, c = x.shape[0], x.shape[-1]
        gs = c // self.groups
        x = x.astype(jnp.float32)
        # Per-channel moments first (reductions with channels minor vectorise
        # well), then combine channels into groups: ~6x faster than reducing a
        # [..., groups, channels_per_group] view on CPU. One-pass variance as in
        # flax's use_fast_variance, clamped at 0 against cancellation.
        spatial = tuple(range(1, x.ndim - 1))
        m1 = jnp.mean(x, axis=spatial).reshape(b, self.groups, gs).mean(-1)
        m2 = jnp.mean(jnp.square(x), axis=spatial).reshape(b, self.groups, gs)
        var = jnp.maximum(m2.mean(-1) - jnp.square(m1), 0.0)
        inv = jax.lax.rsqrt(var + self.epsilon)
        scale = jnp.repeat(inv, gs, axis=1) * self.scale[...]  # [B, C]
        shift = self.bias[...] - jnp.repeat(m1, gs, axis=1) * scale
        bshape = (b,) + (1,) * len(spatial) + (c,)
        y = x * scale.reshape(bshape) + shift.reshape(bshape)
        return y.astype(self.dtype)


def _same_pads(size: int, k: int, stride: int) -> tuple[int, int]:
    """TensorFlow/Flax 'SAME' padding (extra pixel, if any, at the end)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def conv_as_matmul(x: Array, kernel: Array, stride: int, padding: str) -> Array:
    """The NHWC / HWIO convolution as strided slices + one matmul.

    Equal to ``lax.conv_general_dilated`` up to float rounding. On XLA:CPU the
    native convolution's gradients are several times slower than its forward
    pass (the kernel gradient of strided and few-channel convs especially);
    slices and a dot have cheap, well-optimised transposes instead.
    """
    kh, kw, cin, cout = kernel.shape
    b, h, w, _ = x.shape
    if padding == "VALID" and stride == kh == kw and h % kh == 0 and w % kw == 0:
        # Non-overlapping patches (ViT patch embedding): a reshape, not kh*kw
        # slices.
        ho, wo = h // kh, w // kw
        patches = x.reshape(b, ho, kh, wo, kw, cin).transpose(0, 1, 3, 2, 4, 5)
        y = jnp.dot(patches.reshape(b * ho * wo, kh * kw * cin), kernel.reshape(kh * kw * cin, cout))
        return y.reshape(b, ho, wo, cout)
    if padding == "SAME":
        ph, pw = _same_pads(h, kh, stride), _same_pads(w, kw, stride)
    elif padding == "VALID":
        ph = pw = (0, 0)
    else:
        raise ValueError(f"padding {padding!r} (expected SAME or VALID)")
    x = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
    ho = (h + sum(ph) - kh) // stride + 1
    wo = (w + sum(pw) - kw) // stride + 1
    cols = [
        x[:, i : i + (ho - 1) * stride + 1 : stride, j : j + (wo - 1) * stride + 1 : stride, :]
        for i in range(kh)
        for j in range(kw)
    ]
    patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
    # (i, j, c) patch order matches the HWIO kernel flattened row-major. A 2-D
    # dot (rows = output pixels) is faster on CPU than a 4-D contraction.
    patches = patches.reshape(b * ho * wo, kh * kw * cin)
    y = jnp.dot(patches, kernel.reshape(kh * kw * cin, cout))
    return y.reshape(b, ho, wo, cout)


class Conv(nnx.Module):
    """2-D convolution on NHWC inputs with an HWIO kernel.

    ``impl``: 'xla' (lax.conv_general_dilated), 'matmul' (``conv_as_matmul``)
    or 'auto' (matmul when tracing for a CPU backend, where it trains ~2x
    faster; xla elsewhere). The parameters are the same in every case.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: str = "SAME",
        use_bias: bool = True,
        names: tuple[str, ...] = CONV_KERNEL_NAMES,
        kernel_init: Initializer = he_normal,
        dtype: Any = jnp.float32,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        if impl not in ("auto", "xla", "matmul"):
            raise ValueError(f"conv impl {impl!r} (expected 'auto', 'xla', 'matmul')")
        shape = (kernel_size, kernel_size, in_features, out_features)
        self.kernel = param(rngs, kernel_init, shape, names)
        self.bias = param(rngs, zeros, (out_features,), names[-1:]) if use_bias else None
        self.stride = stride
        self.padding = padding
        self.impl = impl
        self.dtype = jnp.dtype(dtype)

    def __call__(self, x: Array) -> Array:
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        impl = self.impl
        if impl == "auto":
            impl = "matmul" if jax.default_backend() == "cpu" else "xla"
        if impl == "matmul":
            y = conv_as_matmul(x, kernel, self.stride, self.padding)
        else:
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(self.stride, self.stride),
                padding=self.padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def attention_mask(valid: Array | None, length: int, causal: bool = False) -> Array | None:
    """Boolean mask [B or 1, 1, L, L] (True = may attend) for self-attention.

    ``valid`` [B, L] marks real (non-pad) tokens; only keys are masked, because
    outputs at pad positions are never read by the poolers.
    """
    mask = None
    if valid is not None:
        mask = valid[:, None, None, :]
    if causal:
        tri = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
        mask = tri if mask is None else jnp.logical_and(mask, tri)
    return mask


class Attention(nnx.Module):
    """Multi-head dot-product attention (self- or cross-) with a boolean mask.

    ``impl`` (one of ``ATTENTION_IMPLS``) changes how the attention is computed, not its
    parameters, so a model may be built with one and run with the other.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        *,
        kv_width: int | None = None,
        dtype: Any = jnp.float32,
        impl: str = "xla",
        rngs: nnx.Rngs,
    ):
        if width % heads:
            raise ValueError(f"width {width} not divisible by heads {heads}")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl {impl!r} (expected one of {ATTENTION_IMPLS})")
        head_dim = width // heads
        qkv_init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
        out_init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
        in_names = ("embed", "heads", "head_dim")
        self.query = param(rngs, qkv_init, (width, heads, head_dim), in_names)
        # `kv_width`: the keys' and values' input width, where cross-attention reads another width.
        kv_width = width if kv_width is None else kv_width
        self.key = param(rngs, qkv_init, (kv_width, heads, head_dim), in_names)
        self.value = param(rngs, qkv_init, (kv_width, heads, head_dim), in_names)
        # No key bias: it adds the same q.b_k to every logit of a query row, which the softmax
        # cancels, so it would be a parameter with an exactly zero gradient.
        self.query_bias = param(rngs, zeros, (heads, head_dim), in_names[1:])
        self.value_bias = param(rngs, zeros, (heads, head_dim), in_names[1:])
        self.out = param(rngs, out_init, (heads, head_dim, width), ("heads", "head_dim", "embed"))
        self.out_bias = param(rngs, zeros, (width,), ("embed",))
        self.head_dim = head_dim
        self.dtype = jnp.dtype(dtype)
        self.impl = impl

    def _project(self, x: Array, kernel: nnx.Param, bias: nnx.Param | None = None) -> Array:
        dt = self.dtype
        y = jnp.einsum("bld,dhk->blhk", x.astype(dt), kernel[...].astype(dt))
        return constrain(y if bias is None else y + bias[...].astype(dt), HEADS)

    def __call__(self, x_q: Array, x_kv: Array | None = None, mask: Array | None = None) -> Array:
        """x_q [B, Lq, D], x_kv [B, Lk, D] (defaults to x_q), mask -> [B,Lq,D]."""
        if x_kv is None:
            x_kv = x_q
        q = self._project(x_q, self.query, self.query_bias)
        k = self._project(x_kv, self.key)
        v = self._project(x_kv, self.value, self.value_bias)
        if self.impl in ("dot_product_attention", "cudnn"):
            # The projections are already in its [B, T, heads, head_dim] layout. Like the einsum
            # path it takes the softmax in float32 and floors masked logits at a finite value, so
            # fully masked rows stay finite. implementation=None leaves the kernel to JAX (up to
            # jax 0.10 that is still its XLA path on every backend; cuDNN must be named).
            ctx = jax.nn.dot_product_attention(
                q,
                k,
                v,
                mask=None if mask is None else jnp.asarray(mask, bool),
                implementation="cudnn" if self.impl == "cudnn" else None,
            )
        else:
            ctx = self._einsum_attention(q, k, v, mask)
        return self._out(ctx)

    def _out(self, ctx: Array) -> Array:
        dt = self.dtype
        ctx = constrain(ctx, HEADS)
        y = jnp.einsum("bqhk,hkd->bqd", ctx, self.out[...].astype(dt)) + self.out_bias[...].astype(dt)
        return constrain(y, TOKENS)

    def cached(self, x: Array, cache: tuple[Array, Array], index: Array) -> tuple[Array, tuple[Array, Array]]:
        """Causal self-attention of the new positions x [B, T, D], the first at `index`, over
        the keys and values of every earlier position kept in `cache` ([B, max_len, heads,
        head_dim] each) -> (output [B, T, D], the cache with x's keys and values written in)."""
        keys, values = cache
        q = self._project(x, self.query, self.query_bias)
        write = lambda c, new: jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), index, axis=1)
        keys = write(keys, self._project(x, self.key))
        values = write(values, self._project(x, self.value, self.value_bias))
        # Query t (at index + t) sees keys 0..index + t; the cache's unwritten tail is masked.
        positions = jnp.arange(keys.shape[1])
        visible = positions[None, :] <= index + jnp.arange(x.shape[1])[:, None]
        return self._out(self._einsum_attention(q, keys, values, visible[None, None])), (keys, values)

    def _einsum_attention(self, q: Array, k: Array, v: Array, mask: Array | None) -> Array:
        dt = self.dtype
        q = q * jnp.asarray(self.head_dim**-0.5, dt)
        # Softmax in float32: bf16 logits lose too much precision in exp/sum.
        logits = constrain(jnp.einsum("bqhk,bshk->bhqs", q, k).astype(jnp.float32), ("batch", "act_heads"))
        if mask is not None:
            # A finite floor (not -inf) keeps fully masked rows finite.
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(dt)
        return jnp.einsum("bhqs,bshk->bqhk", weights, v)


class MLP(nnx.Module):
    """Two dense layers with a GELU (`ACTIVATIONS`) in between."""

    def __init__(
        self,
        width: int,
        mlp_dim: int,
        *,
        activation: str = "gelu_tanh",
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} (expected one of {tuple(ACTIVATIONS)})")
        self.fc1 = Dense(width, mlp_dim, names=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = Dense(mlp_dim, width, names=("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.activation = activation

    def __call__(self, x: Array) -> Array:
        # [batch, (tokens,) width]: the MLP also runs on pooled vectors (the MAP head's probe).
        middle = ("length",) * (x.ndim - 2)
        hidden = constrain(ACTIVATIONS[self.activation](self.fc1(x)), ("batch", *middle, "act_mlp"))
        return constrain(self.fc2(hidden), ("batch", *middle, "act_embed"))


class TransformerBlock(nnx.Module):
    """Pre-LN block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_dim: int,
        *,
        dtype: Any = jnp.float32,
        attention: str = "xla",
        activation: str = "gelu_tanh",
        norm_eps: float = 1e-6,
        rngs: nnx.Rngs,
    ):
        self.ln1 = LayerNorm(width, epsilon=norm_eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(width, heads, dtype=dtype, impl=attention, rngs=rngs)
        self.ln2 = LayerNorm(width, epsilon=norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(width, mlp_dim, activation=activation, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        # The block's input and output are where the layout is fixed: without this the
        # compiler carries the FSDP weights' layout into the residual stream (see
        # clipjax/parallel/activations.py), and adding chips stops spreading the batch.
        x = constrain(x, TOKENS)
        x = constrain(x + self.attn(self.ln1(x), mask=mask), TOKENS)
        return constrain(x + self.mlp(self.ln2(x)), TOKENS)

    def step(self, x: Array, cache: tuple[Array, Array], index: Array) -> tuple[Array, tuple[Array, Array]]:
        """Causal generation: the new positions x [B, T, D] from `index` on, over the cached
        keys and values of the earlier ones (`Attention.cached`)."""
        y, cache = self.attn.cached(self.ln1(x), cache, index)
        x = x + y
        return x + self.mlp(self.ln2(x)), cache


def empty_kv_cache(
    depth: int, batch: int, max_len: int, heads: int, width: int, dtype
) -> tuple[Array, Array]:
    """Zero keys and values for `depth` causal self-attentions generating up to `max_len`
    positions (`Attention.cached`, `Stack.scan_step`): [depth, batch, max_len, heads, head_dim] each."""
    shape = (depth, batch, max_len, heads, width // heads)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


class Stack(nnx.Module):
    """``depth`` identical blocks, parameters stacked on a leading 'layers' axis.

    The blocks run under ``nnx.scan`` so the compiled program contains one block
    body regardless of depth (compile time stays flat as models grow), and the
    stacked axis can be sharded or offloaded as a unit. Extra call arguments
    (e.g. an attention mask) are broadcast to every block. ``remat`` (one of
    ``REMAT_POLICIES``; True / False mean 'full' / 'none') recomputes each block's
    activations in the backward pass instead of storing them, all of them or those
    its policy does not save. ``unroll`` blocks run per loop iteration (0: all of them, no loop):
    the parameters stay stacked either way, so it changes the compiled program, not the model;
    a rolled loop keeps compile time flat, an unrolled one lets XLA fuse across blocks (on
    CPUs a 4-block ViT step ran about 25% faster unrolled, benchmarks/train_throughput.py).
    ``depth`` may be 0, in which case the stack is the identity.
    """

    def __init__(
        self,
        make_block: Callable[[nnx.Rngs], nnx.Module],
        depth: int,
        *,
        remat: str | bool = "none",
        unroll: int = 1,
        rngs: nnx.Rngs,
    ):
        remat = remat_name(remat)
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat {remat!r} (expected one of {REMAT_POLICIES})")
        self.depth = depth
        self.remat = remat
        self.unroll = int(unroll)
        if depth == 0:
            self.blocks = None
            return

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
        def create(block_rngs: nnx.Rngs) -> nnx.Module:
            return make_block(block_rngs)

        self.blocks = create(rngs)

    def __call__(self, x: Array, *args: Any) -> Array:
        if self.blocks is None:
            return x

        def body(block: nnx.Module, carry: Array, *rest: Any) -> Array:
            return block(carry, *rest)

        if self.remat != "none":
            # policy=None is jax.checkpoint's own default: save nothing but the inputs.
            policy = None if self.remat == "full" else getattr(jax.checkpoint_policies, self.remat)
            # Inside scan the loop boundary already stops CSE across iterations, so
            # prevent_cse would only cost performance (per the jax.checkpoint docs).
            body = nnx.remat(body, prevent_cse=False, policy=policy)
        run = nnx.scan(
            body,
            in_axes=(0, nnx.Carry) + (None,) * len(args),
            out_axes=nnx.Carry,
            transform_metadata={nnx.PARTITION_NAME: LAYERS},
            unroll=True if self.unroll <= 0 or self.unroll >= self.depth else self.unroll,
        )
        return run(self.blocks, x, *args)

    def scan_step(self, fn: Callable[..., tuple[Array, Any]], x: Array, per_block: Any) -> tuple[Array, Any]:
        """x through the blocks as `fn(block, x, its slice of per_block) -> (x, new slice)`, with
        per_block's leaves stacked on a leading depth axis (a generation cache): (x, new per_block)."""
        if self.blocks is None:
            return x, per_block
        run = nnx.scan(
            fn,
            in_axes=(0, nnx.Carry, 0),
            out_axes=(nnx.Carry, 0),
            transform_metadata={nnx.PARTITION_NAME: LAYERS},
        )
        return run(self.blocks, x, per_block)
