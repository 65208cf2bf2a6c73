"""A run stopped and resumed ends exactly where the uninterrupted run ends, for every data source
and training mode: the same state (parameters, optimizer, per-sample loss state) bit for bit, and
the same loss and drop counts at every step. (Resumes after a kill or a signal, in a bucket, or
with two processes: test_faults.py, test_object_store.py, test_multiprocess.py, test_webdataset.py.)"""

import json

import jax
import numpy as np
import pytest

from clipjax import trainer as train_lib
from clipjax.checkpoint import Checkpointer
from clipjax.config import apply_overrides
from tests.helpers import checkpoint_state, load_config, tiny_demo

STOP_AT = 3  # between two checkpoints: the stop saves a step no `checkpoint_every` would


# Each case: (its config, the straight run's workdir if one is trained already, its own checks of
# the straight run (workdir, report, final state)).


def shapes(tmp_path, request):
    """The tiny demo (image-text, the embedded shapes); its straight run is the shared one."""
    run = request.getfixturevalue("tiny_run")
    return run.config(), run.workdir, None


def own_csv(tmp_path, request):
    """Images and captions of a CSV, one epoch of its 37 rows at 8 a batch: 4 steps. The run stores
    the CSV's count as data.num_train; the resume, with num_train still 0, is no config change."""
    from tests.test_own_data_eval import _config, _write_csv

    config = _config(tmp_path, _write_csv(tmp_path, "train", 37), **{"epochs": 1.0, "evals.at_end": False})
    config.steps, config.data.batch_size, config.data.test_fraction = 0, 8, 0.0

    def check(workdir, report, state):
        assert max(_records(workdir)) == 4  # not 512 // 8 = 64: the tiny demo's shapes count
        assert json.loads((workdir / "config.json").read_text())["data"]["num_train"] == 37

    return config, None, check


def webdataset(tmp_path, request):
    """img2dataset shards with damaged samples (4 x 20 of 40 x 32 px), 6 steps of 16, evaluated
    on an eval shard of 32."""
    from tests.test_webdataset import _tiny_config, write_shards

    folder = tmp_path / "shards"
    write_shards(folder, per_shard=20, size=(40, 32))
    write_shards(folder / "eval", num_shards=1, per_shard=32, damage=False, seed=1)

    def check(workdir, report, state):
        assert report["num_examples"] == 32
        # 6 steps of 16 read every damaged sample of the 80 at least once.
        last = _records(workdir)[6]
        assert last["data_dropped"] >= 6
        assert all(last[f"data_dropped/{r}"] for r in ("bad_caption", "bad_image", "truncated_shard"))

    return _tiny_config(folder, tmp_path / "data"), None, check


def tfds(tmp_path, request):
    """A coco_captions-shaped tfds dataset: the tiny demo with one config change (its name)."""
    from tests.test_tfds_dataset import _SKIP_STATS, NUM, TinyCocoCaptions

    TinyCocoCaptions(data_dir=str(tmp_path / "tfds")).download_and_prepare(download_config=_SKIP_STATS)
    # (The tiny demo's data.num_train=512 sizes its shapes; 0 is the dataset's count.)
    overrides = {"data.name": "tfds", "data.tfds_name": "tiny_coco_captions/2014", "data.num_train": 0}
    config = tiny_demo(str(tmp_path / "tfds"), log_every=1, **overrides)

    def check(workdir, report, state):
        assert json.loads((workdir / "config.json").read_text())["data"]["num_train"] == NUM["train"]
        assert report["num_examples"] == NUM["test"]
        retrieval = report["retrieval"]
        assert 0.0 <= retrieval["image_to_text"]["R@1"] <= 1.0
        assert retrieval["image_to_text"] == retrieval["strict"]["image_to_text"]  # labels are -1
        assert not report.get("zero_shot")

    return config, None, check


def simclr_sogclr(tmp_path, request):
    """Image-image mode (SimCLR) with SogCLR's per-sample estimates, sharded over 4 x 2 devices."""
    overrides = {"loss.name": "sogclr", "evals.at_end": False, "mesh.shape": (4, 2, 1), "log_every": 1}
    overrides.update(
        {"data.data_dir": request.getfixturevalue("tfds_dir"), "steps": 6, "checkpoint_every": 100}
    )

    def check(workdir, report, state):
        # 6 steps of 32 view-pairs over 512 examples: each step's examples got estimates.
        log_u = np.asarray(state["loss_state"]["log_u"])
        assert 6 * 32 * 2 >= np.isfinite(log_u).sum() >= 4 * 32 * 2

    return apply_overrides(load_config("simclr_demo.py"), overrides), None, check


def siglip2_image_losses(tmp_path, request):
    """SigLIP 2's image-side losses (on from step 3 of 6) with their EMA teacher, on 4 x 2 devices:
    the teacher and its centres resume bit for bit with the rest of the state."""
    overrides = {
        "model.image.kind": "vit",
        "model.image.pool": "mean",
        "model.image.patch_size": 8,
        "model.image_heads.prototypes": 32,
        "image_losses.self_distillation": 1.0,
        "image_losses.masked_prediction": 1.0,
        "image_losses.start": 0.4,
        "evals.at_end": False,
        "mesh.shape": (4, 2, 1),
        "log_every": 1,
        "steps": 6,
        "checkpoint_every": 100,
    }

    def check(workdir, report, state):
        teacher, params = state["teacher"], state["params"]
        assert np.abs(np.asarray(teacher["centers"]["patch"])).max() > 0  # moved once the losses are on
        kernel = lambda tree: np.asarray(tree["image_heads"]["patch"]["prototypes"]["kernel"])
        assert not np.array_equal(kernel(teacher), kernel(params))  # an average, not a copy
        assert "masked_prediction_loss" in _records(workdir)[6]

    return tiny_demo(request.getfixturevalue("tfds_dir"), **overrides), None, check


def siglip2_naflex(tmp_path, request):
    """NaFlex patch batches (configs/siglip2_naflex_vit_b16.py:tiny, random regions of the images
    at 16 or 64 patches a step): the resumed run draws each step's length as the straight run
    did, and the logged TFLOP/s count each step at its own length."""
    from clipjax import flops
    from clipjax.data.naflex import seq_len_at
    from clipjax.trainer.run import naflex_inputs

    overrides = {"data.random_resized_crop": (0.5, 1.0), "evals.at_end": False, "log_every": 1}
    overrides.update({"data.data_dir": request.getfixturevalue("tfds_dir"), "checkpoint_every": 100})
    config = apply_overrides(load_config("siglip2_naflex_vit_b16.py"), overrides)

    def check(workdir, report, state):
        records, naflex = _records(workdir), naflex_inputs(config, 0)
        lengths = {step: seq_len_at(naflex, step - 1) for step in records}
        assert set(lengths.values()) == {16, 64}
        for step, record in records.items():
            model_flops = flops.train_flops_per_step(config, image_seq_len=lengths[step])
            per_step = (
                record["tflops_per_device"] * 1e12 * 8 / (record["samples_per_sec"] / config.data.batch_size)
            )
            assert per_step == pytest.approx(model_flops, rel=1e-6), step

    return config, None, check


def _records(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def _drops(record):
    return {k: v for k, v in record.items() if k.startswith("data_dropped")}


@pytest.mark.parametrize(
    "case",
    [shapes, own_csv, webdataset, tfds, simclr_sogclr, siglip2_image_losses, siglip2_naflex],
    ids=lambda f: f.__name__,
)
def test_a_resumed_run_ends_where_the_straight_run_ends(case, tmp_path, request, capfd):
    config, straight, check = case(tmp_path, request)
    report, console = {}, ""
    if straight is None:
        straight = tmp_path / "straight"
        report = train_lib.train(config.copy_and_resolve_references(), str(straight))
        console = capfd.readouterr().err
    # A new copy for each start: train() settles a config in place (data.num_train).
    resumed = lambda: apply_overrides(config.copy_and_resolve_references(), {"evals.at_end": False})  # noqa: E731
    train_lib.train(resumed(), str(tmp_path / "resumed"), stop_at=STOP_AT, log=lambda _: None)
    assert Checkpointer(str(tmp_path / "resumed")).latest_step() == STOP_AT
    train_lib.train(resumed(), str(tmp_path / "resumed"), log=lambda _: None)

    step_a, a = checkpoint_state(straight)
    step_b, b = checkpoint_state(tmp_path / "resumed")
    assert step_a == step_b > STOP_AT
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(a)[0]]
    assert any("opt_state" in p for p in paths) and any("params" in p for p in paths)
    for path, x, y in zip(paths, jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=path)
    # Both runs saw the same batches: the same loss at every step, and the drop counts resume with
    # the data (the same totals at every step).
    records_a, records_b = _records(straight), _records(tmp_path / "resumed")
    assert sorted(records_a) == sorted(records_b) == list(range(1, step_a + 1))
    for step, record in records_a.items():
        assert record["loss"] == pytest.approx(records_b[step]["loss"], rel=1e-6), step
        assert _drops(record) == _drops(records_b[step]), step
    # The console's progress lines say what was dropped, as the metrics do.
    last = records_a[step_a]
    if console and last["data_dropped"]:
        reasons = ", ".join(
            f"{k.split('/')[1]} {n}" for k, n in sorted(_drops(last).items()) if "/" in k and n
        )
        line = [line for line in console.splitlines() if line.startswith(f"step {step_a}/{step_a}")][-1]
        assert line.endswith(f"  dropped {last['data_dropped']} ({reasons})"), line
    if check:
        check(straight, report, a)
