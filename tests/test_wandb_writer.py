"""The Weights & Biases writer, offline: what a run logs there is read back from its `.wandb` file
and compared with metrics.jsonl; a resumed run continues the same W&B run; only the lead process
writes; a missing wandb package is one config error before anything is built."""

import json
import pathlib
import struct
import sys
import time

import numpy as np
import pytest

from clipjax import trainer as train_lib
from clipjax.config import ConfigError, apply_overrides, default_config, validate
from clipjax.metric_writer import MetricWriter, read_metrics
from clipjax.run_store.layout import WANDB_RUN_ID
from clipjax.run_store.resume import check_resume
from clipjax.wandb_writer import MISSING_PACKAGE
from tests.helpers import tiny_demo

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

QUIET = dict(log=lambda _: None)


@pytest.fixture(scope="module", autouse=True)
def offline_wandb(tmp_path_factory):
    """Offline mode, and every directory wandb writes to (settings, caches, logs) kept under tmp:
    no network, nothing outside the test's folders. wandb reads these once per process, so they
    are set for the whole module."""
    home = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        for name in ("DIR", "CACHE_DIR", "CONFIG_DIR", "DATA_DIR", "ARTIFACT_DIR"):
            mp.setenv(f"WANDB_{name}", str(home / name.lower()))
        mp.delenv("WANDB_API_KEY", raising=False)
        yield
        wandb.teardown()


# ----------------------------------------------------------------------------------------------
# Reading a run back. The `.wandb` file is a LevelDB-style log: a 7-byte header (':W&B', magic,
# version), then 32 KiB blocks of chunks (masked crc32c, length, type) that carry serialised
# `wandb_internal_pb2.Record`s; a record may span blocks (first / middle / last chunks).

BLOCK, CHUNK_HEADER = 32 * 1024, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path) -> list:
    data = pathlib.Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, partial, pos = [], b"", 7
    while pos + CHUNK_HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < CHUNK_HEADER:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if pos + CHUNK_HEADER + length > len(data):  # still being written
            break
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            partial = chunk
        elif kind == MIDDLE:
            partial += chunk
        elif kind == LAST:
            records.append(partial + chunk)
        else:
            raise AssertionError(f"{path}: chunk type {kind} at byte {pos}")
    return [wandb_internal_pb2.Record.FromString(r) for r in records]


def _item_value(item):
    if item.value_json:
        return json.loads(item.value_json)
    kind = item.ListFields()[-1]  # the typed value, where a version writes one instead of JSON
    return kind[1]


def run_dirs(workdir) -> list[pathlib.Path]:
    return sorted(pathlib.Path(workdir, "wandb").glob("offline-run-*"))


def finished_records(run_dir, timeout_s: float = 60.0) -> list:
    """The records of a finished run. `finish()` returns before wandb's service has written the
    log (it buffers it until the run's stream closes), so wait for the exit record."""
    (log_file,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_records(log_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{log_file} has no exit record after {timeout_s} s"
        time.sleep(0.1)


def read_run(run_dir) -> dict:
    """{'run': RunRecord, 'history': {step: {key: value}}, 'exit_code'} of an offline run directory."""
    run, history, exit_code = None, {}, None
    for record in finished_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "exit":
            exit_code = record.exit.exit_code
        elif kind == "run":
            run = record.run
        elif kind == "history":
            items = {}
            for item in record.history.item:
                # A histogram is stored under nested keys: (name, 'bins' / 'values' / '_type').
                *parents, leaf = list(item.nested_key) or [item.key]
                target = items
                for parent in parents:
                    target = target.setdefault(parent, {})
                target[leaf] = _item_value(item)
            step = items.pop("_step")
            assert step not in history, f"two history records at step {step}"
            history[step] = items
    return {"run": run, "history": history, "exit_code": exit_code}


def _config(**overrides):
    return apply_overrides(default_config(), {"logging.wandb": True, **overrides})


# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, request):
    """A tiny demo run with W&B on, stopped at step 2 (as a preemption would) and resumed to 4."""
    data_dir = request.getfixturevalue("tfds_dir")
    workdir = tmp_path_factory.mktemp("wandb_run") / "tiny-demo"
    config = tiny_demo(data_dir, **{"evals.at_end": False, "logging.wandb": True})
    train_lib.train(config, str(workdir), stop_at=2, **QUIET)
    first_id = (workdir / WANDB_RUN_ID).read_text().strip()
    train_lib.train(config, str(workdir), **QUIET)
    return workdir, first_id


def test_wandb_history_is_metrics_jsonl(resumed_run):
    workdir, _ = resumed_run
    history = {}
    for run_dir in run_dirs(workdir):
        history.update(read_run(run_dir)["history"])
    metrics = {r["step"]: r for r in read_metrics(str(workdir))}
    assert sorted(metrics) == [2, 4] and sorted(history) == [2, 4]
    for step, record in metrics.items():
        numbers = {
            k: v
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        assert "loss" in numbers and len(numbers) > 3
        logged = {k: history[step][k] for k in numbers}
        assert logged == pytest.approx(numbers, rel=1e-12), step
    assert history[2]["loss"] != history[4]["loss"]


def test_wandb_run_carries_config_name_and_project(resumed_run):
    workdir, _ = resumed_run
    run = read_run(run_dirs(workdir)[0])["run"]
    assert (run.project, run.display_name) == ("clipjax", "tiny-demo")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    stored = json.loads((workdir / "config.json").read_text())
    assert config["steps"] == stored["steps"] == 4
    assert config["model"] == stored["model"] and config["logging"]["wandb"] is True


def test_resumed_run_continues_the_same_wandb_run(resumed_run):
    workdir, first_id = resumed_run
    assert (workdir / WANDB_RUN_ID).read_text().strip() == first_id
    first, second = (read_run(d) for d in run_dirs(workdir))
    assert first["run"].run_id == second["run"].run_id == first_id
    assert first["exit_code"] == second["exit_code"] == 0
    # Each attempt logged its own steps: the resumed one carries on, it does not start over.
    assert sorted(first["history"]) == [2] and sorted(second["history"]) == [4]


def test_spectra_join_the_step_record_as_log10_histograms(tmp_path):
    eigenvalues = np.array([4.0, 1.0, 1e-2, 1e-4])
    writer = MetricWriter(str(tmp_path), config=_config())
    writer.write_spectra(3, {"img_spectrum": eigenvalues}, {"img_effective_rank": 2.5})
    writer.write(3, {"loss": 1.5, "img_effective_rank": 2.5})
    writer.write(5, {"loss": float("nan")})
    writer.close()
    (run_dir,) = run_dirs(tmp_path)
    history = read_run(run_dir)["history"]
    assert sorted(history) == [3, 5]  # spectra and scalars of step 3: one record
    assert history[3]["loss"] == 1.5 and history[3]["img_effective_rank"] == 2.5
    hist = history[3]["img_spectrum_log10"]
    assert hist["bins"][0] == pytest.approx(-4.0) and hist["bins"][-1] == pytest.approx(np.log10(4.0))
    assert sum(hist["values"]) == len(eigenvalues)
    # metrics.jsonl spells a non-finite loss as a string; W&B still gets a number.
    assert read_metrics(str(tmp_path))[1]["loss"] == "nan" and np.isnan(history[5]["loss"])


def test_a_run_that_fails_is_marked_so(tmp_path):
    writer = MetricWriter(str(tmp_path), config=_config())
    writer.write(1, {"loss": 1.0})
    writer.close(failed=True)
    (run_dir,) = run_dirs(tmp_path)
    assert read_run(run_dir)["exit_code"] == 1


def test_a_training_run_that_raises_is_marked_failed(tfds_dir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("progress line failed")

    monkeypatch.setattr(train_lib.run.Progress, "update", broken)
    config = tiny_demo(tfds_dir, **{"evals.at_end": False, "logging.wandb": True})
    with pytest.raises(RuntimeError, match="progress line failed"):
        train_lib.train(config, str(tmp_path), **QUIET)
    (run_dir,) = run_dirs(tmp_path)
    run = read_run(run_dir)
    # The step being logged when it failed still reached W&B.
    assert run["exit_code"] == 1 and sorted(run["history"]) == [2]


def test_only_the_lead_process_writes_to_wandb(tmp_path):
    writer = MetricWriter(str(tmp_path), enabled=False, config=_config())
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert not (tmp_path / "wandb").exists() and not (tmp_path / WANDB_RUN_ID).exists()


def test_without_wandb_nothing_is_sent(tmp_path):
    writer = MetricWriter(str(tmp_path), config=_config(**{"logging.wandb": False}))
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert not (tmp_path / "wandb").exists() and read_metrics(str(tmp_path)) == [{"step": 1, "loss": 1.0}]


def test_missing_wandb_is_one_config_error_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    config = _config()
    with pytest.raises(ConfigError) as info:
        validate(config, num_devices=8)
    assert (
        str(info.value) == MISSING_PACKAGE == "logging.wandb=True needs the wandb package: pip install wandb"
    )
    workdir = tmp_path / "never"
    with pytest.raises(ConfigError, match="pip install wandb"):
        train_lib.train(tiny_demo(str(tmp_path), **{"logging.wandb": True}), str(workdir), **QUIET)
    assert not workdir.exists()
    config.logging.wandb = False
    validate(config, num_devices=8)


def test_wandb_settings_may_change_when_resuming():
    stored = default_config()
    changes = check_resume(stored, _config(**{"logging.wandb_project": "p"}), "w")
    assert set(changes) == {"logging.wandb", "logging.wandb_project"}


def test_wandb_mode_is_checked():
    with pytest.raises(ConfigError, match="logging.wandb_mode"):
        validate(_config(**{"logging.wandb_mode": "cloud"}), num_devices=8)
