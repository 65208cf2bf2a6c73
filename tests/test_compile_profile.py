"""The tests' compile log (tests/conftest.py) and benchmarks/test_compile_profile.py, which reads it."""

import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers import CompileLog, load_benchmark


def test_each_compile_is_logged_under_its_test_and_function_and_the_profile_adds_them_up(tmp_path):
    profile = load_benchmark("test_compile_profile")
    log = CompileLog(tmp_path)
    jax.monitoring.register_event_duration_secs_listener(log)
    # A cached program is read back, not compiled: these two must compile (and nothing else:
    # numpy inputs, no eager operation). Salted, not by turning the cache off: JAX decides once
    # per process whether it uses the cache, at its first compile.
    salt = np.float32(time.time())
    try:
        log.test = "tests/test_a.py::test_one"

        def doubled_sine(x):
            return jnp.sin(x * salt) * 2

        jax.jit(doubled_sine)(np.ones(3, np.float32)).block_until_ready()
        log.test = "tests/test_b.py::test_two[x]"

        def cubed(x):
            return (x * salt) ** 3

        jax.jit(cubed)(np.ones((2, 2), np.float32)).block_until_ready()
    finally:
        jax.monitoring.unregister_event_duration_listener(log)
    records = profile.read_log(tmp_path)
    compiled = [
        (test, function, seconds) for test, event, seconds, function in records if event == profile.COMPILE
    ]
    assert {(test, function) for test, function, _ in compiled} == {
        ("tests/test_a.py::test_one", "jit(doubled_sine)"),
        ("tests/test_b.py::test_two[x]", "jit(cubed)"),
    }
    assert {event for _, event, _, _ in records} >= {profile.COMPILE, "jaxpr_trace_duration"}
    text = profile.summarise(records, top=5)
    for test, function, seconds in compiled:
        file = test.split("::")[0]
        assert f"{seconds:8.1f}     1  {file}" in text and f"{seconds:8.1f}     1  {test}" in text
        assert f"     1  {function}" in text
    total = sum(seconds for _, _, seconds in compiled)
    assert f"{profile.COMPILE}: {total:,.0f} s" in text


def test_a_program_compiled_twice_is_counted_as_a_repeat(tmp_path):
    """Two workers that miss the same cache key both compile and write it: the profile counts the
    second write as a repeat, and a program compiled once is not one."""
    profile = load_benchmark("test_compile_profile")
    log = CompileLog(tmp_path)
    unwatch = log.watch_cache_writes()
    cache_dir = pathlib.Path(jax.config.jax_compilation_cache_dir)
    salt = np.float32(time.time())  # programs this suite's cache cannot already hold

    def halved_cosine(x):
        return jnp.cos(x * salt) / 2

    def squared(x):
        return (x * salt) ** 2

    log.test = "tests/test_a.py::test_one"
    try:
        for function in (halved_cosine, halved_cosine, squared):
            # What a second worker sees: an empty in-memory cache and a persistent one without
            # the entry (its twin is still compiling).
            jax.clear_caches()
            for entry in cache_dir.glob(f"jit_{function.__name__}-*"):
                entry.unlink()
            jax.jit(function)(np.ones(5, np.float32)).block_until_ready()
    finally:
        unwatch()
    records = profile.read_log(tmp_path)
    writes = [function for _, event, _, function in records if event == profile.CACHE_WRITE]
    assert [key.split(" ")[0] for key in writes] == ["jit_halved_cosine"] * 2 + ["jit_squared"]
    assert writes[0] == writes[1] != writes[2]
    text = profile.summarise(records, top=5)
    assert "programs written to the compilation cache: 2; compiled more than once (the same key): 1," in text
    assert "jit_halved_cosine (repeats)" in text and "jit_squared (repeats)" not in text


def test_cpu_seconds_of_a_test_count_its_own_and_its_subprocesses(tmp_path):
    profile = load_benchmark("test_compile_profile")
    log = CompileLog(tmp_path)
    log.test = "tests/test_c.py::test_three"
    burn = "import time\nend = time.process_time() + {}\nwhile time.process_time() < end: pass"
    with log.cpu_seconds():
        exec(burn.format(0.2))
        subprocess.run([sys.executable, "-c", burn.format(0.5)], check=True)
    records = profile.read_log(tmp_path)
    seconds = {event: secs for _, event, secs, _ in records}
    assert 0.2 <= seconds["cpu_self"] < 0.45
    assert seconds["cpu_children"] >= 0.5  # the child's start-up too
    total = seconds["cpu_self"] + seconds["cpu_children"]
    assert f"{total:8.1f}  tests/test_c.py\n" in profile.summarise(records, top=5)
