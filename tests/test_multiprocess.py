"""Two processes x 4 devices on loopback train exactly like one process x 8 devices."""

import json
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from clipjax import trainer as train_lib
from clipjax.checkpoint import Checkpointer
from tests.helpers import ROOT, env_without_device_count, tiny_demo, with_ctrl_c

STEPS = 20


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(workdir, data_dir):
    return [
        sys.executable,
        "-m",
        "clipjax.train",
        "--config",
        str(ROOT / "configs" / "demo.py:tiny"),
        "--workdir",
        str(workdir),
        f"--config.data.data_dir={data_dir}",
        f"--config.steps={STEPS}",
        "--config.log_every=1",
        "--config.checkpoint_every=10",
        "--config.metrics.every=5",
    ]


def _env(**extra):
    return {**env_without_device_count(), "JAX_PLATFORMS": "cpu", **extra}


def _launch_two_processes(command):
    """`command` as processes 0 and 1 of a 2 x 4-device run on loopback, output piped."""
    port = _free_port()
    return [
        subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(
                CLIPJAX_LOCAL_DEVICES="4",
                CLIPJAX_COORDINATOR=f"127.0.0.1:{port}",
                CLIPJAX_NUM_PROCESSES="2",
                CLIPJAX_PROCESS_ID=str(i),
            ),
        )
        for i in range(2)
    ]


def _losses(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _params(workdir):
    """The final parameters, restored onto this process's first device (the run used other devices)."""
    ckpt = Checkpointer(str(workdir))
    step = ckpt.latest_step()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), ckpt.params_metadata(step)
    )
    params = ckpt.restore_params(step, abstract)
    ckpt.close()
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_two_processes_match_one_process(tfds_dir, tmp_path):
    """Losses and final parameters. (Evaluation on two processes, which reads and embeds each
    half of the held-out set on its own host, is test_multiprocess_evals.py's.)"""
    # The two processes start first; they spend much of their start-up waiting for each other
    # and the coordinator, while this process trains.
    no_eval = "--config.evals.at_end=False"
    procs = _launch_two_processes([*_command(tmp_path / "two", tfds_dir), no_eval])
    # One process x 8 devices: this one, with the config `_command` gives.
    overrides = {
        "steps": STEPS,
        "log_every": 1,
        "checkpoint_every": 10,
        "metrics.every": 5,
        "evals.at_end": False,
    }
    try:
        train_lib.train(tiny_demo(tfds_dir, **overrides), str(tmp_path / "one"), log=lambda _: None)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    assert "2 processes" in outputs[0] and "8 devices" in outputs[0]
    assert not outputs[1].strip().startswith("mesh"), "only process 0 prints the run's lines"

    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-5 * abs(one[step]), step
    for a, b in zip(_params(tmp_path / "one"), _params(tmp_path / "two")):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_a_stop_signal_on_one_host_stops_both_at_the_same_step_with_a_checkpoint(tfds_dir, tmp_path):
    """A preemption notice reaches one process (here a Ctrl-C, which a process of a multi-process
    run passes on to itself as SIGTERM); both stop at one agreed step and save it, with no
    per-step collective to agree on it (JAX's coordination service does, in the background),
    and exit with status 75: stopped early, resume me."""
    import re
    import signal
    import time

    workdir = tmp_path / "run"
    command = [*_command(workdir, tfds_dir), "--config.steps=100000", "--config.evals.at_end=False"]
    command = with_ctrl_c(command)
    procs = _launch_two_processes(command)
    try:
        deadline = time.monotonic() + 300
        while not (workdir / "metrics.jsonl").exists() or len(_losses(workdir)) < 3:
            if any(p.poll() is not None for p in procs):
                for p in procs:
                    p.kill()
                pytest.fail("a process ended early:\n" + "\n".join(p.communicate()[0][-3000:] for p in procs))
            assert time.monotonic() < deadline
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGINT)
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    steps = []
    for p, out in zip(procs, outputs):
        assert p.returncode == 75, out
        stopped = [line for line in out.splitlines() if line.startswith("clipjax.train: stopped at step")]
        assert len(stopped) == 1 and "SIGTERM received" in stopped[0], out
        steps.append(int(re.match(r"clipjax\.train: stopped at step (\d+) ", stopped[0]).group(1)))
    step = steps[0]
    assert steps[1] == step
    assert 3 <= step < 100000
    checkpointer = Checkpointer(str(workdir))
    assert checkpointer.latest_step() == step
    checkpointer.close()
