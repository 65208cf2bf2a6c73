"""Labelled webdataset shards are evaluated as labelled CSVs are: labels from `.cls` members or a
`.json` field, class names from data.class_names, and zero-shot, kNN and the probes run on them."""

import json
import tarfile

import jax
import numpy as np

from clipjax import trainer as train_lib
from clipjax.api import evaluate_workdir, load_run_config
from clipjax.data.sources import make_source
from tests.helpers import data_config, tiny_demo
from tests.test_own_data_eval import CLASSES, _write_csv
from tests.test_webdataset import _add

NAMES = list(CLASSES)


def _shards_of(csv_path, folder, shards, label):
    """The CSV's rows (its images, captions and colour labels, in order) as webdataset shards:
    `label` 'cls' gives each sample a .cls member (the class number), 'json' a .json field."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = csv_path.read_text().splitlines()[1:]
    per_shard = -(-len(rows) // shards)
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i, row in enumerate(rows[shard * per_shard : (shard + 1) * per_shard]):
                image, caption, color = row.split(",")
                key = f"{shard:05d}{i:04d}"
                _add(tar, f"{key}.png", (csv_path.parent / image).read_bytes())
                _add(tar, f"{key}.txt", caption.encode())
                meta = {"key": key, "status": "success"}
                if label == "json":
                    meta["annotation"] = {"colour": color}
                _add(tar, f"{key}.json", json.dumps(meta).encode())
                if label == "cls":
                    _add(tar, f"{key}.cls", str(NAMES.index(color)).encode())
    return str(folder / (f"{{00000..{shards - 1:05d}}}.tar" if shards > 1 else "00000.tar"))


def test_cls_members_and_json_fields_label_samples_for_zero_shot_knn_and_probes(tmp_path):
    train_csv, held_csv = _write_csv(tmp_path, "train", 60), _write_csv(tmp_path, "held", 21, seed=1)
    shards = {
        label: (
            _shards_of(train_csv, tmp_path / label, 2, label),
            _shards_of(held_csv, tmp_path / label / "eval", 1, label),
        )
        for label in ("cls", "json")
    }
    names = ",".join(NAMES)

    # The labels as the decoder reads them: .cls numbers; a .json field's class names.
    json_source = make_source(
        data_config(
            name="webdataset",
            shards=shards["json"][0],
            eval_shards=shards["json"][1],
            num_train=60,
            label_field="annotation/colour",
            class_names=names,
            **{"tokenizer.kind": "byte"},
        )
    )
    arrays = json_source.eval_arrays(json_source.tokenizer())
    want = [NAMES.index(row.split(",")[2]) for row in held_csv.read_text().splitlines()[1:]]
    np.testing.assert_array_equal(arrays["label"], want)
    assert json_source.zero_shot_tasks()["label"][0] == NAMES

    config = tiny_demo(
        str(tmp_path / "data"),
        steps=4,
        log_every=1,
        **{
            "data.name": "webdataset",
            "data.shards": shards["cls"][0],
            "data.eval_shards": shards["cls"][1],
            "data.num_train": 60,
            "data.batch_size": 16,
            "data.class_names": names,
            "data.tokenizer.kind": "byte",
            "data.tokenizer.max_len": 32,
            "evals.knn.train_examples": 60,
            "evals.linear_probe.train_examples": 60,
        },
    )
    report = train_lib.train(config, str(tmp_path / "run"), log=lambda _: None)
    assert "skipped" not in report, report.get("skipped")
    assert report["num_examples"] == 21
    assert set(report["zero_shot"]["label"]["per_class"]) == set(NAMES)
    # Solid colours: the labels are learnable from the frozen image features.
    assert report["knn"]["top1@k1"] >= 0.9 and report["linear_probe"]["top1"] >= 0.9

    def evaluated(name, **data):
        config = load_run_config(str(tmp_path / "run"))
        config.data.name = name
        for key, value in data.items():
            config.data[key] = value
        return evaluate_workdir(
            str(tmp_path / "run"),
            out=str(tmp_path / name),
            config=config,
            devices=jax.devices()[:1],
            log=lambda _: None,
        )

    # The same held-out data as .json-labelled shards, and as the CSVs they were made of: the
    # same model scores exactly the same (the CSV path is the reference).
    by_json = evaluated(
        "webdataset", shards=shards["json"][0], eval_shards=shards["json"][1], label_field="annotation/colour"
    )
    by_csv = evaluated("image_text_folder", source=str(train_csv), eval_source=str(held_csv), class_names="")
    for other in (by_json, by_csv):
        assert "skipped" not in other
        for key in ("zero_shot", "knn", "linear_probe"):
            assert other[key] == report[key], key
