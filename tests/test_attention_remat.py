"""How the towers compute, not what: `model.attention`, `model.remat` policies, the large configs'
bf16 compute. Each setting must leave the embeddings and the gradients as they were."""

import importlib.util
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from clipjax.cli import check_override_keys
from clipjax.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    default_config,
    translate_legacy_flags,
    validate,
)
from clipjax.models import build_model, model_factory, model_spec
from clipjax.models.layers import REMAT_POLICIES, Attention, Stack
from tests.helpers import rel_err

ROOT = pathlib.Path(__file__).resolve().parent.parent
VOCAB, MAX_LEN, IMAGE = 50, 12, 16
TINY_TEXT = dict(width=32, depth=2, heads=4, mlp_dim=64)
TINY_VIT = dict(kind="vit", width=32, depth=2, heads=4, mlp_dim=64, patch_size=4)
TINY_RESNET = dict(
    kind="resnet", stem_width=8, widths=(16, 16), blocks_per_stage=(0, 1), groups=4, pool="attention"
)


def make_config(image=TINY_VIT, text=TINY_TEXT, **model):
    cfg = dict(embed_dim=16, image=dict(image), text=dict(text))
    cfg.update(model)
    return ml_collections.ConfigDict(cfg)


def build(cfg, seed=0):
    return build_model(cfg, vocab_size=VOCAB, max_len=MAX_LEN, image_size=IMAGE, seed=seed)


def make_batch(b=4, seed=0):
    """Texts of different lengths (one empty) right-padded to MAX_LEN, so padding masks matter."""
    rs = np.random.RandomState(seed)
    images = rs.randint(0, 256, (b, IMAGE, IMAGE, 3)).astype(np.uint8)
    tokens = rs.randint(1, VOCAB, (b, MAX_LEN)).astype(np.int32)
    for i, n in enumerate([MAX_LEN, 5, 1, 0][:b]):
        tokens[i, n:] = 0
    return jnp.asarray(images), jnp.asarray(tokens)


@nnx.jit
def towers(model, images, tokens):
    return (
        model.image_features(images),
        model.text_features(tokens),
        model.encode_image(images),
        model.encode_text(tokens),
    )


def load_config(name, arg=""):
    path = ROOT / "configs" / name
    spec = importlib.util.spec_from_file_location(f"_cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# ------------------------------------------------------------- attention ---

TOWERS = {
    # ViT blocks (no mask) and the MAP head's cross-attention; bidirectional text with only the
    # padding mask, where a dropped padding mask changes every non-full text.
    "vit-map/text-mean": (dict(TINY_VIT, pool="map"), dict(TINY_TEXT, pool="mean", causal=False)),
    # The ResNet's attention pool; causal text (padding and causal masks together).
    "resnet-attention/text-causal": (TINY_RESNET, dict(TINY_TEXT, pool="last", causal=True)),
}


@pytest.mark.parametrize("name", list(TOWERS))
def test_dot_product_attention_matches_einsum_attention(name):
    image, text = TOWERS[name]
    einsum = build(make_config(image, text, attention="xla"))
    fused = build(make_config(image, text, attention="dot_product_attention"))
    # Same seed, same parameters: the setting changes only how attention is computed.
    jax.tree.map(np.testing.assert_array_equal, nnx.state(einsum, nnx.Param), nnx.state(fused, nnx.Param))
    impls = {m.impl for _, m in nnx.iter_graph(fused) if isinstance(m, Attention)}
    assert impls == {"dot_product_attention"}
    images, tokens = make_batch()
    for a, b in zip(towers(einsum, images, tokens), towers(fused, images, tokens)):
        assert b.dtype == jnp.float32
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_unknown_attention_names_the_key():
    with pytest.raises(ConfigError, match=r"^model\.attention: 'flash' is not one of \('xla', "):
        model_spec(make_config(attention="flash"), image_size=IMAGE)


def test_cudnn_attention_is_refused_off_gpu_in_one_line():
    with pytest.raises(ConfigError, match=r"^model\.attention: 'cudnn' needs an NVIDIA GPU[^\n]*$"):
        model_spec(make_config(attention="cudnn"), image_size=IMAGE)


def test_a_run_stored_before_attention_and_remat_names_resumes():
    """An old run's config.json has `remat: true` and no `attention`: resuming it is no change."""
    from clipjax.config import default_config
    from clipjax.run_store.resume import ResumeError, check_resume

    stored = default_config().to_dict()
    stored["model"]["remat"] = True
    del stored["model"]["attention"]
    current = default_config()
    current.model.remat = "full"
    current.model.attention = "dot_product_attention"
    assert set(check_resume(stored, current, "w")) == {"model.remat", "model.attention"}
    current.model.embed_dim = 8  # what is trained still may not change
    with pytest.raises(ResumeError):
        check_resume(stored, current, "w")


# ----------------------------------------------------------------- remat ---


def clip_loss(model, images, tokens):
    img, txt = model(images, tokens)
    logits = jnp.exp(model.logit_scale[...]) * img @ txt.T
    labels = jnp.arange(logits.shape[0])
    per_side = [-jnp.mean(jax.nn.log_softmax(x, axis=-1)[labels, labels]) for x in (logits, logits.T)]
    return (per_side[0] + per_side[1]) / 2


loss_and_grads = nnx.jit(nnx.value_and_grad(clip_loss))


def saved_for_backward(model, images, tokens) -> int:
    """Scalars the backward pass keeps: the leaves of the vjp function are its residuals."""
    graphdef, params = nnx.split(model)
    vjp_fn = jax.eval_shape(
        lambda p: jax.vjp(lambda p: clip_loss(nnx.merge(graphdef, p), images, tokens), p)[1], params
    )
    return sum(math.prod(x.shape) for x in jax.tree.leaves(vjp_fn))


def test_every_remat_policy_gives_the_gradients_of_none():
    images, tokens = make_batch()
    image = dict(TINY_VIT, pool="map")
    text = dict(TINY_TEXT, pool="last", causal=True)
    ref_loss, ref_grads = loss_and_grads(build(make_config(image, text, remat="none")), images, tokens)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grads)) > 0
    saved = {}
    for policy in REMAT_POLICIES[1:]:
        model = build(make_config(image, text, remat=policy))
        stacks = [m for _, m in nnx.iter_graph(model) if isinstance(m, Stack)]
        assert len(stacks) == 2 and all(s.remat == policy for s in stacks)
        loss, grads = loss_and_grads(model, images, tokens)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        # Relative to each gradient's scale: recomputation may reassociate float sums.
        errors = jax.tree.leaves(jax.tree.map(rel_err, grads, ref_grads))
        assert max(errors) < 1e-5, (policy, max(errors))
        saved[policy] = saved_for_backward(model, images, tokens)
    # The policy reaches jax.checkpoint: what it keeps for the backward pass differs as it says.
    assert saved["full"] == saved["nothing_saveable"] < saved["dots_with_no_batch_dims_saveable"]
    assert saved["dots_with_no_batch_dims_saveable"] < saved["dots_saveable"] < saved["everything_saveable"]


def test_old_boolean_remat_in_config_files_and_stored_configs():
    for old, new in ((True, "full"), (False, "none")):
        config = default_config()
        config.model.remat = old  # a config file written before the policy names
        assert model_spec(config.model, image_size=32).remat == new
        validate(config, num_devices=8)
        stored = json.loads(json.dumps(config.to_dict()))
        assert stored["model"]["remat"] is old
        assert model_spec(config_from_dict(stored).model, image_size=32).remat == new
        assert (
            model_spec(apply_overrides(default_config(), {"model.remat": old}).model, image_size=32).remat
            == new
        )
    # A stored config.json of the current version keeps its name.
    stored = json.loads(json.dumps(default_config().to_dict()))
    stored["model"]["remat"] = "dots_saveable"
    assert model_spec(config_from_dict(stored).model, image_size=32).remat == "dots_saveable"


def parse_command_line(*overrides):
    """A config as clipjax.train reads its command line (legacy translation, key check, absl)."""
    argv = translate_legacy_flags(["prog", "--config", str(ROOT / "configs/demo.py:tiny"), *overrides])
    check_override_keys(argv, load_config("demo.py", "tiny"))
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


@pytest.mark.parametrize(
    "value,expected",
    [("True", "full"), ("False", "none"), ("full", "full"), ("dots_with_no_batch_dims_saveable", None)],
)
def test_remat_on_the_command_line(value, expected):
    config = parse_command_line(f"--config.model.remat={value}")
    validate(config, num_devices=8)
    assert model_spec(config.model, image_size=config.data.image_size).remat == (expected or value)


def test_unknown_remat_policy_is_one_line_naming_the_key_and_choices():
    config = parse_command_line("--config.model.remat=dots")
    with pytest.raises(ConfigError) as info:
        validate(config, num_devices=8)
    message = str(info.value)
    assert "\n" not in message and message.startswith("model.remat: 'dots' is not one of")
    assert all(name in message for name in REMAT_POLICIES)
    for bad in (3, None):
        config = default_config()
        config.model.remat = bad
        with pytest.raises(ConfigError, match=r"^model\.remat: "):
            validate(config, num_devices=8)


# ---------------------------------------------------------- large configs ---


@pytest.mark.parametrize("name", ["clip_vit_b16.py", "siglip_vit_b16.py"])
def test_large_configs_compute_in_bf16_with_float32_params_and_embeddings(name):
    full = model_spec(load_config(name).model, image_size=224)
    assert (full.dtype, full.attention) == ("bfloat16", "dot_product_attention")
    assert full.remat not in ("none", "full")
    config = load_config(name, "tiny")
    tiny = model_spec(config.model, image_size=config.data.image_size)
    assert (tiny.dtype, tiny.remat, tiny.attention) == (full.dtype, full.remat, full.attention)

    model = model_factory(config, vocab_size=VOCAB)()
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert params and all(p.dtype == jnp.float32 for p in params)
    assert model.image_tower.dtype == model.text_tower.dtype == jnp.bfloat16
    size, length = config.data.image_size, config.data.tokenizer.max_len
    images = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, size, size, 3)), jnp.uint8)
    tokens = jnp.zeros((2, length), jnp.int32).at[:, :5].set(7).at[1, 3:].set(0)
    img_f, txt_f, img, txt = towers(model, images, tokens)
    for x in (img_f, txt_f, img, txt):
        assert x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(x)))
    np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("unroll", [0, 2])
def test_unrolled_stacks_give_the_loss_and_gradients_of_the_rolled_loop(unroll):
    """`model.unroll` changes the compiled loop, not the model: same parameters, same numbers."""
    images, tokens = make_batch()
    image, text = dict(TINY_VIT, depth=3), dict(TINY_TEXT, depth=3, pool="last", causal=True)
    ref_loss, ref_grads = loss_and_grads(build(make_config(image, text)), images, tokens)
    model = build(make_config(image, text, unroll=unroll))
    stacks = [m for _, m in nnx.iter_graph(model) if isinstance(m, Stack)]
    assert len(stacks) == 2 and all(s.unroll == unroll for s in stacks)
    loss, grads = loss_and_grads(model, images, tokens)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    assert max(jax.tree.leaves(jax.tree.map(rel_err, grads, ref_grads))) < 1e-5
    # Unrolled means no loop over the blocks in the program (a rolled stack of 3 has one).
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p: nnx.merge(graphdef, p)(images, tokens)).lower(params).as_text()
    loops = forward.count("stablehlo.while")
    assert loops == (0 if unroll == 0 else 2), loops
