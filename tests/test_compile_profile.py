"""The tests' compile log (tests/conftest.py) and benchmarks/test_compile_profile.py, which reads it."""

import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers import CompileLog, load_benchmark


def test_each_compile_is_logged_under_its_test_and_function_and_the_profile_adds_them_up(tmp_path):
    profile = load_benchmark("test_compile_profile")
    log = CompileLog(tmp_path)
    jax.monitoring.register_event_duration_secs_listener(log)
    # A cached program is read back, not compiled: these two must compile (and nothing else:
    # numpy inputs, no eager operation).
    cache_on = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        log.test = "tests/test_a.py::test_one"

        def doubled_sine(x):
            return jnp.sin(x) * 2

        jax.jit(doubled_sine)(np.ones(3, np.float32)).block_until_ready()
        log.test = "tests/test_b.py::test_two[x]"

        def cubed(x):
            return x**3

        jax.jit(cubed)(np.ones((2, 2), np.float32)).block_until_ready()
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_on)
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
