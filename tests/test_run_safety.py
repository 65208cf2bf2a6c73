"""A run is never lost: resume refuses another config, checkpoints hold what they need, damage and
write failures are handled, one trainer per workdir, one-line errors (the issue's situations)."""

import json
import logging
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

import clipjax
from clipjax import trainer as train_lib
from clipjax.api import RestoreError, evaluate_workdir
from clipjax.checkpoint import Checkpointer, CheckpointWriteError
from clipjax.config import ConfigError, default_config, validate
from clipjax.data.pipeline import IndexChunks
from clipjax.run_store.resume import ResumeError
from clipjax.workdir_lock import WorkdirLock, WorkdirLockedError
from tests.helpers import ROOT, copy_run, data_config, source_and_tokenizer, tiny_demo

QUIET = dict(log=lambda _: None)


def _params(workdir, step=None):
    ckpt = Checkpointer(str(workdir))
    step = ckpt.latest_step() if step is None else step
    params = ckpt.manager.restore(step)["state"]["params"]
    ckpt.close()
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


# 1 ------------------------------------------------------------------------------------------


def test_resume_with_another_model_is_refused_and_loses_nothing(tiny_run, tmp_path):
    workdir = copy_run(tiny_run.workdir, tmp_path / "w")
    before = (
        sorted(os.listdir(workdir / "checkpoints")),
        (workdir / "config.json").read_text(),
        _params(workdir),
    )
    for key, value in (("model.embed_dim", 32), ("loss.name", "sigmoid")):
        config = tiny_run.config(**{"evals.at_end": False, key: value})
        if value == "sigmoid":
            config.model.logit_bias_init = -10.0
        with pytest.raises(ResumeError) as info:
            train_lib.train(config, str(workdir), **QUIET)
        message = str(info.value)
        assert (
            "\n" not in message and key in message and "init_from" in message and "allow_changes" in message
        )
    # Allowing a change of shapes does not make the checkpoints "damaged": still refused, untouched.
    config = tiny_run.config(**{"evals.at_end": False, "model.embed_dim": 32})
    config.resume.allow_changes = "model.embed_dim"
    with pytest.raises(ResumeError, match="does not match the model config: .*shape"):
        train_lib.train(config, str(workdir), **QUIET)
    assert not (workdir / "damaged_checkpoints").exists()
    after = (
        sorted(os.listdir(workdir / "checkpoints")),
        (workdir / "config.json").read_text(),
        _params(workdir),
    )
    assert before[:2] == after[:2] and _same(before[2], after[2])


def _record_built_states(monkeypatch) -> list:
    """Whether each train state the trainer builds holds real arrays (not only shapes)."""
    from clipjax.trainer import run as run_module

    built, original = [], run_module.init_train_state

    def recording(*args, **kwargs):
        initial = original(*args, **kwargs)
        built.append(all(isinstance(x, jax.Array) for x in jax.tree.leaves(initial.state["params"])))
        return initial

    monkeypatch.setattr(run_module, "init_train_state", recording)
    return built


def test_allowed_change_resumes_and_init_from_starts_a_new_run(tiny_run, tmp_path, monkeypatch):
    built = _record_built_states(monkeypatch)
    workdir = copy_run(tiny_run.workdir, tmp_path / "w")
    config = tiny_run.config(**{"evals.at_end": False, "optim.lr": 1e-3})
    config.steps = 6
    with pytest.raises(ResumeError, match=r"optim.lr: 0.002 -> 0.001.*steps: 4 -> 6"):
        train_lib.train(config, str(workdir), **QUIET)
    config.resume.allow_changes = "optim.lr,steps"
    lines = []
    train_lib.train(config, str(workdir), log=lines.append)
    assert any("resumed" in line and "step 4" in line for line in lines), lines
    assert Checkpointer(str(workdir)).latest_step() == 6
    # The resume restored into the state's shapes: it never built fresh weights to overwrite.
    assert built == [False]
    # init_from: a new run (step 0, fresh optimizer) from those weights; with lr 0 they stay put.
    fresh = tiny_run.config(**{"evals.at_end": False, "optim.lr": 0.0, "init_from": str(workdir)})
    fresh.steps = 2
    train_lib.train(fresh, str(tmp_path / "new"), **QUIET)
    assert _same(_params(tmp_path / "new"), _params(workdir))
    assert built == [False, True]  # a new run builds its state (here init_from overwrites it)
    other = tiny_run.config(**{"evals.at_end": False, "init_from": str(workdir)})
    other.model.embed_dim = 32
    with pytest.raises(RestoreError, match="does not match the model config"):
        train_lib.train(other, str(tmp_path / "other"), **QUIET)


# 2 ------------------------------------------------------------------------------------------


def _truncate(checkpoint_dir):
    files = sorted(p for p in checkpoint_dir.rglob("*") if p.is_file() and p.stat().st_size > 1000)
    assert files
    for p in files:
        with open(p, "r+b") as f:
            f.truncate(p.stat().st_size // 3)


def test_damaged_latest_checkpoint_falls_back_everywhere_and_is_saved_again(tiny_run, tmp_path):
    workdir = copy_run(tiny_run.workdir, tmp_path / "w")
    _truncate(workdir / "checkpoints" / "4")
    lines = []
    # load and evaluate fall back to step 2 and say why (they used to crash with a TypeError).
    model = clipjax.load(str(workdir), devices=jax.devices()[:1])
    assert model.step == 2
    report = evaluate_workdir(
        str(workdir), out=str(tmp_path / "eval"), devices=jax.devices()[:1], log=lines.append
    )
    assert report["step"] == 2
    assert any("skipping checkpoint 4" in line and "cannot be read" in line for line in lines), lines
    with pytest.raises(RestoreError, match="checkpoint 4 .* cannot be read"):
        clipjax.load(str(workdir), step=4)
    # The trainer resumes from step 2, moves the damaged step aside (nothing deleted) and writes
    # step 4 again: the run's own step 4.
    lines = []
    train_lib.train(tiny_run.config(**{"evals.at_end": False}), str(workdir), log=lines.append)
    assert any("checkpoint 4" in line and "cannot be restored" in line for line in lines), lines
    assert any("resumed" in line and "step 2" in line for line in lines), lines
    assert any("moved the unreadable checkpoint 4" in line for line in lines), lines
    assert [p.name.split("-")[0] for p in (workdir / "damaged_checkpoints").iterdir()] == ["4"]
    assert _same(_params(workdir, 4), _params(tiny_run.workdir, 4))
    assert clipjax.load(str(workdir), devices=jax.devices()[:1]).step == 4


# 3 and 13 ------------------------------------------------------------------------------------


def test_checkpoint_holds_tokenizer_and_config_so_load_needs_no_data(tmp_path, monkeypatch):
    """A relative data_dir, then the data deleted and a tokenizer that would now be different:
    `load` still gives the same embeddings, reads no data, writes nothing, from any directory."""
    monkeypatch.chdir(tmp_path)
    config = tiny_demo("data/tfds", **{"evals.at_end": False})
    train_lib.train(config, "run", **QUIET)
    meta = Checkpointer("run").meta(4)
    assert meta["format_version"] == 2 and meta["config"]["data"]["data_dir"] == str(
        tmp_path / "data" / "tfds"
    )
    assert meta["tokenizer"]["kind"] == "sentencepiece" and meta["preprocessing"]["image_size"] == 32
    model = clipjax.load("run", devices=jax.devices()[:1])
    texts = ["a big red circle", "a small blue square in the top left"]
    expected_ids, expected = model.tokenize(texts), model.encode_text(texts)
    subprocess.run(["rm", "-rf", str(tmp_path / "data")], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = clipjax.load(str(tmp_path / "run"), devices=jax.devices()[:1])
    np.testing.assert_array_equal(again.tokenize(texts), expected_ids)
    np.testing.assert_allclose(again.encode_text(texts), expected, rtol=1e-6, atol=1e-7)
    assert not (tmp_path / "data").exists() and not os.listdir(elsewhere)


def test_resume_uses_the_checkpointed_tokenizer_not_the_grown_data(tmp_path):
    """Rows appended to the CSV would retrain the tokenizer to other ids: resume keeps the old."""
    images = tmp_path / "images"
    images.mkdir()
    colors = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
    rows = ["image,caption"]
    for i in range(48):
        name = list(colors)[i % 3]
        Image.fromarray(np.full((16, 16, 3), colors[name], np.uint8)).save(images / f"{i}.png")
        rows.append(f"{i}.png,a {name} square")
    (images / "captions.csv").write_text("\n".join(rows) + "\n")
    config = tiny_demo(
        str(tmp_path / "tfds"),
        **{"evals.at_end": False, "data.name": "image_text_folder", "data.num_train": 0},
    )
    config.data.source = str(images / "captions.csv")
    config.data.test_fraction = 0.0
    config.data.batch_size = 16
    config.steps = 4
    train_lib.train(config, str(tmp_path / "run"), stop_at=2, **QUIET)
    before = clipjax.load(str(tmp_path / "run")).tokenize(["a red square"])
    extra = [f"{i}.png,zebra giraffe okapi {i} red" for i in range(40)]
    (images / "captions.csv").write_text("\n".join(rows + extra) + "\n")
    train_lib.train(config, str(tmp_path / "run"), **QUIET)  # the data changed: resume anyway
    meta = Checkpointer(str(tmp_path / "run")).meta(4)
    from clipjax.data.tokenizers import tokenizer_from_json

    np.testing.assert_array_equal(tokenizer_from_json(meta["tokenizer"]).encode(["a red square"]), before)


# 4, 5 and 11 -------------------------------------------------------------------------------


def _cli(args, cwd=ROOT, **env):
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        timeout=600,
    )


def _error_lines(stderr):
    # tfds and absl print progress and warnings to stderr; ours start with the program name.
    return [line for line in stderr.splitlines() if line.startswith("clipjax.")]


def test_an_error_in_the_loop_finishes_the_save_and_is_reported_first(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = ["image,caption"]
    rng = np.random.default_rng(0)
    for i in range(48):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(images / f"{i}.png")
        rows.append(f"{i}.png,picture {i}")
    for i in range(40):
        (images / f"bad{i}.png").write_bytes(b"not a png")
        rows.append(f"bad{i}.png,broken {i}")
    (images / "captions.csv").write_text("\n".join(rows) + "\n")
    result = _cli(
        [
            "clipjax.train",
            "--config",
            "configs/demo.py:tiny",
            "--workdir",
            str(tmp_path / "run"),
            f"--config.data.data_dir={tmp_path / 'tfds'}",
            "--config.data.name=image_text_folder",
            "--config.data.num_train=0",
            f"--config.data.source={images / 'captions.csv'}",
            "--config.data.test_fraction=0.0",
            "--config.data.tokenizer.kind=byte",
            "--config.data.tokenizer.max_len=16",
            "--config.data.batch_size=8",
            # Decoded in a worker process, which hands batches over in shared memory: the run
            # that stops must let go of all of it, or Python warns of leaked shared memory.
            "--config.data.worker_count=1",
            "--config.steps=40",
            "--config.checkpoint_every=1",
            "--config.evals.at_end=False",
        ]
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and "records could not be decoded" in errors[0] and "first: record" in errors[0]
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr
    assert "leaked" not in result.stderr, result.stderr[-3000:]
    leftovers = [p for p in (tmp_path / "run").rglob("*") if "tmp" in p.name]
    assert not leftovers, leftovers
    assert Checkpointer(str(tmp_path / "run")).all_steps()  # what was saved is readable
    assert not (tmp_path / "run" / "LOCK").exists()


def test_a_failed_checkpoint_write_stops_the_run_at_once(tfds_dir, tmp_path, monkeypatch):
    # The tiny demo's 4 steps: its train step is compiled once for the suite (a step count of its
    # own would compile another: the schedule's length is part of the program).
    config = tiny_demo(tfds_dir, **{"evals.at_end": False, "checkpoint_every": 1, "log_every": 1})
    original = Checkpointer.save

    def full_disk(self, step, *args, **kwargs):
        if step >= 3:
            self.manager.save = _raise_enospc
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", full_disk)
    with pytest.raises(
        CheckpointWriteError, match=r"^checkpoint 3 could not be written .*No space left"
    ) as info:
        train_lib.train(config, str(tmp_path / "run"), **QUIET)
    assert "\n" not in str(info.value)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert records[-1]["step"] == 3  # stopped at the failing save, not later
    assert Checkpointer(str(tmp_path / "run")).all_steps() == [1, 2]


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MB file system of its own (a tmpfs: root only), room for one tiny checkpoint."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_is_one_line_and_leaves_no_partial_checkpoint(tfds_dir, small_disk):
    """A real ENOSPC in Orbax's asynchronous write: it used to print 300 lines and a dozen
    tracebacks before the one line (exit 1), and leave `4.orbax-checkpoint-tmp` behind."""
    workdir = small_disk / "run"
    # The dataset rendered here first: rendering in the trainer would print tfds's progress lines
    # on stderr, which must hold only the step lines and ours (run alone, nothing rendered it).
    source_and_tokenizer(tiny_demo(tfds_dir).data)
    result = _cli(
        [
            "clipjax.train",
            "--config",
            "configs/demo.py:tiny",
            "--workdir",
            str(workdir),
            f"--config.data.data_dir={tfds_dir}",
            "--config.steps=40",
            "--config.checkpoint_every=2",
            "--config.evals.at_end=False",
        ]
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr
    # stderr: the progress lines, then ours
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and re.fullmatch(
        rf"clipjax\.train: checkpoint 4 could not be written to {re.escape(str(workdir / 'checkpoints'))} "
        r"\((OSError: \[Errno 28\] )?No space left on device\)",  # tensorstore's or Python's write
        errors[0],
    ), result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if not line.startswith("step ")] == _error_lines(
        result.stderr
    ), result.stderr[-3000:]
    left = sorted(
        str(p.relative_to(workdir)) for p in (workdir / "checkpoints").rglob("*") if "tmp" in p.name
    )
    assert os.listdir(workdir / "checkpoints") == ["2"], left  # no partial step 4
    checkpointer = Checkpointer(str(workdir))
    assert {"state", "data", "meta"} <= set(checkpointer.read_everything(2))
    checkpointer.close()
    assert not (workdir / "LOCK").exists()


def _raise_enospc(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_an_asynchronous_write_failure_is_raised_at_the_next_save(tfds_dir, tmp_path, monkeypatch):
    config = tiny_demo(tfds_dir, **{"evals.at_end": False, "checkpoint_every": 1})
    calls = []

    def failed_in_background(self):
        calls.append(1)
        if len(calls) >= 2:
            raise OSError(28, "No space left on device (while writing in the background)")

    monkeypatch.setattr("orbax.checkpoint.CheckpointManager.check_for_errors", failed_in_background)
    with pytest.raises(
        CheckpointWriteError, match=r"^checkpoint 1 could not be written to .* \(OSError: .*background\)"
    ):
        train_lib.train(config, str(tmp_path / "run"), **QUIET)


def test_cli_errors_are_one_line(tiny_run, tmp_path):
    cases = [
        (
            [
                "clipjax.train",
                "--config",
                "configs/demo.py:tiny",
                "--workdir",
                str(tmp_path / "a"),
                "--config.model.image.widht=3",
            ],
            "--config.model.image.widht: unknown key (did you mean 'model.image.width'?)",
        ),
        (
            ["clipjax.train", "--config", "configs/nope.py", "--workdir", str(tmp_path / "a")],
            "--config: file 'configs/nope.py' does not exist",
        ),
        (
            [
                "clipjax.train",
                "--config",
                "configs/demo.py:tiny",
                "--workdir",
                str(tmp_path / "a"),
                "--config.keep_checkpoints=0",
            ],
            "keep_checkpoints: 0 is below the minimum 1",
        ),
        (
            [
                "clipjax.train",
                "--config",
                "configs/demo.py:tiny",
                "--workdir",
                str(copy_run(tiny_run.workdir, tmp_path / "w")),
                f"--config.data.data_dir={tiny_run.data_dir}",
                "--config.model.embed_dim=32",
            ],
            "model.embed_dim: 64 -> 32",
        ),
        (
            ["clipjax.evaluate", "--workdir", str(tmp_path / "missing")],
            f"workdir '{tmp_path / 'missing'}' does not exist",
        ),
        (
            ["clipjax.evaluate", "--workdir", str(tiny_run.workdir), "--config.evals.knn.k2=3"],
            "--config.evals.knn.k2: unknown key",
        ),
    ]
    for args, expected in cases:
        result = _cli(args)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        errors = _error_lines(result.stderr)
        assert len(errors) == 1 and expected in errors[0], (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, args
    verbose = _cli(cases[2][0], CLIPJAX_VERBOSE="1")
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr


# 6 ------------------------------------------------------------------------------------------


def test_a_second_trainer_on_the_workdir_is_refused(tiny_run, tmp_path):
    workdir = copy_run(tiny_run.workdir, tmp_path / "w")
    (workdir / "LOCK").unlink(missing_ok=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        holder = WorkdirLock(str(workdir))
        holder.owner["pid"] = other.pid  # as if that process were training here
        holder.acquire(**QUIET)
        metrics = (workdir / "metrics.jsonl").read_text()
        with pytest.raises(WorkdirLockedError, match=f"in use by process {other.pid} on"):
            train_lib.train(tiny_run.config(**{"evals.at_end": False}), str(workdir), **QUIET)
        assert (workdir / "metrics.jsonl").read_text() == metrics
        holder.release()
    finally:
        other.kill()
        other.wait()
    # The holder is gone (its pid is dead): the lock is stale and taken over.
    stale = {"host": os.uname().nodename, "pid": other.pid, "started": time.time(), "heartbeat": time.time()}
    (workdir / "LOCK").write_text(json.dumps(stale))
    lines = []
    train_lib.train(tiny_run.config(**{"evals.at_end": False}), str(workdir), log=lines.append)
    assert any("taking over the stale lock" in line for line in lines), lines
    assert not (workdir / "LOCK").exists()
    # Another host's lock with an old heartbeat is stale too; a fresh one is not.
    lock = WorkdirLock(str(workdir), stale_after_s=60)
    (workdir / "LOCK").write_text(json.dumps(dict(stale, host="elsewhere", heartbeat=time.time() - 61)))
    lock.acquire(**QUIET)
    lock.release()
    (workdir / "LOCK").write_text(json.dumps(dict(stale, host="elsewhere", heartbeat=time.time())))
    with pytest.raises(WorkdirLockedError):
        WorkdirLock(str(workdir), stale_after_s=60).acquire(**QUIET)


# 8 ------------------------------------------------------------------------------------------


def test_values_that_would_break_later_are_refused():
    for key, value in (("keep_checkpoints", 0), ("checkpoint_every", 0), ("log_every", 0)):
        c = default_config()
        c[key] = value
        with pytest.raises(ConfigError, match=f"^{key}: 0 is below the minimum 1$"):
            validate(c, num_devices=8)


def test_a_changed_batch_is_refused_unless_allowed_then_continues_the_stream(tiny_run, tmp_path):
    workdir = copy_run(tiny_run.workdir, tmp_path / "w")  # 4 steps of 32: 128 examples seen
    config = tiny_run.config(**{"evals.at_end": False, "data.batch_size": 16})
    config.steps = 6
    with pytest.raises(ResumeError, match="data.batch_size: 32 -> 16"):
        train_lib.train(config, str(workdir), **QUIET)
    config.resume.allow_changes = "data.batch_size,steps"
    lines = []
    train_lib.train(config, str(workdir), log=lines.append)
    assert any("the data continues at example 128" in line for line in lines), lines
    meta = Checkpointer(str(workdir)).meta(6)
    assert (meta["examples_seen"], meta["data_offset"]) == (128 + 2 * 16, 128)
    # The stream from an offset is the same stream: no example replayed or skipped.
    whole = IndexChunks(100, 16, seed=(0, 0))
    shifted = IndexChunks(100, 16, seed=(0, 0), start_example=128)
    stream = np.concatenate([whole[k] for k in range(20)])
    np.testing.assert_array_equal(np.concatenate([shifted[k] for k in range(4)]), stream[128:192])


def test_a_run_cannot_be_shortened_below_its_checkpoint(tiny_run, tmp_path):
    """`steps` lowered below the saved step, even where allowed to change, is refused naming both
    values, and config.json keeps describing the run the checkpoints belong to."""
    workdir = copy_run(tiny_run.workdir, tmp_path / "w")  # checkpoints at 2 and 4
    before = (sorted(os.listdir(workdir / "checkpoints")), (workdir / "config.json").read_text())
    config = tiny_run.config(**{"evals.at_end": False, "resume.allow_changes": "steps"})
    config.steps = 3
    with pytest.raises(ResumeError) as info:
        train_lib.train(config, str(workdir), **QUIET)
    assert str(info.value) == (
        f"steps: workdir {workdir} holds a checkpoint at step 4, past the new steps=3; give "
        f"--config.steps=4 or more, or use a new --workdir with --config.init_from={workdir}"
    )
    assert (sorted(os.listdir(workdir / "checkpoints")), (workdir / "config.json").read_text()) == before
    config.steps = 4  # the length it has: nothing left to train, and nothing refused
    train_lib.train(config, str(workdir), **QUIET)
    assert Checkpointer(str(workdir)).latest_step() == 4


# 10 -----------------------------------------------------------------------------------------


def test_load_api_checks_and_converts_its_inputs(tiny_run):
    model = clipjax.load(str(tiny_run.workdir), devices=jax.devices()[:1])
    d = model.config.model.embed_dim
    one = model.encode_text("a red circle")
    assert one.shape == (1, d)
    np.testing.assert_array_equal(one, model.encode_text(["a red circle"]))
    assert model.encode_text([]).shape == (0, d)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    reference = model.encode_image(images)
    np.testing.assert_allclose(model.encode_image(images / 255.0), reference, atol=1e-6)
    np.testing.assert_allclose(model.encode_image(images[0]), reference[:1], atol=1e-6)
    gray = images[..., 0]
    np.testing.assert_allclose(
        model.encode_image(gray), model.encode_image(np.repeat(gray[..., None], 3, -1)), atol=1e-6
    )
    np.testing.assert_allclose(model.encode_image(gray[..., None]), model.encode_image(gray), atol=1e-6)
    big = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)  # 64 px: resized to the 32 it was trained at
    assert model.encode_image(big).shape == (3, d)
    for bad, match in (
        (images.astype(np.float32), r"float images must lie in \[0, 1\], got values in \[0, 25[0-9]\]"),
        (np.full((1, 32, 32, 3), np.nan, np.float32), "NaN or infinite"),
        (images > 128, "dtype bool"),
        (np.zeros((2, 32, 32, 4), np.uint8), r"expected \[N, H, W, 3\]"),
    ):
        with pytest.raises((ValueError, TypeError), match=match) as info:
            model.encode_image(bad)
        assert "\n" not in str(info.value)


def test_loading_a_workdir_logs_no_missing_metadata_warning(tiny_run, caplog):
    """Every load (of a trained workdir, or one `clipjax.convert import` wrote: the same layout)
    logged `WARNING:absl:Metadata file does not exist: .../checkpoints/4/state/_CHECKPOINT_METADATA`:
    the parameters' metadata was read as if `<step>/state` were a step of its own."""
    caplog.set_level(logging.INFO)
    model = clipjax.load(str(tiny_run.workdir), devices=jax.devices()[:1])
    assert model.step == 4
    checkpointer = Checkpointer(str(tiny_run.workdir), create=False)
    shapes = lambda tree: sorted((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree))  # noqa: E731
    assert shapes(checkpointer.params_metadata(4)) == shapes(model.params)
    checkpointer.close()
    noise = [r.getMessage() for r in caplog.records if "Metadata file" in r.getMessage()]
    assert not noise, noise


# 14 -----------------------------------------------------------------------------------------


def test_no_stray_temp_folders_and_a_shared_tokenizer_cache(tmp_path, monkeypatch):
    import tempfile

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))

    source, _ = source_and_tokenizer(data_config(data_dir=str(tmp_path / "tfds"), num_train=64, num_test=16))
    assert not list(temp.iterdir())
    models = list((tmp_path / "tfds" / "tokenizers").glob("*.model"))
    assert models and all(p.stat().st_mode & 0o044 == 0o044 for p in models)  # readable by the group, others
