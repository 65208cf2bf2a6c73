"""Tests for clipjax.models (tiny sizes; the whole file should run in ~1 min)."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from clipjax.models import (
    build_model,
    count_params,
    model_spec,
)
from clipjax.models.layers import LOGICAL_AXES, Conv, Stack, TransformerBlock, attention_mask, conv_as_matmul
from clipjax.models.resnet import ResidualBlock

VOCAB, MAX_LEN, TEXT_LEN, IMAGE = 50, 12, 8, 16
TINY_TEXT = dict(width=32, depth=2, heads=4, mlp_dim=64)
TINY_VIT = dict(kind="vit", width=32, depth=2, heads=4, mlp_dim=64, patch_size=4)
TINY_RESNET = dict(kind="resnet", stem_width=8, widths=(16, 16), blocks_per_stage=2, groups=4)


def make_config(image=None, text=None, **model):
    cfg = dict(
        embed_dim=16,
        dtype="float32",
        remat=False,
        logit_scale_init=math.log(1 / 0.07),
        logit_bias_init=None,
        image=dict(image or TINY_VIT),
        text=dict(text or TINY_TEXT),
    )
    cfg.update(model)
    return ml_collections.ConfigDict(cfg)


def make_batch(b=3, length=TEXT_LEN, seed=0):
    rs = np.random.RandomState(seed)
    images = rs.randint(0, 256, (b, IMAGE, IMAGE, 3)).astype(np.uint8)
    tokens = rs.randint(1, VOCAB, (b, length)).astype(np.int32)
    lengths = np.array([length, 3, 1] + [5] * (b - 3))[:b]
    for i, n in enumerate(lengths):
        tokens[i, n:] = 0
    return jnp.asarray(images), jnp.asarray(tokens)


def normal(shape, seed=0):
    # numpy, not jax.random: every new shape would cost a ~1 s XLA compile.
    return jnp.asarray(np.random.RandomState(seed).randn(*shape), jnp.float32)


def build(cfg, seed=0, image_size=IMAGE):
    return build_model(cfg, vocab_size=VOCAB, max_len=MAX_LEN, image_size=image_size, seed=seed)


@nnx.jit
def forward(model, images, tokens):
    """Embeddings of both towers, plus the images fed as floats in [0, 1]."""
    img, txt = model(images, tokens)
    return img, txt, model.encode_image(images.astype(jnp.float32) / 255.0)


@nnx.jit(static_argnames="method")
def call(model, *args, method):
    """One compiled program per call instead of op-by-op dispatch (faster)."""
    return getattr(model, method)(*args)


def assert_unit_norm(x):
    assert x.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(np.asarray(x), axis=-1), 1.0, atol=1e-5)


# --------------------------------------------------------------- forward ---

IMAGE_TOWERS = {
    "vit-cls": TINY_VIT,
    "vit-mean-dense": dict(TINY_VIT, pool="mean", patch_embed="dense"),
    "vit-map": dict(TINY_VIT, pool="map"),
    "resnet-flatten": TINY_RESNET,
    "resnet-mean": dict(TINY_RESNET, pool="mean", blocks_per_stage=0),
    "resnet-attention": dict(TINY_RESNET, pool="attention", attn_heads=2, blocks_per_stage=(0, 2)),
}


@pytest.mark.parametrize("name", list(IMAGE_TOWERS))
def test_image_towers_shapes_and_norms(name):
    model = build(make_config(image=IMAGE_TOWERS[name]))
    images, tokens = make_batch()
    img, txt, img_f = forward(model, images, tokens)
    assert img.shape == (3, 16) and txt.shape == (3, 16)
    assert_unit_norm(img)
    assert_unit_norm(txt)
    # uint8 pixels and the same picture as floats in [0, 1] agree.
    np.testing.assert_allclose(img, img_f, atol=1e-5)


def test_demo_resnet_recipe_is_expressible():
    image = dict(
        kind="resnet",
        stem_width=32,
        stem_stride=1,
        widths=(64, 128, 128),
        strides=(2, 2, 2),
        blocks_per_stage=0,
        groups=8,
        pool="flatten",
    )
    cfg = make_config(image=image, embed_dim=64)
    spec = model_spec(cfg, image_size=32)
    model = nnx.eval_shape(lambda: build_model(cfg, vocab_size=80, max_len=12, image_size=32, seed=0))
    tower = model.image_tower
    assert tower.final_size == 4 and tower.out_dim == 4 * 4 * 128
    assert model.image_proj.kernel.shape == (2048, 64)
    assert [s.down.conv.kernel.shape for s in tower.stages] == [
        (3, 3, 32, 64),
        (3, 3, 64, 128),
        (3, 3, 128, 128),
    ]
    assert tower.stem.conv.kernel.shape == (3, 3, 3, 32)
    assert all(s.residual.blocks is None for s in tower.stages)
    assert spec.image.blocks_per_stage == (0, 0, 0)
    # The default resnet variant is this recipe.
    default = model_spec(make_config(image=dict(kind="resnet")), image_size=32)
    assert default.image == spec.image


@pytest.mark.parametrize("pool,causal", [("mean", False), ("first", False), ("last", True)])
def test_text_padding_invariance(pool, causal):
    text = dict(TINY_TEXT, pool=pool, causal=causal)
    model = build(make_config(text=text), seed=1)
    _, tokens = make_batch()
    padded = jnp.pad(tokens, ((0, 0), (0, MAX_LEN - TEXT_LEN)))
    a = call(model, tokens, method="encode_text")
    b = call(model, padded, method="encode_text")
    assert_unit_norm(a)
    np.testing.assert_allclose(a, b, atol=1e-5)
    # ...while the content does matter.
    other = tokens.at[0, 1].set(tokens[0, 1] % (VOCAB - 1) + 1)
    assert not np.allclose(call(model, other, method="encode_text")[0], a[0], atol=1e-4)


def test_text_longer_than_max_len_raises():
    model = build(make_config())
    with pytest.raises(ValueError, match="max_len"):
        model.encode_text(jnp.ones((1, MAX_LEN + 1), jnp.int32))


# ----------------------------------------------------------------- stack ---


def _loop_over_layers(stack, make_block, x, *args):
    """Applies the stacked parameters one slice at a time with a plain loop."""
    block = make_block(nnx.Rngs(123))
    graphdef, _ = nnx.split(block)
    apply = jax.jit(lambda params, x, *args: nnx.merge(graphdef, params)(x, *args))
    stacked = nnx.state(stack.blocks, nnx.Param)
    for i in range(stack.depth):
        x = apply(jax.tree.map(lambda a, i=i: a[i], stacked), x, *args)
    return x


def test_transformer_stack_matches_python_loop():
    # Same sizes as the tiny towers, so parameter initialisers compile once.
    depth, width = 2, 32
    make = lambda r: TransformerBlock(width, 4, 64, rngs=r)
    stack = Stack(make, depth, rngs=nnx.Rngs(0))
    state = nnx.state(stack, nnx.Param)
    for leaf in jax.tree.leaves(state):
        assert leaf.shape[0] == depth
    assert stack.blocks.attn.query.shape == (depth, width, 4, 8)
    # Layers differ (independent initialisation per layer).
    q = stack.blocks.attn.query[...]
    assert not np.allclose(q[0], q[1])
    x = normal((2, 5, width))
    valid = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    mask = attention_mask(valid, 5)
    np.testing.assert_allclose(
        nnx.jit(lambda s, x, m: s(x, m))(stack, x, mask),
        _loop_over_layers(stack, make, x, mask),
        atol=1e-5,
        rtol=1e-5,
    )


def test_residual_stack_matches_python_loop():
    make = lambda r: ResidualBlock(16, groups=4, use_bias=False, dtype=jnp.float32, rngs=r)
    stack = Stack(make, 2, rngs=nnx.Rngs(0))
    # Zero-init residual scale would make every block the same map; perturb.
    blocks = stack.blocks
    blocks.norm2.scale[...] = normal(blocks.norm2.scale.shape, seed=1)
    x = normal((2, 6, 6, 16))
    np.testing.assert_allclose(
        nnx.jit(lambda s, x: s(x))(stack, x), _loop_over_layers(stack, make, x), atol=1e-5, rtol=1e-5
    )


def test_empty_stack_is_identity():
    stack = Stack(lambda r: TransformerBlock(8, 2, 16, rngs=r), 0, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 3, 8))
    assert stack(x) is x
    assert not jax.tree.leaves(nnx.state(stack, nnx.Param))


STACKS = {
    "transformer": (lambda r: TransformerBlock(32, 4, 64, rngs=r), (2, 5, 32)),
    "residual": (
        lambda r: ResidualBlock(16, groups=4, use_bias=False, dtype=jnp.float32, rngs=r),
        (2, 6, 6, 16),
    ),
}


@pytest.mark.parametrize("kind", list(STACKS))
def test_remat_same_output_and_grads(kind):
    make, shape = STACKS[kind]
    plain = Stack(make, 2, rngs=nnx.Rngs(0))
    remat = Stack(make, 2, remat=True, rngs=nnx.Rngs(0))
    x = normal(shape)

    def loss(stack, x):
        return jnp.sum(jnp.sin(stack(x)))

    grad_fn = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))
    l1, (gp1, gx1) = grad_fn(plain, x)
    l2, (gp2, gx2) = grad_fn(remat, x)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    np.testing.assert_allclose(gx1, gx2, atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), gp1, gp2)
    assert float(jnp.abs(gx1).max()) > 0

    def jaxpr(stack):
        graphdef, params = nnx.split(stack)
        return str(jax.make_jaxpr(lambda params, x: loss(nnx.merge(graphdef, params), x))(params, x))

    # The block body really is wrapped in jax.checkpoint (primitive 'remat*').
    remat_primitive = re.compile(r"\b(remat\d*|checkpoint)\[")
    assert remat_primitive.search(jaxpr(remat))
    assert not remat_primitive.search(jaxpr(plain))


def test_model_remat_flag_reaches_every_stack():
    model = nnx.eval_shape(lambda: build(make_config(image=IMAGE_TOWERS["resnet-attention"], remat=True)))
    stacks = [m for _, m in nnx.iter_graph(model) if isinstance(m, Stack)]
    assert len(stacks) == 3 and all(s.remat == "full" for s in stacks)


@pytest.mark.parametrize("image", ["vit-cls"])
def test_bfloat16_close_to_float32(image):
    images, tokens = make_batch()
    f32 = build(make_config(image=IMAGE_TOWERS[image]))
    bf16 = build(make_config(image=IMAGE_TOWERS[image], dtype="bfloat16"))
    for leaf in jax.tree.leaves(nnx.state(bf16, nnx.Param)):
        assert leaf.dtype == jnp.float32
    a32, t32, _ = forward(f32, images, tokens)
    a16, t16, _ = forward(bf16, images, tokens)
    assert a16.dtype == jnp.float32 and t16.dtype == jnp.float32
    assert_unit_norm(a16)
    # Cosine similarity between the two precisions' embeddings.
    assert float(jnp.min(jnp.sum(a32 * a16, -1))) > 0.98
    assert float(jnp.min(jnp.sum(t32 * t16, -1))) > 0.98


# --------------------------------------------------- parameters / layout ---


@pytest.mark.parametrize("image", list(IMAGE_TOWERS))
def test_every_param_has_logical_names(image):
    cfg = make_config(image=IMAGE_TOWERS[image], logit_bias_init=-10.0)
    model = nnx.eval_shape(lambda: build(cfg))
    params = nnx.state(model, nnx.Param)
    specs = nnx.get_partition_spec(params)
    flat_params = dict(nnx.to_flat_state(params))
    flat_specs = dict(nnx.to_flat_state(specs))
    assert flat_params.keys() == flat_specs.keys()
    for path, var in flat_params.items():
        spec = tuple(flat_specs[path].get_value())
        assert len(spec) == var.ndim, (path, spec, var.shape)
        assert all(n in LOGICAL_AXES for n in spec), (path, spec)
        # Stack keeps its stacked block parameters under the attribute 'blocks'.
        assert (spec[:1] == ("layers",)) == ("blocks" in path), (path, spec)
    assert tuple(flat_specs[("logit_scale",)].get_value()) == ()
    assert tuple(flat_specs[("logit_bias",)].get_value()) == ()
    if image == "vit-mean-dense":
        assert tuple(flat_specs[("image_tower", "patch", "kernel")].get_value()) == ("patch", "embed")


def test_partition_specs_with_rules_and_mesh():
    rules = [(n, None) for n in LOGICAL_AXES if n != "mlp"] + [("mlp", "model")]
    model = nnx.eval_shape(lambda: build(make_config()))
    with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert tuple(specs.text_tower.encoder.blocks.mlp.fc1.kernel.get_value()) == (None, None, "model")
    # Built under a mesh with rules, parameters come out sharded.
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        stack = Stack(lambda r: TransformerBlock(32, 4, 64, rngs=r), 2, rngs=nnx.Rngs(0))
    kernel = stack.blocks.mlp.fc1.kernel[...]
    assert kernel.sharding.spec == jax.P(None, None, "model")


def test_logit_scale_and_bias():
    with_bias = build(make_config(logit_bias_init=-10.0, logit_scale_init=math.log(10.0)))
    assert with_bias.logit_bias.shape == () and with_bias.logit_scale.shape == ()
    np.testing.assert_allclose(with_bias.logit_bias[...], -10.0)
    np.testing.assert_allclose(with_bias.logit_scale[...], math.log(10.0), rtol=1e-6)
    no_bias = build(make_config())
    assert no_bias.logit_bias is None
    np.testing.assert_allclose(no_bias.logit_scale[...], math.log(1 / 0.07), rtol=1e-6)


def test_split_holds_only_params_and_jit_works():
    model = build(make_config())
    graphdef, state = nnx.split(model)
    variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert variables and all(type(v) is nnx.Param for v in variables)
    images, tokens = make_batch()

    @jax.jit
    def pure_forward(state, images, tokens):
        return nnx.merge(graphdef, state)(images, tokens)

    img, txt = pure_forward(state, images, tokens)
    ref_img, ref_txt, _ = forward(model, images, tokens)
    np.testing.assert_allclose(img, ref_img, atol=1e-5)
    np.testing.assert_allclose(txt, ref_txt, atol=1e-5)


def test_build_model_is_deterministic_in_seed():
    kw = dict(vocab_size=VOCAB, max_len=MAX_LEN, image_size=IMAGE)
    a = build_model(make_config(), seed=3, **kw)
    b = build_model(make_config(), seed=3, **kw)
    c = build_model(make_config(), seed=4, **kw)
    ka, kb, kc = (m.text_tower.embed[...] for m in (a, b, c))
    np.testing.assert_array_equal(ka, kb)
    assert not np.allclose(ka, kc)
    assert count_params(a) == count_params(c) > 0


def test_vit_b16_abstract_param_count():
    cfg = make_config(image=dict(kind="vit", variant="B/16"), text=dict(variant="B"), embed_dim=512)
    model = nnx.eval_shape(lambda: build_model(cfg, vocab_size=49408, max_len=77, image_size=224, seed=0))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    n_image = count_params(model.image_tower)
    assert 85.5e6 < n_image < 86.5e6, n_image  # ViT-B/16: ~86M
    n_text = count_params(model.text_tower)
    assert 62e6 < n_text < 64e6, n_text  # CLIP's B text tower: ~63M
    assert model.image_tower.encoder.blocks.mlp.fc1.kernel.shape == (12, 768, 3072)


def test_conv_as_matmul_matches_lax_conv():
    x = normal((2, 9, 8, 5))

    @functools.partial(jax.jit, static_argnums=(2, 3))
    def both(x, kernel, stride, padding):
        ref = jax.lax.conv_general_dilated(
            x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return ref, conv_as_matmul(x, kernel, stride, padding)

    # Odd and even sizes, SAME padding with the extra pixel at the end, and the
    # non-overlapping patchify path.
    for k, stride, padding, xs in [(3, 2, "SAME", x), (3, 1, "SAME", x[:, :8]), (4, 4, "VALID", x[:, :8])]:
        kernel = normal((k, k, 5, 7), seed=k)
        ref, got = both(xs, kernel, stride, padding)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    # The Conv module gives the same result with either implementation.
    apply = nnx.jit(lambda conv, x: conv(x))
    conv = Conv(5, 7, 3, stride=2, impl="xla", rngs=nnx.Rngs(0))
    y_xla = apply(conv, x)
    conv.impl = "matmul"
    np.testing.assert_allclose(apply(conv, x), y_xla, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------- bad configs ---

BAD_CONFIGS = [
    (dict(image=dict(kind="foo")), "model.image.kind"),
    (dict(image=dict(TINY_VIT, width=30)), "model.image.width"),
    (dict(image=dict(TINY_VIT, pool="max")), "model.image.pool"),
    (dict(image=dict(TINY_VIT, patch_size=5)), "model.image.patch_size"),
    (dict(image=dict(kind="vit", variant="H/14")), "model.image.variant"),
    (dict(image=dict(TINY_VIT, widht=32)), "model.image.widht"),
    (dict(image=dict(TINY_VIT, depth=-1)), "model.image.depth"),
    (dict(image=dict(TINY_RESNET, widths=(8, 0))), "model.image.widths"),
    (dict(image=dict(TINY_RESNET, groups=3)), "model.image.groups"),
    (dict(image=dict(TINY_RESNET, blocks_per_stage=(1, 2, 3))), "model.image.blocks_per_stage"),
    (dict(image=dict(TINY_RESNET, pool="attention", attn_heads=3)), "model.image.widths[-1]"),
    (dict(image=dict(TINY_RESNET, pool="cls")), "model.image.pool"),
    (dict(text=dict(TINY_TEXT, heads=5)), "model.text.width"),
    (dict(text=dict(TINY_TEXT, pool="max")), "model.text.pool"),
    (dict(text=dict(TINY_TEXT, causal="yes")), "model.text.causal"),
    (dict(text=dict(TINY_TEXT, vocab=3)), "model.text.vocab"),
    (dict(dtype="float16"), "model.dtype"),
    (dict(embed_dim=0), "model.embed_dim"),
    (dict(logit_bias_init="x"), "model.logit_bias_init"),
]


@pytest.mark.parametrize("overrides,key", BAD_CONFIGS, ids=[k for _, k in BAD_CONFIGS])
def test_bad_config_raises_naming_key(overrides, key):
    with pytest.raises(ValueError) as info:
        build(make_config(**overrides))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(key + ":"), message


def test_fields_of_other_image_kind_are_tolerated():
    # A base config may carry ViT fields while kind is switched to resnet.
    cfg = make_config(image=dict(TINY_RESNET, patch_size=16, heads=12))
    assert model_spec(cfg, image_size=IMAGE).image.widths == (16, 16)


def test_unset_fields_take_the_variant():
    # The base config lists every field; None (a typed placeholder) means "unset".
    text = dict(width=None, depth=None, heads=None, mlp_dim=None, pool="mean", causal=False)
    image = dict(
        kind="vit",
        variant="B/16",
        patch_size=None,
        width=None,
        depth=None,
        heads=None,
        mlp_dim=None,
        pool=None,
        stem_width=32,
        widths=(64, 128, 128),
        blocks_per_stage=0,
        groups=8,
    )
    spec = model_spec(make_config(image=image, text=text, logit_bias_init=None), image_size=224)
    assert (spec.image.width, spec.image.depth, spec.image.patch_size) == (768, 12, 16)
    assert spec.image.pool == "cls"  # the ViT's own default for the shared `pool` field
    assert (spec.text.width, spec.text.depth, spec.text.variant) == (64, 2, "tiny")
    assert spec.logit_bias_init is None
    # For the resnet, 0 residual blocks is a real value, and widths alone
    # (without strides) give one stride-2 stage per width.
    image = dict(kind="resnet", widths=(8, 8, 8, 8), blocks_per_stage=0, groups=4)
    spec = model_spec(make_config(image=image), image_size=IMAGE)
    assert spec.image.blocks_per_stage == (0,) * 4
    assert spec.image.strides == (2,) * 4
    # A variant alone takes all of its layout (the base config's unset fields do not override it).
    from clipjax.config import default_config

    base = default_config().model
    base.image.variant = "RN50"
    spec = model_spec(base, image_size=224)
    assert spec.image.widths == (64, 128, 256, 512) and spec.image.pool == "attention"
    assert spec.image.blocks_per_stage == (3, 4, 6, 3) and spec.image.groups == 32
