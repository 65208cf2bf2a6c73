"""The XLA flags of the tests (tests/conftest.py sets them before JAX starts; no JAX import here).

The tests' programs are tiny and most run a few times: compiling them costs more than running
them, and LLVM's optimisations are most of XLA's CPU compile time. Without them (level 0) a cold
suite took 11% less time than with the expensive passes alone off (level 1): 48:42 against 54:37
on a 2-core host (the trained captioner then still ran at level 0). Their code runs slower, which only the few tests that run many steps notice:
those start their trainers with `OPTIMISED_CODE` swapped in.
"""

TEST_XLA_FLAGS = (
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true"
)

# (what to replace, with what) in XLA_FLAGS: LLVM's cheap optimisations back on.
OPTIMISED_CODE = ("--xla_backend_optimization_level=0", "--xla_backend_optimization_level=1")
