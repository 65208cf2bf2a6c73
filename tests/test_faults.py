"""A trainer that loses nothing: non-finite steps, bad data, signals (damaged checkpoints:
test_run_safety.py)."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from clipjax import trainer as train_lib
from clipjax.checkpoint import Checkpointer
from clipjax.data import pipeline
from tests.helpers import ROOT, descendants, kill_all, survivors, tiny_demo, with_ctrl_c


def _params(workdir, step=None):
    ckpt = Checkpointer(str(workdir))
    step = ckpt.latest_step() if step is None else step
    params = ckpt.manager.restore(step)["state"]["params"]
    ckpt.close()
    return step, [np.asarray(x) for x in jax.tree.leaves(params)]


def _records(workdir):
    return [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]


def _corrupting_iterator(monkeypatch, bad_steps):
    """Batches whose token ids are far outside the vocabulary: the text tower returns NaN."""
    original = pipeline.make_train_iterator

    class Corrupting:
        def __init__(self, inner):
            self.inner, self.count = inner, 0
            self.drop_counts = getattr(inner, "drop_counts", {})

        def __next__(self):
            batch = dict(next(self.inner))
            self.count += 1
            if self.count in bad_steps:
                batch["text"] = np.full_like(batch["text"], 10**6)
            return batch

        def get_state(self):
            return self.inner.get_state()

        def set_state(self, state):
            self.inner.set_state(state)

    monkeypatch.setattr(pipeline, "make_train_iterator", lambda *a, **k: Corrupting(original(*a, **k)))


def test_nonfinite_batch_is_skipped_and_counted(tfds_dir, tmp_path, monkeypatch):
    config = tiny_demo(tfds_dir, **{"evals.at_end": False, "log_every": 1})
    _corrupting_iterator(monkeypatch, bad_steps={2})
    train_lib.train(config, str(tmp_path))
    records = _records(tmp_path)
    assert [r["nonfinite_skipped"] for r in records] == [0, 1, 1, 1]
    assert records[1]["loss"] == "nan"  # non-finite values are logged as strings (JSON has no NaN)
    assert all(np.isfinite(r["param_norm"]) for r in records)
    _, params = _params(tmp_path)
    assert all(np.all(np.isfinite(p)) for p in params)
    # One step count for schedule, logs and checkpoints: the skipped step still moved the
    # schedule, so each logged lr is the one applied and the run ends on the schedule's end.
    from clipjax import optim

    schedule = optim.learning_rate_schedule(config.optim, config.steps)
    assert [r["lr"] for r in records] == pytest.approx([float(schedule(s - 1)) for s in (1, 2, 3, 4)])
    checkpointer = Checkpointer(str(tmp_path))
    opt_state = checkpointer.read_everything(4)["state"]["opt_state"]
    checkpointer.close()
    counts = [
        int(x)
        for p, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]
        if "count" in jax.tree_util.keystr(p)
    ]
    assert counts and set(counts) == {4}


def test_stream_of_nonfinite_batches_stops_with_last_good_checkpoint(tfds_dir, tmp_path, monkeypatch):
    config = tiny_demo(
        tfds_dir,
        **{"evals.at_end": False, "log_every": 1, "checkpoint_every": 100, "max_nonfinite_streak": 2},
    )
    config.steps = 12  # the length of the runs below: the schedule's length is part of the program
    _corrupting_iterator(monkeypatch, bad_steps=set(range(3, 100)))
    with pytest.raises(train_lib.NonFiniteError, match="consecutive steps had a non-finite"):
        train_lib.train(config, str(tmp_path), log=lambda _: None)
    step, params = _params(tmp_path)
    assert step == 4  # two good steps, then two skipped ones
    assert all(np.all(np.isfinite(p)) for p in params)
    # The skipped steps changed nothing: the saved parameters are those after step 2.
    monkeypatch.undo()
    config.steps, config.max_nonfinite_streak = 12, 20
    train_lib.train(config, str(tmp_path / "good"), stop_at=2)
    _, good = _params(tmp_path / "good")
    for a, b in zip(params, good):
        np.testing.assert_array_equal(a, b)


def test_an_update_that_overflows_the_parameters_is_never_applied(tfds_dir, tmp_path):
    """Finite loss and gradients, but a learning rate and decay so large (finite: the schema lets
    them pass) that the update overflows the parameters to inf/NaN: the step is skipped like a
    non-finite batch, so no checkpoint ever holds a non-finite parameter."""
    overflowing = {"optim.lr": 3e38, "optim.weight_decay": 3e38, "optim.warmup_fraction": 0.0}
    config = tiny_demo(tfds_dir, **{"evals.at_end": False, "log_every": 1, **overflowing})
    config.optim.schedule = "constant"
    train_lib.train(config, str(tmp_path), log=lambda _: None)
    records = _records(tmp_path)
    assert [r["nonfinite_skipped"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in records)  # the batches were fine: the update was not
    assert len({r["param_norm"] for r in records}) == 1  # nothing changed the parameters
    for step in (2, 4):
        _, params = _params(tmp_path, step)
        assert all(np.all(np.isfinite(p)) for p in params), step


def test_bad_records_are_skipped_and_counted(tmp_path):
    source = tmp_path / "images"
    source.mkdir()
    rng = np.random.default_rng(0)
    rows = ["image,caption"]
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(source / f"{i}.png")
        rows.append(f"{i}.png,a picture number {i}")
    for i in range(3):  # undecodable image bytes
        (source / f"bad{i}.png").write_bytes(b"not a png at all")
        rows.append(f"bad{i}.png,a broken picture")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(source / "empty.png")
    rows.append("empty.png,")
    (source / "captions.csv").write_text("\n".join(rows) + "\n")

    config = tiny_demo(str(tmp_path / "tfds"), **{"evals.at_end": False, "log_every": 1})
    config.data.name = "image_text_folder"
    config.data.num_train = 0  # the CSV's count (the tiny demo's 512 are shapes')
    config.data.source = str(source / "captions.csv")
    config.data.tokenizer.kind = "byte"
    config.data.tokenizer.max_len = 24
    config.data.batch_size = 8
    config.data.test_fraction = 0.0
    config.data.max_bad_fraction = 0.5
    config.steps = 6  # 48 records: a whole epoch of the 44
    os.makedirs(tmp_path / "tfds")
    train_lib.train(config, str(tmp_path / "run"))
    last = _records(tmp_path / "run")[-1]
    assert last["step"] == 6 and np.isfinite(last["loss"])
    assert last["data_dropped/bad_image"] >= 3
    assert last["data_dropped/bad_caption"] >= 1
    assert last["data_dropped"] == last["data_dropped/bad_image"] + last["data_dropped/bad_caption"]


def _train_cli(workdir, data_dir, *extra):
    return [
        sys.executable,
        "-m",
        "clipjax.train",
        "--config",
        str(ROOT / "configs" / "demo.py:tiny"),
        "--workdir",
        str(workdir),
        f"--config.data.data_dir={data_dir}",
        "--config.evals.at_end=False",
        "--config.log_every=1",
        *extra,
    ]


def _wait_for_step(workdir, step, proc, timeout=240):
    deadline = time.time() + timeout
    path = pathlib.Path(workdir) / "metrics.jsonl"
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if path.exists() and any(
            json.loads(line)["step"] >= step for line in path.read_text().splitlines() if line
        ):
            return
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


def test_sigint_and_sigterm_save_the_current_step_and_exit_for_a_resume(tfds_dir, tmp_path):
    """Ctrl-C (SIGINT), then after a resume a preemption notice (SIGTERM): each saves the step the
    run is at (no checkpoint is due: nothing would be kept otherwise), prints one line and exits
    with status 75, "stopped early, resume me" (not 0: a wrapper retrying until success would
    stop). The run resumed in between ends equal to an uninterrupted one."""
    from clipjax.cli import RESUME_EXIT_STATUS

    assert RESUME_EXIT_STATUS == 75
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    args = ("--config.steps=400", "--config.checkpoint_every=1000")
    step = 0
    for signum, name in ((signal.SIGINT, "SIGINT"), (signal.SIGTERM, "SIGTERM")):
        proc = subprocess.Popen(
            with_ctrl_c(_train_cli(tmp_path, tfds_dir, *args)),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        _wait_for_step(tmp_path, step + 3, proc)
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == RESUME_EXIT_STATUS, out
        assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
        ours = [line for line in out.splitlines() if line.startswith("clipjax.train:")]
        assert len(ours) == 1 and f": {name} received" in ours[0], out
        assert "run the same command to resume" in ours[0], out
        step = int(re.fullmatch(r"clipjax\.train: stopped at step (\d+) of 400: .*", ours[0]).group(1))
        assert step >= 3 and Checkpointer(str(tmp_path)).latest_step() == step
        assert _records(tmp_path)[-1]["step"] == step
    config = tiny_demo(tfds_dir, **{"evals.at_end": False, "log_every": 1, "checkpoint_every": 1000})
    config.steps = 400
    train_lib.train(config, str(tmp_path / "straight"), stop_at=step, log=lambda _: None)
    _, a = _params(tmp_path / "straight")
    _, b = _params(tmp_path)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_sigkill_then_restart_equals_uninterrupted(tfds_dir, tmp_path):
    """Two kills at random steps (the second one with a save every step, so it lands on a save in
    flight most of the time); every checkpoint left behind reads; the restart ends equal. The
    killed runs decode in a worker process, which must end with them (and the batches, hence
    the result, do not depend on it)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    args = ("--config.steps=12", "--config.checkpoint_every=2")
    rng = np.random.default_rng()
    for kill_at, extra in (
        (int(rng.integers(3, 7)), ()),
        (int(rng.integers(8, 11)), ("--config.checkpoint_every=1",)),
    ):
        proc = subprocess.Popen(
            _train_cli(tmp_path / "killed", tfds_dir, *args, *extra, "--config.data.worker_count=1"),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        workers = {}
        try:
            _wait_for_step(tmp_path / "killed", kill_at, proc)
            workers = descendants(proc.pid)
            assert workers  # grain's worker process (and multiprocessing's resource tracker)
            proc.kill()
            proc.wait()
            assert not survivors(workers), "data workers outlived the killed trainer"
        finally:
            kill_all(workers)
            proc.kill()
            proc.wait()
        # A kill can land before the first asynchronous save has finished: then the restart
        # starts from scratch, which must give the same result too.
        checkpointer = Checkpointer(str(tmp_path / "killed"))
        steps = checkpointer.all_steps()
        assert not steps or steps[-1] < 12
        for step in steps:  # whatever is listed restores in full
            assert {"state", "data", "meta"} <= set(checkpointer.read_everything(step))
        checkpointer.close()
    restart = subprocess.Popen(
        _train_cli(tmp_path / "killed", tfds_dir, *args),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # The same run uninterrupted, in this process while the restart runs (the same weights as
        # from the command line: test_sigint_and_sigterm_save_the_current_step_and_exit_for_a_resume).
        config = tiny_demo(
            tfds_dir, **{"evals.at_end": False, "log_every": 1, "steps": 12, "checkpoint_every": 2}
        )
        train_lib.train(config, str(tmp_path / "straight"), log=lambda _: None)
        output = restart.communicate(timeout=600)[0]
    finally:
        restart.kill()
        restart.wait()
    assert restart.returncode == 0, output[-4000:]
    step_a, a = _params(tmp_path / "straight")
    step_b, b = _params(tmp_path / "killed")
    assert step_a == step_b == 12
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
