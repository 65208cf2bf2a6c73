"""Test set-up: 8 virtual CPU devices and a persistent compilation cache.

Both must be configured before JAX initialises its backends, so they live here.
"""

import os
import pathlib

from tests.xla_flags import TEST_XLA_FLAGS  # why these flags: its docstring

os.environ.setdefault("XLA_FLAGS", TEST_XLA_FLAGS)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Compiled programs are cached per user, outside the checkout, so that a fresh checkout on the
# same machine (CI) reuses them: JAX keys each entry by the program, the jax/XLA versions and the
# device, so a stale entry is never used. CLIPJAX_TEST_JAX_CACHE moves it.
_CACHE = pathlib.Path(
    os.environ.get("CLIPJAX_TEST_JAX_CACHE") or pathlib.Path.home() / ".cache" / "clipjax" / "jax_test_cache"
)
# Every program is kept, the small ones too: a run's few hundred eager operations (metrics,
# evaluation) compile in 20-50 ms each, and a trainer started as a subprocess (kill, resume, two
# processes) reads them back instead: a warm tiny run takes 5 CPU-seconds instead of 10.
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


import dataclasses  # noqa: E402

import jax.monitoring  # noqa: E402
import pytest  # noqa: E402

from tests.helpers import CompileLog, tiny_demo  # noqa: E402

# Where a cold suite spends its time (benchmarks/test_compile_profile.py reads the folder): every
# trace, lowering and XLA compile of this process, by test. Off unless the folder is named.
_COMPILE_LOG_DIR = os.environ.get("CLIPJAX_TEST_COMPILE_LOG")
_COMPILE_LOG = CompileLog(_COMPILE_LOG_DIR) if _COMPILE_LOG_DIR else None
if _COMPILE_LOG:
    jax.monitoring.register_event_duration_secs_listener(_COMPILE_LOG)
    _COMPILE_LOG.watch_cache_writes()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not _COMPILE_LOG:
        yield
        return
    _COMPILE_LOG.test = item.nodeid
    with _COMPILE_LOG.cpu_seconds():
        yield


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    """One data directory per test session, so tiny datasets are rendered once per worker."""
    return str(tmp_path_factory.mktemp("tfds"))


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    workdir: pathlib.Path
    report: dict  # what train() returned: the end-of-run evaluation
    lines: list  # what it logged
    data_dir: str
    overrides: dict

    def config(self, **overrides):
        """The run's config (a new copy), with dotted-key overrides."""
        return tiny_demo(self.data_dir, **{**self.overrides, **overrides})


# Run control only (clipjax/run_store/resume.py), not in `tiny_run.config()`: they change what the
# run logs and writes, never its weights.
TINY_RUN_EXTRAS = {
    "evals.every": 2,
    "evals.knn.every": 3,
    "profile.start_step": 2,
    "profile.steps": 2,
    "peak_tflops": 1.0,
}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tfds_dir):
    """The tiny demo trained once per test worker, for the tests that read a trained run (load,
    evaluate, init_from) or continue one: 4 steps on 4 data x 2 fsdp devices, each step logged,
    checkpoints at 2 and 4, the end-of-run report. Read it in place; copy it (helpers.copy_run) before anything
    that writes to it. It also carries `TINY_RUN_EXTRAS`, each checked by its own test: an
    evaluation at step 2 (kNN at 3), a profile of steps 2-3, and MFU against 1 TFLOP/s."""
    from clipjax import trainer

    workdir = tmp_path_factory.mktemp("tiny_run") / "run"
    run = TrainedRun(workdir, {}, [], tfds_dir, {"mesh.shape": (4, 2, 1), "log_every": 1})
    report = trainer.train(run.config(**TINY_RUN_EXTRAS), str(workdir), log=run.lines.append)
    files = _files(workdir)
    yield dataclasses.replace(run, report=report)
    assert _files(workdir) == files, "a test changed the shared tiny run: copy it first (helpers.copy_run)"


def _files(folder):
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}
