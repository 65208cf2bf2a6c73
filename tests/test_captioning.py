"""The captioning decoder (CoCa, LocCa): exact combined loss on any mesh and micro-batching,
generation over a key/value cache equal to full passes, and the config's one-line refusals."""

import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clipjax.config import ConfigError, default_config, validate
from clipjax.losses.captioning import (
    caption_token_count,
    caption_token_losses,
    chunked_token_cross_entropy,
    token_cross_entropy,
)
from clipjax.models import generate
from clipjax.models.two_towers import model_factory
from tests.helpers import (
    ROOT,
    assert_gradients_equal,
    decoder_loss_and_gradients,
    gradient_floor,
    rel_err,
    source_and_tokenizer,
    tiny_demo,
)
from tests.xla_flags import optimised_code

VOCAB, LENGTH, BOS, EOS = 40, 9, 1, 2


def _model(input_="text_tower", cross_attention="tokens", tie=False, kind="vit", seed=0):
    """A tiny random model with a decoder, its output layer randomised (it starts at zero);
    input_='text_tower_raw': open_clip's CoCa layout (attentional pooler in the image tower, an
    appended token pooling the text, two MLPs per decoder block)."""
    c = default_config()
    c.data.image_size = 16
    c.data.tokenizer.max_len = LENGTH
    c.model.image.kind = kind
    if kind == "vit":
        c.model.image.patch_size = 4
    c.model.text.causal = True
    c.model.text.pool = "last"
    c.model.decoder.variant = "tiny"
    c.model.decoder.input = input_
    c.model.decoder.cross_attention = cross_attention
    c.model.decoder.pooler_queries = 3
    c.model.decoder.tie_embedding = tie
    if input_ == "text_tower_raw":
        c.model.image.pool, c.model.image.pooler_queries, c.model.image.pooler_heads = (
            "attentional_pooler",
            4,
            2,
        )
        c.model.text.pool = "cls"
        c.model.decoder.block, c.model.decoder.output_bias = "mlp_per_attention", False
    c.seed = seed
    model = nnx.jit(model_factory(c, vocab_size=VOCAB))()  # one program, not one per parameter
    if model.decoder.head is not None:
        head = model.decoder.head.kernel
        head[...] = jax.random.normal(jax.random.key(seed + 1), head.shape) * 0.5
    return model


def _inputs(b=3, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    images = jax.random.uniform(k1, (b, 16, 16, 3))
    words = jax.random.randint(k2, (b, LENGTH), 3, VOCAB)
    lengths = jnp.array([3, 5, LENGTH - 2, 1, 4, 6][:b])
    pos = jnp.arange(LENGTH)[None]
    tokens = jnp.where(pos == 0, BOS, jnp.where(pos <= lengths[:, None], words, 0))
    tokens = jnp.where(pos == lengths[:, None] + 1, EOS, tokens)
    return images, tokens.astype(jnp.int32)


DECODERS = [
    ("text_tower", "tokens", False),
    ("text_tower", "pooler", True),
    ("embed", "tokens", True),
    ("embed", "pooler", False),
    ("text_tower_raw", "tokens_raw", False),
    ("text_tower_raw", "pooler", True),
]


@pytest.mark.parametrize("input_,cross_attention,tie", DECODERS)
def test_cached_generation_steps_give_the_teacher_forced_logits(input_, cross_attention, tie):
    """Position by position over the key/value cache, the text tower and decoder give the
    logits of the full teacher-forced pass (a causal mask dropped from either would let the
    full pass see later tokens, which the cache never holds)."""
    model = _model(input_, cross_attention, tie)
    images, tokens = _inputs()
    _, _, logits = nnx.jit(lambda m, x, t: m.embed_and_caption(x, t))(model, images, tokens)
    full = jax.nn.log_softmax(logits, axis=-1)
    # One program for every position, as generation runs it (the index traced).
    step = jax.jit(generate._step_fn(model, model.image_memory(images), bos_id=0))
    caches = generate._caches(model, images.shape[0])
    for i in range(LENGTH - 1):
        logp, caches = step(tokens[:, i : i + 1], caches, i)
        # The step never proposes pad: compare the other tokens' probabilities, renormalised.
        expected = jax.nn.log_softmax(full[:, i].at[:, 0].set(-jnp.inf), axis=-1)
        # Rows past their caption's end differ (pad keys are masked in the full pass only), and
        # nothing reads them: generation stops a row at eos.
        real = np.asarray(tokens[:, i] != 0)
        assert real.any()
        np.testing.assert_allclose(logp[real, 1:], expected[real, 1:], atol=2e-5, err_msg=f"position {i}")


def _greedy_by_full_passes(model, images, max_len):
    """The reference: every next token from a whole teacher-forced pass over the prefix."""
    b = images.shape[0]
    tokens = np.zeros((b, max_len), np.int32)
    tokens[:, 0] = BOS
    done = np.zeros(b, bool)
    # Each pass takes all max_len positions, those after the prefix pads (keys no position
    # attends to), so that one program serves every prefix.
    logits_of = nnx.jit(lambda m, t: m.embed_and_caption(images, t)[2])
    for i in range(max_len - 1):
        # Row i of the logits reads positions 0..i (the one after is a placeholder).
        scores = np.array(logits_of(model, jnp.asarray(tokens))[:, i])
        scores[:, [0, BOS]] = -np.inf
        chosen = np.where(done, 0, scores.argmax(-1))
        tokens[:, i + 1] = chosen
        done |= chosen == EOS
    return tokens


@pytest.mark.parametrize(
    "input_,cross_attention",
    [("text_tower", "tokens"), ("embed", "tokens"), ("text_tower_raw", "tokens_raw")],
)
def test_greedy_generation_with_the_cache_equals_full_passes_token_for_token(input_, cross_attention):
    model = _model(input_, cross_attention, False, seed=3)
    images, _ = _inputs(b=4, seed=5)
    graphdef, params = nnx.split(model)
    cached = jax.jit(
        lambda p, x: generate.greedy_captions(
            nnx.merge(graphdef, p), x, max_len=LENGTH, bos_id=BOS, eos_id=EOS
        )
    )
    got = np.asarray(cached(params, images))
    np.testing.assert_array_equal(got, _greedy_by_full_passes(model, images, LENGTH))
    assert (got[:, 1:] != 0).any(), "the random model generated nothing to compare"


def test_beam_search_of_one_beam_is_greedy_and_more_beams_score_no_worse():
    model = _model("embed", "pooler", False, seed=7)
    images, _ = _inputs(b=4, seed=8)
    greedy = generate.greedy_captions(model, images, max_len=LENGTH, bos_id=BOS, eos_id=EOS)
    one, _ = generate.beam_captions(model, images, max_len=LENGTH, bos_id=BOS, eos_id=EOS, beams=1)
    np.testing.assert_array_equal(one, greedy)

    def log_prob(tokens):
        _, _, logits = model.embed_and_caption(images, tokens)
        logits = logits.at[:, :, jnp.array([0, BOS])].set(-jnp.inf)
        logp = jax.nn.log_softmax(logits, axis=-1)
        targets = tokens[:, 1:]
        picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(targets != 0, picked, 0.0), axis=1)

    beam, scores = generate.beam_captions(model, images, max_len=LENGTH, bos_id=BOS, eos_id=EOS, beams=4)
    np.testing.assert_allclose(scores, log_prob(beam), rtol=1e-5)
    assert np.all(np.asarray(scores) >= np.asarray(log_prob(greedy)) - 1e-5)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_cross_attention_reads_every_image_token(kind):
    """The decoder's memory holds one row per image token (or pooler query), not the pooled
    embedding; and a change to one image region reaches the captions' logits."""
    model = _model("embed", "tokens", False, kind=kind)
    images, tokens = _inputs()
    pooled, image_tokens = model.image_tower.encode(model._standardize(images))
    memory = model.image_memory(images)
    assert image_tokens.shape[1] > 1 and memory.shape[:2] == image_tokens.shape[:2]
    np.testing.assert_allclose(memory, model.decoder.memory(image_tokens), atol=1e-6)
    pooled_model = _model("embed", "pooler", False, kind=kind)
    assert pooled_model.image_memory(images).shape[1] == 3


def test_label_smoothing_and_the_token_mean():
    logits = jax.random.normal(jax.random.key(0), (2, 4, 6))
    tokens = jnp.array([[1, 3, 4, 2, 0], [1, 5, 2, 0, 0]])
    targets = tokens[:, 1:]
    logp = jax.nn.log_softmax(logits, -1)
    mask = np.asarray(targets != 0, np.float32)
    nll = -np.take_along_axis(np.asarray(logp), np.asarray(targets)[..., None], -1)[..., 0]
    assert float(caption_token_count(tokens)) == 5
    # The decoder's output layer as the identity: its features are the logits.
    decoder = types.SimpleNamespace(output_layer=lambda tied: (jnp.eye(6), None))
    model = types.SimpleNamespace(
        embed_and_decode=lambda images, tokens: (None, None, logits),
        decoder=decoder,
        tied_embedding=lambda: None,
    )
    np.testing.assert_allclose(
        jnp.sum(caption_token_losses(model, None, tokens)[2]), np.sum(nll * mask), rtol=1e-6
    )
    smooth = 0.9 * nll - 0.1 * np.asarray(logp).mean(-1)
    np.testing.assert_allclose(token_cross_entropy(logits, targets, 0.1), smooth, rtol=1e-6)


@pytest.mark.parametrize("chunk", [7, 10, 40])
@pytest.mark.parametrize("smoothing,with_bias", [(0.0, True), (0.1, False)])
def test_the_vocabulary_chunked_cross_entropy_and_its_gradients_equal_the_whole(chunk, smoothing, with_bias):
    """Slices of 7 (the last one padded), 10 (dividing the 40 words) or all at once."""
    k = jax.random.split(jax.random.key(0), 4)
    features = jax.random.normal(k[0], (3, 5, 8))
    weight = jax.random.normal(k[1], (8, 40)) * 2.0
    bias = jax.random.normal(k[2], (40,)) if with_bias else None
    targets = jax.random.randint(k[3], (3, 5), 0, 40)
    cotangent = jnp.arange(15.0).reshape(3, 5) / 7.0

    def whole(f, w, b):
        logits = f @ w + (0.0 if b is None else b)
        return jnp.sum(token_cross_entropy(logits, targets, smoothing) * cotangent)

    def chunked(f, w, b):
        return jnp.sum(chunked_token_cross_entropy(f, w, b, targets, smoothing, chunk) * cotangent)

    argnums = (0, 1, 2) if with_bias else (0, 1)
    expected, expected_grads = jax.value_and_grad(whole, argnums)(features, weight, bias)
    got, grads = jax.jit(jax.value_and_grad(chunked, argnums))(features, weight, bias)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def _caption_config(data_dir, **overrides):
    values = {
        "model.text.causal": True,
        "model.text.pool": "last",
        "model.decoder.variant": "tiny",
        "model.decoder.cross_attention": "tokens",
        **overrides,
    }
    return tiny_demo(data_dir, **values)


def test_combined_loss_and_gradients_equal_one_device_on_8_gather_and_ring_micro_batched(tfds_dir):
    """Contrastive + captioning loss and every gradient: 8 devices (FSDP x data) with the gather
    loss, and with the ring over 2 micro-batches, equal one device's un-split batch."""
    base = _caption_config(tfds_dir, **{"loss.label_smoothing": 0.1, "loss.caption_weight": 2.0})
    source, tokenizer = source_and_tokenizer(base.data)
    batch = next(source.train_iterator(tokenizer, seed=0))
    batch = {k: batch[k] for k in ("image", "text", "text_id")}
    results = []
    for devices, shape, impl, micro in (
        (jax.devices()[:1], (1, 1, 1), "gather", 1),
        (jax.devices(), (4, 2, 1), "gather", 1),
        (jax.devices(), (4, 2, 1), "ring", 2),
    ):
        # The micro-batched ring run also takes the logits 7 vocabulary entries at a time.
        chunk = 7 if micro > 1 else 0
        config = _caption_config(
            tfds_dir, **{"loss.impl": impl, "microbatches": micro, "loss.caption_vocab_chunk": chunk}
        )
        config.loss.label_smoothing = 0.1
        config.mesh.shape = shape
        results.append(decoder_loss_and_gradients(config, devices, batch, tokenizer.vocab_size))
    (loss_1, parts_1, grads_1) = results[0]
    assert set(parts_1) == {"contrastive_loss", "caption_loss"}
    np.testing.assert_allclose(loss_1, parts_1["contrastive_loss"] + 2.0 * parts_1["caption_loss"], rtol=1e-6)
    assert np.max(np.abs(grads_1["decoder"]["layers"]["blocks"]["cross_attn"]["query"])) > gradient_floor(
        grads_1
    )
    for loss, parts, grads in results[1:]:
        assert rel_err(loss, loss_1) <= 1e-5
        for key in parts_1:
            assert rel_err(parts[key], parts_1[key]) <= 1e-5, key
        assert_gradients_equal(grads, grads_1)


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"model.text.causal": False, "model.text.pool": "mean"}, "model.decoder.input"),
        ({"model.decoder.tie_embedding": True, "model.decoder.width": 32}, "model.decoder.tie_embedding"),
        ({"model.decoder.input": "text_tower_raw", "model.decoder.width": 32}, "model.decoder.input"),
        ({"loss.caption_weight": 0.0}, "loss.caption_weight"),
        ({"loss.label_smoothing": 1.0}, "loss.label_smoothing"),
    ],
)
def test_a_decoder_config_that_cannot_train_is_one_line_naming_the_key(tfds_dir, overrides, key):
    config = _caption_config(tfds_dir, **overrides)
    with pytest.raises(ConfigError) as error:
        validate(config, num_devices=1, check_data=False)
    assert str(error.value).startswith(key) and "\n" not in str(error.value)


def test_without_a_decoder_the_model_has_no_decoder_parameters(tfds_dir):
    config = tiny_demo(tfds_dir)
    model = nnx.eval_shape(model_factory(config, vocab_size=VOCAB))
    assert model.decoder is None
    assert "decoder" not in nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_generated_captions_are_scored_on_what_they_state():
    from clipjax.data.sources.shapes import procedural as shapes
    from clipjax.evals.captioning import _attribute_scores

    captions = ["a small red circle in the top left", "a big blue square", "a green thing"]
    fields = {
        "shape": np.array([0, 2, 1]),  # the second image is a triangle, not a square
        "color": np.array([0, 2, 1]),
        "size": np.array([0, 1, 0]),
        "position": np.array([0, 3, 2]),
    }
    scores = _attribute_scores(shapes.parse_caption, captions, fields)
    assert scores["shape"] == {"stated": pytest.approx(2 / 3), "accuracy": 0.5}
    assert scores["color"] == {"stated": 1.0, "accuracy": 1.0}
    assert scores["size"] == {"stated": pytest.approx(2 / 3), "accuracy": 1.0}
    assert scores["position"] == {"stated": pytest.approx(1 / 3), "accuracy": 1.0}
    assert scores["all"] == {"stated": pytest.approx(8 / 12), "accuracy": pytest.approx(7 / 8)}


def test_greedy_captions_of_a_trained_tiny_coca_state_the_held_out_shapes(tfds_dir, tmp_path):
    """configs/coca_demo.py's model trained briefly as a captioner alone (contrastive weight 0)
    on the tests' tiny shapes data: the captions it writes for held-out images (the evaluator's,
    and `clipjax.load(...).caption`) parse back to those images' attributes far above chance."""
    import clipjax
    from clipjax.data.sources import make_source
    from clipjax.data.sources.shapes import procedural as shapes

    overrides = {
        "data.data_dir": tfds_dir,
        "steps": 150,
        "data.batch_size": 128,
        "log_every": 50,
        # No embedding-metrics steps: they would compile a second train step (45 s cold) for
        # figures this test does not read.
        "metrics.every": 0,
        "checkpoint_every": 150,
        "optim.lr": 5e-3,
        "loss.contrastive_weight": 0.0,
        "evals.captioning.generate_examples": 128,
        "evals.captioning.samples": 0,
        **{
            f"evals.{name}.enabled": False
            for name in ("zero_shot", "retrieval", "linear_probe", "knn", "embedding")
        },
    }
    # The one test whose time is running steps, not compiling them: trained in a process of its
    # own with LLVM's optimisations and XLA's fusion emitters on (tests/xla_flags.py turns them
    # off), the code the captioner was tuned with, 1.5x faster than at LLVM's level 0.
    env = {**os.environ, "XLA_FLAGS": optimised_code(os.environ.get("XLA_FLAGS", ""))}
    command = [sys.executable, "-m", "clipjax.train", "--config", str(ROOT / "configs" / "coca_demo.py:tiny")]
    command += ["--workdir", str(tmp_path / "run"), *(f"--config.{k}={v}" for k, v in overrides.items())]
    subprocess.run(command, env=env, check=True, capture_output=True)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    # 150 steps of 512 images (docs/captioning.md's demo trains 540 steps on 50,000 and states
    # 99% correctly): every attribute well above chance, the easy ones (colour, position) mostly right.
    attributes = report["captioning"]["attributes"]
    for name, classes in shapes.ATTRIBUTES.items():
        assert attributes[name]["stated"] >= 0.5, (name, attributes)
        assert attributes[name]["accuracy"] >= 1.5 / len(classes), (name, attributes)
    assert attributes["color"]["accuracy"] >= 0.6 and attributes["position"]["accuracy"] >= 0.6, attributes

    model = clipjax.load(str(tmp_path / "run"))
    held_out = make_source(model.config.data).eval_arrays(model.tokenizer, split="test", max_examples=8)
    captions = model.caption(held_out["image"])
    assert len(captions) == 8 and all(isinstance(c, str) and c for c in captions)
    correct = stated = 0
    for caption, *truth in zip(captions, *(held_out[name] for name in shapes.ATTRIBUTE_NAMES)):
        parsed = shapes.parse_caption(caption)
        for name, value in zip(shapes.ATTRIBUTE_NAMES, truth):
            stated += parsed[name] >= 0
            correct += parsed[name] == value
    assert stated >= 16 and correct >= 0.5 * stated, captions
