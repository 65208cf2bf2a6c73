"""LocCa: object boxes in the shapes records and through the decoder's crops, the three task
sequences, the referring-expression read-out, and the combined loss exact on 8 devices."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from clipjax.config import ConfigError, validate
from clipjax.data.decode import Decoder, Raw
from clipjax.data.drops import DropCounter
from clipjax.data.sources.shapes import procedural as shapes
from clipjax.evals.captioning import box_iou
from clipjax.models import generate, locca
from clipjax.models.text import PAD_ID
from tests.helpers import (
    assert_gradients_equal,
    decoder_loss_and_gradients,
    gradient_floor,
    rel_err,
    source_and_tokenizer,
    tiny_demo,
)

LAYOUT = locca.LoccaTokens(text_vocab=50, bins=33)


def _reference_sequence(row, box, task):
    """One example's task sequence and trained targets, written out as the docstring states."""
    real = [int(t) for t in row if t != PAD_ID]
    words, eos = real[1:-1], real[-1]
    coords = [int(c) for c in np.round(np.asarray(box) * (LAYOUT.bins - 1))]
    coords = [LAYOUT.first_coordinate + c for c in coords]
    start = LAYOUT.task_id(locca.TASKS[task])
    if task == 0:
        seq, first = [start, *words, eos], 1
    elif task == 1:
        seq, first = [start, *words, *coords, eos], 1 + len(words)
    else:
        seq, first = [start, *coords, *words, eos], 5
    length = len(row) + locca.EXTRA_CONTEXT
    trained = [1.0 if first <= p < len(seq) else 0.0 for p in range(1, length)]
    return seq + [PAD_ID] * (length - len(seq)), trained


def test_task_sequences_are_the_three_documented_layouts():
    rng = np.random.default_rng(0)
    length, b = 9, 12
    rows = []
    for i in range(b):
        n = int(rng.integers(0, length - 1))
        rows.append([48] + list(rng.integers(3, 47, n)) + [49] + [PAD_ID] * (length - 2 - n))
    tokens = jnp.array(rows, jnp.int32)
    boxes = jnp.asarray(np.sort(rng.random((b, 2, 2)), axis=1).reshape(b, 4)[:, [0, 2, 1, 3]], jnp.float32)
    tasks = jnp.array([i % 3 for i in range(b)], jnp.int32)
    seq, trained = locca.task_sequences(tokens, boxes, tasks, LAYOUT)
    for i in range(b):
        want_seq, want_trained = _reference_sequence(rows[i], boxes[i], int(tasks[i]))
        assert list(np.asarray(seq[i])) == want_seq, (i, int(tasks[i]))
        assert list(np.asarray(trained[i])) == want_trained, (i, int(tasks[i]))


def test_coordinates_of_pixel_edges_round_trip_exactly_with_side_plus_one_bins():
    edges = jnp.arange(33, dtype=jnp.float32) / 32
    back = LAYOUT.boxes(LAYOUT.box_tokens(edges))
    np.testing.assert_array_equal(np.asarray(back), np.asarray(edges))


def test_tasks_are_drawn_per_example_and_examples_without_a_box_are_captioned():
    boxes = jnp.tile(jnp.array([[0.1, 0.1, 0.6, 0.7]]), (600, 1)).at[::2].set(0.0)
    index = jnp.arange(600)
    tasks = np.asarray(locca.draw_tasks((1.0, 1.0, 2.0), boxes, index, seed=0, step=5))
    assert (tasks[::2] == 0).all()
    shares = np.bincount(tasks[1::2], minlength=3) / 300
    np.testing.assert_allclose(shares, [0.25, 0.25, 0.5], atol=0.08)
    # The same example gets the same task wherever it sits in the batch.
    shuffled = np.asarray(locca.draw_tasks((1.0, 1.0, 2.0), boxes[::-1], index[::-1], seed=0, step=5))
    np.testing.assert_array_equal(shuffled[::-1], tasks)


def test_shapes_boxes_are_tight_on_the_objects_pixels_and_leave_the_images_alone():
    data = shapes.generate_split(200, 3, 32, boxes=True)
    plain = shapes.generate_split(200, 3, 32)
    np.testing.assert_array_equal(data["image"], plain["image"])
    box = data["box"]
    assert box.shape == (200, 4) and (box[:, 2] > box[:, 0]).all() and (box[:, 3] > box[:, 1]).all()
    # Centres in the stated quadrant, large objects larger.
    cx, cy = (box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2
    vertical, horizontal = np.divmod(data["position"], 2)
    assert ((cx > 0.5) == (horizontal == 1)).all() and ((cy > 0.5) == (vertical == 1)).all()
    side = np.maximum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]) * 32
    assert side[data["size"] == 0].max() < side[data["size"] == 1].min()
    # The box is the tight box of the mask.
    mask = np.zeros((2, 8, 8), bool)
    mask[0, 2:5, 3:7] = True
    mask[1, 7, 0] = True
    np.testing.assert_array_equal(shapes.object_boxes(mask) * 8, [[3, 2, 7, 5], [0, 7, 1, 8]])


class _Records:
    """A reader over in-memory examples with boxes."""

    boxes = True

    def __init__(self, raws):
        self.raws = raws

    def __len__(self):
        return len(self.raws)

    def __call__(self, ids, epochs=None):
        return [self.raws[int(i)] for i in np.asarray(ids).reshape(-1)]


def _png(width, height, box):
    """A gray image with a red rectangle filling `box` (fractions)."""
    image = np.full((height, width, 3), 128, np.uint8)
    x0, y0, x1, y1 = np.round(np.asarray(box) * [width, height, width, height]).astype(int)
    image[y0:y1, x0:x1] = (255, 0, 0)
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def _red_box(image):
    ys, xs = np.nonzero((image[..., 0] > 200) & (image[..., 1] < 60))
    s = image.shape[0]
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / s


def test_boxes_follow_the_centre_and_random_crops_and_malformed_ones_are_dropped_and_counted():
    box = (0.55, 0.3, 0.8, 0.7)
    raws = [Raw(i, _png(96, 64, box), b"a red box", i, box=box) for i in range(6)]
    raws.append(Raw(6, _png(96, 64, box), b"broken", 6, box=(0.5, 0.2, 0.4, 0.9)))  # x_max < x_min
    raws.append(Raw(7, _png(96, 64, box), b"no box", 7, box=None))
    decoder = Decoder(_Records(raws), 32)
    drops = DropCounter()
    for crop in (decoder, decoder.with_random_crop((0.5, 1.0), seed=(0, 1))):
        out = drops(crop({"index": np.arange(8), "epoch": np.zeros(8, int)}))
        assert len(out["index"]) == 7 and out["box"].shape == (7, 4)
        np.testing.assert_array_equal(out["box"][6], np.zeros(4))  # none given
        for image, got in zip(out["image"][:6], out["box"][:6]):
            if got.any():  # a crop may cut the box away: then none
                np.testing.assert_allclose(got, _red_box(image), atol=1.5 / 32)
    assert drops.counts == {"bad_box": 2}


def test_box_iou():
    a = np.array([[0, 0, 1, 1], [0, 0, 0.5, 0.5], [0, 0, 0.5, 1]])
    b = np.array([[0, 0, 1, 1], [0.5, 0.5, 1, 1], [0.25, 0, 0.75, 1]])
    np.testing.assert_allclose(box_iou(a, b), [1.0, 0.0, 1 / 3])


def _locca_config(data_dir, **overrides):
    values = {
        "data.shapes_boxes": True,
        "model.decoder.variant": "tiny",
        "model.decoder.input": "embed",
        "model.decoder.tasks": "locca",
        "model.decoder.box_bins": 33,
        **overrides,
    }
    return tiny_demo(data_dir, **values)


def test_referring_boxes_equal_writing_each_coordinate_after_the_exact_prefix(tfds_dir):
    """The read-out passes the whole padded sequence; a per-example loop that feeds only the
    prefix written so far must give the same boxes (the causal mask hides the placeholders)."""
    from clipjax.models.two_towers import model_factory

    config = _locca_config(tfds_dir)
    model = model_factory(config, vocab_size=40)()
    head = model.decoder.head.kernel
    head[...] = jax.random.normal(jax.random.key(1), head.shape)
    images = jax.random.uniform(jax.random.key(2), (3, 32, 32, 3))
    rows = [[38, 5, 6, 39], [38, 7, 39], [38, 8, 9, 10, 11, 39]]
    length = config.data.tokenizer.max_len
    tokens = jnp.array([row + [0] * (length - len(row)) for row in rows])
    got = generate.referring_boxes(model, images, tokens)
    layout = locca.locca_tokens(model.decoder)
    memory = model.image_memory(images)
    # One compiled program per prefix length (run eagerly, each length compiled dozens of ops).
    last_logits = nnx.jit(lambda decoder, seq, memory: decoder(seq, memory)[0, -1])
    for i in range(3):
        words = [int(t) for t in tokens[i] if t][1:-1]
        seq = [layout.task_id("referring"), *words]
        for _ in range(4):
            logits = last_logits(model.decoder, jnp.array([seq]), memory[i : i + 1])
            first = layout.first_coordinate
            seq.append(first + int(jnp.argmax(logits[first : first + layout.bins])))
        np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(layout.boxes(jnp.array(seq[-4:]))))


def test_locca_loss_and_gradients_equal_one_device_on_8_ring_micro_batched(tfds_dir):
    base = _locca_config(tfds_dir)
    source, tokenizer = source_and_tokenizer(base.data)
    batch = next(source.train_iterator(tokenizer, seed=0))
    assert batch["box"].any(axis=1).all()
    batch = {k: batch[k] for k in ("image", "text", "text_id", "index", "box")}
    results = []
    for devices, shape, impl, micro in (
        (jax.devices()[:1], (1, 1, 1), "gather", 1),
        (jax.devices(), (4, 2, 1), "ring", 2),
    ):
        config = _locca_config(tfds_dir, **{"loss.impl": impl, "microbatches": micro})
        config.mesh.shape = shape
        results.append(decoder_loss_and_gradients(config, devices, batch, tokenizer.vocab_size, step=3))
    (loss_1, parts_1, grads_1), (loss_8, parts_8, grads_8) = results
    assert (
        rel_err(loss_8, loss_1) <= 1e-5 and rel_err(parts_8["caption_loss"], parts_1["caption_loss"]) <= 1e-5
    )
    assert_gradients_equal(grads_8, grads_1)
    floor = gradient_floor(grads_1)
    # The coordinate tokens were trained: their output columns have a gradient.
    layout = locca.LoccaTokens(tokenizer.vocab_size, 33)
    coords = grads_1["decoder"]["head"]["kernel"][:, layout.first_coordinate :]
    assert np.abs(coords).max() > floor


@pytest.mark.parametrize(
    "overrides,key",
    [
        (
            {"model.decoder.input": "text_tower", "model.text.causal": True, "model.text.pool": "last"},
            "model.decoder.tasks",
        ),
        ({"data.shapes_boxes": False}, "model.decoder.tasks"),
        ({"loss.locca_tasks": (0.0, 0.0, 0.0)}, "loss.locca_tasks"),
    ],
)
def test_a_locca_config_that_cannot_train_is_one_line_naming_the_key(tfds_dir, overrides, key):
    config = _locca_config(tfds_dir, **overrides)
    with pytest.raises(ConfigError) as error:
        validate(config, num_devices=1)
    assert str(error.value).startswith(key) and "\n" not in str(error.value)


def test_webdataset_boxes_come_from_a_json_field_and_reach_the_batches(tmp_path):
    import json
    import tarfile

    from clipjax.data.sources import make_source
    from tests.helpers import data_config
    from tests.test_webdataset import _add

    boxes = [(0.1, 0.2, 0.4, 0.6), (0.5, 0.1, 0.9, 0.5), None, (0.3, 0.3, 0.2, 0.9), (0.2, 0.5, 0.6, 0.9)]
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i, box in enumerate(boxes):
            key = f"{i:09d}"
            _add(tar, f"{key}.png", _png(48, 48, box or (0, 0, 0, 0)))
            _add(tar, f"{key}.txt", b"a red box")
            meta = {"key": key} if box is None else {"key": key, "object": {"box": list(box)}}
            _add(tar, f"{key}.json", json.dumps(meta).encode())
    config = dict(name="webdataset", shards=str(tmp_path / "00000.tar"), num_train=5, image_size=24)
    source = make_source(
        data_config(box_field="object/box", batch_size=2, **config, **{"tokenizer.kind": "byte"})
    )
    drops = DropCounter()
    arrays = source.eval_arrays(source.tokenizer(), drops=drops)
    assert drops.counts == {"bad_box": 1}  # x_max < x_min
    want = np.array([boxes[0], boxes[1], (0, 0, 0, 0), boxes[4]], np.float32)
    np.testing.assert_allclose(np.sort(arrays["box"], axis=0), np.sort(want, axis=0), atol=1e-6)
    batch = next(source.train_iterator(source.tokenizer(), seed=0))
    assert batch["box"].shape == (2, 4)
    plain = make_source(data_config(**config, **{"tokenizer.kind": "byte"}))
    assert "box" not in plain.eval_arrays(plain.tokenizer())
