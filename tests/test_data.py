"""Tests of the data layer: shapes generator, tfds builders, tokenizers, pipeline."""

import collections
import os
import pickle
import re
import threading

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from clipjax.captions import caption_text_id, normalize_caption
from clipjax.data.sources.image_text_folder import builder as folder_tfds
from clipjax.data.drops import DropCounter
from clipjax.data.decode import BATCH_KEYS
from clipjax.data import records
from clipjax.data.sources.shapes import procedural as shapes
from clipjax.data.sources.shapes import builder as shapes_tfds
from clipjax.data import tokenizers
from clipjax.data.sources import make_source
from clipjax.schema import ConfigError
from tests.helpers import data_config

NUM_TRAIN, NUM_TEST, IMAGE_SIZE, SEED = 96, 32, 32, 5


def _config(data_dir, **overrides):
    cfg = {
        "name": "shapes",
        "data_dir": str(data_dir),
        "batch_size": 16,
        "image_size": IMAGE_SIZE,
        "num_train": NUM_TRAIN,
        "num_test": NUM_TEST,
        "shapes_seed": SEED,
        "tokenizer.kind": "sentencepiece",
        "tokenizer.max_len": 16,
        "tokenizer.vocab_size": 500,
    }
    cfg.update(overrides)
    return data_config(**cfg)


def _source(data_dir, **overrides):
    return make_source(_config(data_dir, **overrides))


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    shapes_tfds.prepare_shapes(str(data_dir), IMAGE_SIZE, NUM_TRAIN, NUM_TEST, SEED)
    return data_dir


@pytest.fixture(scope="module")
def sp_tokenizer(shapes_dir):
    return _source(shapes_dir).tokenizer()


# ---------------------------------------------------------------------------
# shapes generator


def test_generate_split_is_deterministic_and_typed():
    a = shapes.generate_split(300, seed=1)
    b = shapes.generate_split(300, seed=1)
    c = shapes.generate_split(300, seed=2)
    assert set(a) == {"image", "caption", "text_id", "index", "label", "shape", "color", "size", "position"}
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["image"], c["image"])
    assert not np.array_equal(a["label"], c["label"])
    assert a["image"].dtype == np.uint8 and a["image"].shape == (300, 32, 32, 3)
    for k in ("text_id", "index", "label", "shape", "color", "size", "position"):
        assert a[k].dtype == np.int32 and a[k].shape == (300,)
    np.testing.assert_array_equal(a["index"], np.arange(300))
    np.testing.assert_array_equal(
        a["label"], shapes.concept_id(a["shape"], a["color"], a["size"], a["position"])
    )
    # A shorter split is a prefix of a longer one; captions need no rendering.
    long = shapes.generate_split(1100, seed=1, with_images=False)
    np.testing.assert_array_equal(long["label"][:300], a["label"])
    assert list(long["caption"][:300]) == list(a["caption"])
    assert shapes.generate_captions(300, 1) == list(a["caption"])
    np.testing.assert_array_equal(shapes.generate_split(1030, seed=1)["image"][:300], a["image"])
    small = shapes.generate_split(4, seed=1, image_size=48)
    assert small["image"].shape == (4, 48, 48, 3)


def test_every_concept_is_reachable_and_rendered_where_it_should_be():
    labels = shapes.generate_split(4000, seed=0, with_images=False)["label"]
    assert set(labels.tolist()) == set(range(shapes.NUM_CONCEPTS)) and shapes.NUM_CONCEPTS == 320

    concepts = np.arange(shapes.NUM_CONCEPTS)
    shp, col, siz, pos = shapes.concept_attributes(concepts)
    np.testing.assert_array_equal(shapes.concept_id(shp, col, siz, pos), concepts)
    images = shapes.render(shp, col, siz, pos, np.random.default_rng(0)).astype(np.float32)
    target = shapes._RGB[col][:, None, None, :]
    on_object = np.linalg.norm(images - target, axis=-1) < 60
    area = on_object.sum(axis=(1, 2))
    assert area.min() > 20
    # Large objects cover clearly more pixels than small ones of the same kind.
    for s in range(len(shapes.SHAPES)):
        small_area = area[(shp == s) & (siz == 0)].mean()
        large_area = area[(shp == s) & (siz == 1)].mean()
        assert large_area > 1.8 * small_area
    ys, xs = np.mgrid[:32, :32]
    cy = (on_object * ys).sum(axis=(1, 2)) / area
    cx = (on_object * xs).sum(axis=(1, 2)) / area
    np.testing.assert_array_equal(cy > 16, pos // 2 == 1)
    np.testing.assert_array_equal(cx > 16, pos % 2 == 1)


def test_captions_mention_the_right_attributes():
    data = shapes.generate_split(3000, seed=3, with_images=False)
    mentioned = collections.Counter()
    generic = 0
    for i, caption in enumerate(data["caption"]):
        assert caption == normalize_caption(caption)  # lowercase, no punctuation
        parsed = shapes.parse_caption(caption)
        for attr in shapes.ATTRIBUTE_NAMES:
            if parsed[attr] >= 0:
                assert parsed[attr] == data[attr][i], (caption, attr)
                mentioned[attr] += 1
        words = caption.split()
        if parsed["shape"] < 0:
            generic += 1
            assert set(words) & {"object", "shape", "thing"}, caption
    n = len(data["caption"])
    assert abs(mentioned["color"] / n - 0.85) < 0.04
    assert abs(mentioned["size"] / n - 0.85) < 0.04
    assert abs(mentioned["position"] / n - 0.85) < 0.04
    assert abs(mentioned["shape"] / n - 0.90) < 0.03
    assert generic == n - mentioned["shape"]
    # Paraphrases and synonyms are all used.
    words = collections.Counter(w for c in data["caption"] for w in c.split())
    for w in ("little", "tiny", "big", "upper", "lower", "corner", "picture", "see"):
        assert words[w] > 0, w
    patterns = (
        "^there is",
        "^a picture of",
        "^an image with",
        "^the .* is",
        " that is ",
        "you can see",
        "^(in|at) the .* there is",
        "^an? [a-z]+ [a-z]+",
    )
    for pattern in patterns:
        assert any(re.search(pattern, c) for c in data["caption"]), pattern
    # Short captions recur, so equal texts do appear inside a batch.
    assert max(collections.Counter(data["caption"]).values()) >= 3


def test_text_id_equal_iff_normalised_captions_equal():
    assert normalize_caption("  A  Red,  circle!\n") == "a red circle"
    # Stable across processes and Python versions (crc32, not hash()).
    assert caption_text_id("A  red circle, in the TOP left!") == 204153476
    captions = list(shapes.generate_split(3000, seed=4, with_images=False)["caption"])
    captions += ["A red circle.", "a red circle", "a  red   circle!", "a red square"]
    by_id, by_text = {}, {}
    for c in captions:
        norm, tid = normalize_caption(c), caption_text_id(c)
        assert 0 <= tid < 2**31
        assert by_id.setdefault(tid, norm) == norm
        assert by_text.setdefault(norm, tid) == tid
    data = shapes.generate_split(50, seed=4, with_images=False)
    assert [caption_text_id(c) for c in data["caption"]] == data["text_id"].tolist()


def test_zero_shot_prompts_use_only_caption_words():
    seen = {w for c in shapes.generate_captions(5000, 0) for w in c.split()}
    assert seen == shapes.caption_vocabulary()
    tasks = shapes.zero_shot_tasks()
    assert list(tasks) == ["shape", "color", "size", "position"]
    for attr, (classes, templates) in tasks.items():
        assert classes == list(shapes.ATTRIBUTES[attr])
        assert len(templates) >= 3
        for t in templates:
            for c in classes:
                prompt = t.format(c)
                assert set(prompt.split()) <= seen, prompt
                assert not re.search(r"\ba [aeiou]", prompt), prompt


# ---------------------------------------------------------------------------
# tfds builders


def test_shapes_tfds_round_trip(shapes_dir):
    name = shapes_tfds.config_name(IMAGE_SIZE, NUM_TRAIN, NUM_TEST, SEED)
    sources = tfds.data_source(f"shapes/{name}", data_dir=str(shapes_dir), download=False)
    for split, num, seed in (("train", NUM_TRAIN, SEED), ("test", NUM_TEST, shapes_tfds.test_seed(SEED))):
        ds = sources[split]
        expected = shapes.generate_split(num, seed, IMAGE_SIZE)
        assert len(ds) == num
        got = [ds[i] for i in range(num)]
        for k in expected:
            values = [g[k] for g in got]
            if k == "caption":
                assert [v.decode() for v in values] == list(expected[k])
            else:
                np.testing.assert_array_equal(np.stack(values), expected[k])
    # The pipeline's fast parser agrees with tfds' own decoding.
    got = [sources["train"][i] for i in (0, 7)]
    raw = _source(shapes_dir).records("train")
    fast = records.parse(raw.__getitems__([0, 7]), ("label", "text_id"), ("caption", "image"))
    for j in range(2):
        assert fast["label"][j] == got[j]["label"] and fast["caption"][j] == got[j]["caption"]
        assert fast["text_id"][j] == got[j]["text_id"]
        assert fast["image"][j] == got[j]["image"].tobytes()


def test_prepare_is_idempotent_and_safe_concurrently(tmp_path):
    errors, builders = [], []

    def prepare():
        try:
            builders.append(shapes_tfds.prepare_shapes(str(tmp_path), 8, 12, 4, 1))
        except Exception as e:  # pylint: disable=broad-except
            errors.append(e)

    threads = [threading.Thread(target=prepare) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(len(b.as_data_source("train")) == 12 for b in builders)
    info = next(tmp_path.glob("shapes/s8_train12_test4_seed1/1.0.0/dataset_info.json"))
    mtime = info.stat().st_mtime_ns
    shapes_tfds.prepare_shapes(str(tmp_path), 8, 12, 4, 1)
    assert info.stat().st_mtime_ns == mtime
    assert len(list(tmp_path.glob("shapes/*"))) == 2  # config dir + .config


def test_a_builder_made_while_another_writer_finishes_is_not_returned_without_splits(tmp_path):
    """CI once saw a concurrent caller get a builder whose splits were empty: it was made just
    before the other writer moved the data into place, and asked `is_prepared` just after."""
    import shutil

    from clipjax.data import tfds_util

    written = shapes_tfds.prepare_shapes(str(tmp_path / "written"), 8, 12, 4, 1)
    target = tmp_path / "target"
    early = shapes_tfds.shapes_builder(str(target), 8, 12, 4, 1)  # made before the data exists
    shutil.copytree(os.path.dirname(os.path.dirname(written.data_dir)), target / "shapes")
    made = iter([early])

    def make_builder():
        return next(made, None) or shapes_tfds.shapes_builder(str(target), 8, 12, 4, 1)

    builder = tfds_util.prepare_once(make_builder, str(target))
    assert len(builder.as_data_source("train")) == 12


def _write_folder(root):
    """Six good image-caption pairs and three bad ones."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    good = {}
    sizes = [(20, 30), (40, 24), (16, 16), (33, 17), (25, 25), (18, 40)]
    for i, (w, h) in enumerate(sizes):
        mode = ("RGB", "L", "RGBA")[i % 3]
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(root / f"img{i}.png")
        caption = f"A photo, number {i}."
        (root / f"img{i}.txt").write_text(caption + "\n", encoding="utf-8")
        good[f"img{i}.png"] = caption
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    (root / "corrupt.txt").write_text("a corrupt image", encoding="utf-8")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "empty.png")
    (root / "empty.txt").write_text("   \n", encoding="utf-8")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "latin.png")
    (root / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    return good


def folder_config(source, data_dir, **overrides):
    """An image_text_folder data config over `_write_folder`'s pairs: no test split, the bad third
    tolerated, byte tokens."""
    cfg = {
        "name": "image_text_folder",
        "data_dir": str(data_dir),
        "source": str(source),
        "test_fraction": 0.0,
        "max_bad_fraction": 0.5,
        "batch_size": 4,
        "image_size": 8,
        "tokenizer.kind": "byte",
        "tokenizer.max_len": 16,
    }
    cfg.update(overrides)
    return data_config(**cfg)


def test_folder_builder_and_pipeline_skip_bad_records(tmp_path):
    good = _write_folder(tmp_path / "pairs")
    cfg = {
        "name": "image_text_folder",
        "data_dir": str(tmp_path / "tfds"),
        "source": str(tmp_path / "pairs"),
        "test_fraction": 0.0,
        "max_bad_fraction": 0.5,
        "batch_size": 4,
        "image_size": 12,
        "tokenizer.kind": "byte",
        "tokenizer.max_len": 24,
    }
    source = make_source(data_config(**cfg))
    source.prepare()
    assert source.builder.name == "image_text_folder"
    ds = source.builder.as_data_source("train")
    assert len(ds) == 9
    assert all(r["label"] == -1 for r in ds)
    tok = source.tokenizer()

    drops = DropCounter()
    arrays = source.eval_arrays(tok, split="train", drops=drops)
    assert drops.counts == {"bad_image": 1, "bad_caption": 2}
    assert sorted(arrays["caption"]) == sorted(good.values())
    assert arrays["image"].shape == (6, 12, 12, 3) and arrays["image"].dtype == np.uint8
    assert arrays["text_id"].tolist() == [caption_text_id(c) for c in arrays["caption"]]
    assert (arrays["label"] == -1).all()
    # Two processes' contiguous shares of the 9 records (5 and 4), damaged ones dropped in each:
    # together, in order, what one process reads, each record decoded once.
    parts = [source.eval_arrays(tok, split="train", drops=drops, process=(i, 2)) for i in range(2)]
    assert drops.counts == {"bad_image": 2, "bad_caption": 4}
    for key, value in arrays.items():
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value, err_msg=key)

    it = source.train_iterator(tok, seed=0)
    seen = collections.Counter()
    for _ in range(6):  # 24 examples = 4 epochs of the 6 good ones
        batch = next(it)
        assert batch["image"].shape == (4, 12, 12, 3)
        seen.update(batch["index"].tolist())
    assert set(seen) == set(arrays["index"].tolist())
    assert set(seen.values()) == {4}
    assert it.drop_counts["bad_image"] >= 3 and it.drop_counts["bad_caption"] >= 6
    # A third of the records is bad: fine below the limit, an error above it.
    lenient = make_source(data_config(**{**cfg, "max_bad_fraction": 0.4})).train_iterator(tok, seed=0)
    for _ in range(6):
        next(lenient)
    strict = make_source(data_config(**{**cfg, "max_bad_fraction": 0.1})).train_iterator(tok, seed=0)
    # (Past the 20 bad records a small folder is always allowed; the error names records.)
    with pytest.raises(ValueError, match=r"max_bad_fraction=0.1 of them; first: record \d+ \(bad_"):
        for _ in range(30):
            next(strict)

    # Same pairs listed in a CSV (relative and absolute paths, quoted commas).
    csv_path = tmp_path / "pairs.csv"
    lines = ["image,caption"]
    for i, (name, caption) in enumerate(sorted(good.items())):
        path = f"pairs/{name}" if i % 2 else str(tmp_path / "pairs" / name)
        lines.append(f'{path},"{caption}"')
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    arrays = make_source(data_config(**{**cfg, "source": str(csv_path)})).eval_arrays(tok, split="train")
    assert list(arrays["caption"]) == [c for _, c in sorted(good.items())]
    np.testing.assert_array_equal(arrays["index"], np.arange(6))

    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("path,text\nx.png,hello\n", encoding="utf-8")
    with pytest.raises(ValueError, match="image,caption"):
        make_source(data_config(**{**cfg, "source": str(bad_csv)})).prepare()
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        make_source(data_config(**{**cfg, "source": str(missing)})).prepare()
    with pytest.raises(ValueError, match="no split 'test'.*test_fraction"):
        source.eval_arrays(tok, split="test")


def test_worker_processes_decode_and_report_drops(tmp_path):
    _write_folder(tmp_path / "pairs")
    cfg = folder_config(tmp_path / "pairs", tmp_path / "tfds", worker_count=1)
    tok = tokenizers.make_tokenizer(cfg.tokenizer)
    it = make_source(cfg).train_iterator(tok, seed=1)
    try:
        indices = np.concatenate([next(it)["index"] for _ in range(3)])
        assert len(set(indices[:6].tolist())) == 6
        # Decoding happened in the worker; the counts still reach this process.
        assert it.drop_counts["bad_image"] >= 1 and it.drop_counts["bad_caption"] >= 2
    finally:
        it.close()


def test_folder_test_fraction_holds_out_a_split(tmp_path):
    _write_folder(tmp_path / "pairs")
    builder = folder_tfds.prepare_folder(str(tmp_path / "tfds"), str(tmp_path / "pairs"), test_fraction=0.4)
    train, test = builder.as_data_source("train"), builder.as_data_source("test")
    assert len(train) + len(test) == 9 and len(test) > 0


@pytest.mark.parametrize("fraction,empty", [(0.001, "test"), (0.9999, "train")])
def test_a_test_fraction_that_leaves_a_split_empty_is_one_line(tmp_path, fraction, empty):
    """tfds refused the empty split with `AssertionError: ... No examples were yielded` (exit 1)."""
    _write_folder(tmp_path / "pairs")
    with pytest.raises(ConfigError) as error:
        folder_tfds.prepare_folder(str(tmp_path / "tfds"), str(tmp_path / "pairs"), test_fraction=fraction)
    assert str(error.value) == (
        f"data.test_fraction: {fraction:g} of the 9 pairs leaves the {empty} split empty (files are held "
        "out by a hash of their path); give a fraction that holds out some but not all, "
        "data.eval_source, or 0 for no test split"
    )


# ---------------------------------------------------------------------------
# tokenizers


def test_byte_tokenizer():
    tok = tokenizers.ByteTokenizer(max_len=8)
    assert tok.vocab_size == 259 and tok.pad_id == 0
    ids = tok.encode(["ab", "", "héllo wörld", b"xyz"])
    assert ids.dtype == np.int32 and ids.shape == (4, 8)
    np.testing.assert_array_equal(ids[0], [1, ord("a") + 3, ord("b") + 3, 2, 0, 0, 0, 0])
    np.testing.assert_array_equal(ids[1], [1, 2, 0, 0, 0, 0, 0, 0])
    assert ids[2, -1] == tok.eos_id and (ids[2] != 0).all()  # truncated, eos kept
    assert tok.decode(ids[0]) == "ab" and tok.decode(ids[3]) == "xyz"
    assert tok.decode(tokenizers.ByteTokenizer(32).encode(["héllo wörld"])[0]) == "héllo wörld"
    assert ids.max() < tok.vocab_size


def test_sentencepiece_is_word_level_and_covers_prompts(shapes_dir, sp_tokenizer):
    tok = sp_tokenizer
    assert tok.pad_id == 0 and tok.vocab_size <= 500
    pieces = tok.pieces()
    assert pieces[0] == "<pad>" and len(pieces) == tok.vocab_size
    captions = shapes.generate_captions(200, 11)
    ids = tok.encode(captions)
    assert ids.dtype == np.int32 and ids.shape == (200, 16)
    for caption, row in zip(captions, ids):
        real = row[row != 0]
        assert real[0] == tok.bos_id and real[-1] == tok.eos_id
        assert len(real) - 2 == len(caption.split())  # one token per word
        assert tok.unk_id not in real
        assert tok.decode(row) == caption
    prompts = shapes.zero_shot_prompts()
    assert tok.unk_id not in tok.encode(prompts)
    # Pickles (grain worker processes) and reproduces the same ids.
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tok)).encode(captions), ids)


def test_make_tokenizer_caches_and_reports_missing_files(tmp_path):
    texts = shapes.generate_captions(500, 0) + shapes.zero_shot_prompts()
    cfg = dict(kind="sentencepiece", max_len=12, vocab_size=5000)
    a = tokenizers.make_tokenizer(cfg, texts_for_training=texts, cache_dir=str(tmp_path))
    models = list(tmp_path.glob("*.model"))
    assert len(models) == 1
    mtime = models[0].stat().st_mtime_ns
    b = tokenizers.make_tokenizer(cfg, texts_for_training=texts, cache_dir=str(tmp_path))
    assert models[0].stat().st_mtime_ns == mtime and a.pieces() == b.pieces()
    # Training is deterministic, so hosts that train separately agree.
    other = tokenizers.train_sentencepiece(texts, str(tmp_path / "again"), 5000)
    assert tokenizers.SentencePieceTokenizer(other, 12).pieces() == a.pieces()
    c = tokenizers.make_tokenizer(dict(cfg, model_file=str(models[0])))
    assert c.pieces() == a.pieces()
    missing = str(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        tokenizers.make_tokenizer(dict(cfg, model_file=missing))
    assert isinstance(tokenizers.make_tokenizer(dict(kind="byte", max_len=5)), tokenizers.ByteTokenizer)
    with pytest.raises(ValueError, match="data.tokenizer.kind"):
        tokenizers.make_tokenizer(dict(kind="nope"))


# ---------------------------------------------------------------------------
# pipeline


def test_train_batches_have_the_agreed_keys_and_types(shapes_dir, sp_tokenizer):
    cfg = _config(shapes_dir)
    it = make_source(cfg).train_iterator(sp_tokenizer, seed=0)
    batch = next(it)
    assert list(batch) == list(BATCH_KEYS)
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (16, 32, 32, 3)
    assert batch["text"].dtype == np.int32 and batch["text"].shape == (16, 16)
    for k in ("text_id", "index", "label"):
        assert batch[k].dtype == np.int32 and batch[k].shape == (16,)
    expected = shapes.generate_split(NUM_TRAIN, SEED)
    idx = batch["index"]
    np.testing.assert_array_equal(batch["image"], expected["image"][idx])
    np.testing.assert_array_equal(batch["label"], expected["label"][idx])
    np.testing.assert_array_equal(batch["text_id"], expected["text_id"][idx])
    np.testing.assert_array_equal(batch["text"], sp_tokenizer.encode(expected["caption"][idx]))


def test_processes_split_each_global_batch_and_cover_each_epoch(shapes_dir, sp_tokenizer):
    cfg = _config(shapes_dir)  # global batch 16 -> 8 per process; 96 records = 6 steps an epoch
    single = make_source(cfg).train_iterator(sp_tokenizer, seed=3)
    parts = [
        make_source(cfg).train_iterator(sp_tokenizer, seed=3, process_index=p, process_count=2)
        for p in range(2)
    ]
    epochs = []
    for _ in range(2):
        seen = []
        for _ in range(6):
            whole = next(single)["index"]
            local = [next(it)["index"] for it in parts]
            assert all(len(x) == 8 for x in local)
            assert not set(local[0].tolist()) & set(local[1].tolist())  # disjoint at every step
            # The global batch is the same whatever the number of processes.
            np.testing.assert_array_equal(np.concatenate(local), whole)
            seen.append(whole)
        epoch = np.concatenate(seen)
        assert sorted(epoch.tolist()) == list(range(96))  # every record once per epoch
        epochs.append(epoch)
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled


def test_iterator_state_resumes_at_the_same_batch(shapes_dir, sp_tokenizer):
    cfg = _config(shapes_dir, batch_size=40)  # batches straddle epoch boundaries
    it = make_source(cfg).train_iterator(sp_tokenizer, seed=7)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    fresh = make_source(cfg).train_iterator(sp_tokenizer, seed=7)
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    # Same seed, same stream; another seed, another order.
    again = make_source(cfg).train_iterator(sp_tokenizer, seed=7)
    first = next(again)["index"]
    it2 = make_source(cfg).train_iterator(sp_tokenizer, seed=7)
    np.testing.assert_array_equal(next(it2)["index"], first)
    for other, seed in (
        (_config(shapes_dir, batch_size=40), 8),
        (_config(shapes_dir, batch_size=40, shuffle_seed=1), 7),
    ):
        it3 = make_source(other).train_iterator(sp_tokenizer, seed=seed)
        assert not np.array_equal(next(it3)["index"], first)


def _thread_gathers(count):
    """One `gather` per simulated process, meeting like a collective: each call waits for all."""
    slots, barrier = [None] * count, threading.Barrier(count)

    def gather_of(p):
        def gather(own):
            slots[p] = own
            barrier.wait()
            out = list(slots)
            barrier.wait()
            return out

        return gather

    return [gather_of(p) for p in range(count)]


def _states_together(iterators):
    """get_state() of every simulated process, called at once as JAX processes would."""
    out = [None] * len(iterators)

    def run(p):
        out[p] = iterators[p].get_state()

    threads = [threading.Thread(target=run, args=(p,)) for p in range(len(iterators))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_each_process_resumes_at_its_own_position_when_drops_differ(tmp_path):
    # A third of the records is bad, so the two processes drop different numbers and drift
    # apart in the stream of chunks: one position for both would repeat or skip examples.
    _write_folder(tmp_path / "pairs")
    cfg = folder_config(tmp_path / "pairs", tmp_path / "tfds")
    source = make_source(cfg)
    source.prepare()
    tok = source.tokenizer()

    def processes():
        gathers = _thread_gathers(2)
        return [
            source.train_iterator(tok, seed=2, process_index=p, process_count=2) for p in range(2)
        ], gathers

    def start():
        its, gathers = processes()
        for it, gather in zip(its, gathers):
            it._iterator._gather = gather  # what process_gather gives on a real 2-process run
        return its

    reference = start()
    expected = [[next(it)["index"].tolist() for _ in range(12)] for it in reference]
    resumed_somewhere_uneven = False
    for stop in range(1, 8):
        first = start()
        for it in first:
            for _ in range(stop):
                next(it)
        states = _states_together(first)
        assert states[0] == states[1]  # one gathered state, saved by process 0
        positions = states[0]["processes"]
        resumed_somewhere_uneven |= positions["0"] != positions["1"]
        again = start()
        for it in again:
            it.set_state(states[0])
        for p, it in enumerate(again):
            got = [next(it)["index"].tolist() for _ in range(12 - stop)]
            assert got == expected[p][stop:], (stop, p)
    assert resumed_somewhere_uneven  # the case the per-process positions exist for


def test_load_split_arrays_and_texts(shapes_dir, sp_tokenizer, tmp_path):
    source = _source(shapes_dir)
    arrays = source.eval_arrays(sp_tokenizer, split="test")
    expected = shapes.generate_split(NUM_TEST, shapes_tfds.test_seed(SEED))
    assert set(arrays) == {
        "image",
        "text",
        "text_id",
        "index",
        "label",
        "caption",
        "shape",
        "color",
        "size",
        "position",
    }
    for k in ("image", "text_id", "index", "label", "shape", "color", "size", "position"):
        np.testing.assert_array_equal(arrays[k], expected[k])
    assert list(arrays["caption"]) == list(expected["caption"])
    np.testing.assert_array_equal(arrays["text"], sp_tokenizer.encode(expected["caption"]))
    few = source.eval_arrays(sp_tokenizer, split="train", max_examples=5)
    assert few["image"].shape == (5, 32, 32, 3)

    assert source.caption_texts() == shapes.generate_captions(NUM_TRAIN, SEED)
    assert source.zero_shot_tasks() == shapes.zero_shot_tasks()
    unlabelled = tmp_path / "pairs.csv"
    unlabelled.write_text("image,caption\nx.png,a photo\n")
    folder = make_source(data_config(name="image_text_folder", source=str(unlabelled)))
    assert folder.zero_shot_tasks() == {}


def test_clear_errors_for_bad_settings(tmp_path, sp_tokenizer):
    with pytest.raises(ValueError, match="data.data_dir"):
        make_source(data_config(name="shapes", data_dir=""))
    with pytest.raises(ValueError, match="data.name"):
        make_source(data_config(name="imagenet", data_dir=str(tmp_path)))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=re.escape(str(blocker / "sub"))):
        _source(blocker / "sub").prepare()
    if os.geteuid() != 0:  # root may write anywhere
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match="not writable"):
            _source(read_only).prepare()
    with pytest.raises(ValueError, match="divisible"):
        _source(tmp_path, batch_size=15).train_iterator(
            sp_tokenizer, seed=0, process_index=0, process_count=2
        )
