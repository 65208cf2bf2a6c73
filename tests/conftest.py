"""Test set-up: 8 virtual CPU devices and a persistent compilation cache.

Both must be configured before JAX initialises its backends, so they live here.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Compiled programs are cached per user, outside the checkout, so that a fresh checkout on the
# same machine (CI) reuses them: JAX keys each entry by the program, the jax/XLA versions and the
# device, so a stale entry is never used. CLIPJAX_TEST_JAX_CACHE moves it.
_CACHE = pathlib.Path(
    os.environ.get("CLIPJAX_TEST_JAX_CACHE") or pathlib.Path.home() / ".cache" / "clipjax" / "jax_test_cache"
)
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# The trainers the tests start as subprocesses (kill, resume, two processes) share the cache: a
# tiny run then starts in ~10 s instead of ~17 s.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    """One data directory per test session, so tiny datasets are rendered once per worker."""
    return str(tmp_path_factory.mktemp("tfds"))
