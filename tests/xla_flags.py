"""The XLA flags of the tests (tests/conftest.py sets them before JAX starts; no JAX import here).

The tests' programs are tiny and most run a few times: compiling them costs more than running
them. Two settings cut XLA's CPU compile time; programs compute the same values up to float32
rounding (the order of operations may differ):
- LLVM's optimisations off (level 0): a cold suite took 11% less time than with only the
  expensive passes off (level 1), 48:42 against 54:37 on a 2-core host;
- XLA's older elemental emitters in place of the MLIR fusion emitters
  (`--xla_cpu_use_fusion_emitters=false`): the tiny demo's train step on 8 devices compiled in
  5.0 s instead of 7.2 (9 CPU-seconds in all instead of 15: the MLIR pipeline runs threads of its
  own), and a sample of 12 tests (collapse training, sharded gradients, image-image) took 275
  CPU-seconds instead of 353. The cold suite then took 39:36 (4,322 + 188 CPU-seconds) against
  48:42 (5,390 + 215), XLA compiling 1,761 s of it against 2,763. One test compared pixels bit
  for bit across two programs; they now agree to float32 rounding (tests/test_augment.py).
Their code runs slower, which only the few tests that run many steps notice: those start their
trainers with `optimised_code(flags)`.
"""

TEST_XLA_FLAGS = (
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
)


def optimised_code(xla_flags: str) -> str:
    """`xla_flags` with LLVM's cheap optimisations and the fusion emitters back on."""
    xla_flags = xla_flags.replace("--xla_backend_optimization_level=0", "--xla_backend_optimization_level=1")
    return xla_flags.replace("--xla_cpu_use_fusion_emitters=false", "--xla_cpu_use_fusion_emitters=true")
