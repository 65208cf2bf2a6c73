"""Own data is evaluated like the built-in data: labels from a CSV column, zero-shot from their
names, a separate held-out CSV, and every evaluator that cannot run named with its reason."""

import io
import json

import jax
import numpy as np
import sentencepiece as spm
from PIL import Image

from clipjax import trainer as train_lib
from clipjax.api import evaluate_workdir, load_run_config
from clipjax.data.tokenizers import SentencePieceTokenizer, train_sentencepiece
from clipjax import prompts
from clipjax.evals.zero_shot import unreadable_class_names
from tests.helpers import tiny_demo

CLASSES = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def _write_csv(root, name, count, *, labels=True, seed=0):
    """`count` noisy solid-colour images, captioned in two phrasings, labelled with the colour."""
    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = ["image,caption,label" if labels else "image,caption"]
    for i in range(count):
        color = list(CLASSES)[i % 3]
        pixels = np.clip(np.array(CLASSES[color]) + rng.normal(0, 25, (24, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"{name}{i}.png")
        caption = f"a {color} picture" if i % 2 else f"a picture that is {color}"
        rows.append(f"images/{name}{i}.png,{caption}" + (f",{color}" if labels else ""))
    path = root / f"{name}.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _config(tmp_path, source, **overrides):
    config = tiny_demo(str(tmp_path / "tfds"), steps=4, log_every=1, **overrides)
    config.data.name = "image_text_folder"
    config.data.num_train = 0  # the CSV's count (the tiny demo's 512 are shapes')
    config.data.source = str(source)
    config.data.tokenizer.kind = "byte"
    config.data.tokenizer.max_len = 32
    config.data.batch_size = 16
    config.evals.knn.train_examples = 40
    config.evals.linear_probe.train_examples = 40
    return config


def test_a_labelled_csv_gets_zero_shot_knn_probes_and_concept_retrieval(tmp_path):
    train_csv = _write_csv(tmp_path, "train", 60)
    held_out = _write_csv(tmp_path, "held", 21, seed=1)
    config = _config(tmp_path, train_csv, **{"data.eval_source": str(held_out)})
    report = train_lib.train(config, str(tmp_path / "run"), log=lambda _: None)
    assert "skipped" not in report, report.get("skipped")
    assert report["num_examples"] == 21  # the separate held-out CSV, all of it
    assert set(report["zero_shot"]) == {"label", "mean_top1"}
    assert set(report["zero_shot"]["label"]["per_class"]) == set(CLASSES)
    assert "top1" in report["linear_probe"] and "top1@k1" in report["knn"]
    # Concept-aware retrieval counts the other captions of the same colour: at least the strict recall.
    i2t, strict = report["retrieval"]["image_to_text"], report["retrieval"]["strict"]["image_to_text"]
    assert i2t["R@1"] >= strict["R@1"] and i2t != strict

    # Evaluated later on another held-out CSV: the run's tokenizer and model, nothing retrained.
    other = _write_csv(tmp_path, "other", 9, seed=2)
    config = load_run_config(str(tmp_path / "run"))
    config.data.eval_source = str(other)
    again = evaluate_workdir(
        str(tmp_path / "run"), out=str(tmp_path / "eval"), config=config, devices=jax.devices()[:1]
    )
    assert again["num_examples"] == 9 and "label" in again["zero_shot"]
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["num_examples"] == 9


def test_evaluators_that_cannot_run_are_named_with_their_reason(tmp_path):
    train_csv = _write_csv(tmp_path, "train", 60, labels=False)
    config = _config(tmp_path, train_csv, **{"data.test_fraction": 0.3})
    lines = []
    report = train_lib.train(config, str(tmp_path / "run"), log=lines.append)
    skipped = report["skipped"]
    assert set(skipped) == {"zero_shot", "linear_probe", "knn"}, skipped
    assert "names no classes" in skipped["zero_shot"] and "no class labels" in skipped["knn"]
    for name, reason in skipped.items():
        assert any(line == f"evals.{name} skipped: {reason}" for line in lines), (name, lines)
    assert "retrieval" in report and "zero_shot" not in report


def test_zero_shot_with_the_default_tokenizer_and_templates_is_far_above_chance(tmp_path):
    """Captions without punctuation, CLIP's 80 templates that end in "." (the default), and the
    default tokenizer (sentencepiece trained on the captions): "red." must read as "red" then
    ".". Before the tokenizer split punctuation off words, every class name in every prompt was
    the unknown token and zero-shot scored 30% here (chance 33%)."""
    train_csv = _write_csv(tmp_path, "train", 60)
    held_out = _write_csv(tmp_path, "held", 30, seed=1)
    config = _config(tmp_path, train_csv, **{"data.eval_source": str(held_out)})
    config.data.tokenizer.kind, config.data.tokenizer.max_len = "sentencepiece", 16
    config.steps = 10
    lines = []
    report = train_lib.train(config, str(tmp_path / "run"), log=lines.append)
    assert report["zero_shot"]["label"]["top1"] >= 0.8, report["zero_shot"]
    assert not any("unknown to the tokenizer" in line for line in lines)


def _untrained_word_tokenizer(tmp_path, normalized: bool):
    captions = ["a red picture", "a picture that is green", "a blue picture"] * 4
    if normalized:
        return SentencePieceTokenizer(train_sentencepiece(captions, str(tmp_path / "new"), 64), 16)
    # A word model as this project trained them before: no normalisation rules in the model.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions),
        model_writer=model,
        model_type="word",
        vocab_size=64,
        hard_vocab_limit=False,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        minloglevel=2,
    )
    return SentencePieceTokenizer(model_proto=model.getvalue(), max_len=16)


def test_class_names_a_trained_tokenizer_cannot_read_are_found(tmp_path):
    templates = prompts.templates("imagenet")
    new = _untrained_word_tokenizer(tmp_path, normalized=True)
    assert unreadable_class_names(new, ["red", "Green", "blue"], templates) == []
    # A word no caption holds, and a name the context length cuts off.
    assert unreadable_class_names(new, ["red", "seven"], templates) == ["seven"]
    assert unreadable_class_names(new, ["red"], ["a picture that is " * 4 + "{}"]) == ["red"]
    # The tokenizer of before: "red." is one unknown word in every template that ends in ".".
    old = _untrained_word_tokenizer(tmp_path, normalized=False)
    assert unreadable_class_names(old, ["red", "green", "blue"], templates) == ["red", "green", "blue"]
    assert unreadable_class_names(old, ["red", "green"], ["a {} picture"]) == []
