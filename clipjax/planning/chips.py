"""What `clipjax.plan` assumes of each TPU generation, with the source of every number.

Source: Google Cloud's TPU system-architecture pages (cloud.google.com/tpu/docs/v5e, /v5p,
/v6e), read 2026-12. HBM is the capacity per chip as those pages give it; the compiler's own
limit is what decides (it refuses a program that does not fit, and `plan` reports that refusal).
ICI is one direction's bandwidth per chip (half the bidirectional figure): the rate at which a
chip's share of a collective leaves it. Peak FLOP/s are the bf16 dense figures
`clipjax.flops.PEAK_FLOPS` uses for MFU.
"""

from __future__ import annotations

import dataclasses

from clipjax.flops import PEAK_FLOPS
from clipjax.schema import ConfigError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # as the topology names it: v5e, v5p, v6e
    device_kind: str  # as jax reports it
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s, one direction, per chip
    peak_flops: float  # bf16 dense FLOP/s
    chips_per_host: int  # in multi-host slices
    host_vcpus: int  # of the host VM that holds `chips_per_host` chips


CHIPS: dict[str, Chip] = {
    # v5e: 16 GB HBM2 at 819 GB/s, 400 GB/s bidirectional ICI, 197 TFLOP/s; multi-host slices
    # use 4-chip hosts (ct5lp-hightpu-4t, 112 vCPUs).
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GiB, 819e9, 200e9, PEAK_FLOPS["TPU v5e"], 4, 112),
    # v5p: 95 GiB HBM2e at 2,765 GB/s, 4,800 Gbps ICI (600 GB/s), 459 TFLOP/s; 4 chips and
    # 208 vCPUs per host.
    "v5p": Chip("v5p", "TPU v5", 95 * GiB, 2765e9, 600e9, PEAK_FLOPS["TPU v5p"], 4, 208),
    # v6e (Trillium): 32 GB HBM at 1,638 GB/s, 800 GB/s bidirectional ICI, 918 TFLOP/s; 8 chips
    # and 180 vCPUs per host (ct6e-standard-8t).
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GiB, 1638e9, 400e9, PEAK_FLOPS["TPU v6e"], 8, 180),
}


class TopologyError(ConfigError):
    """A topology name `plan` cannot use; the message is one line."""


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
    """'v5p:4x4x4' -> (the v5p Chip, (4, 4, 4)); one-line errors for anything else."""
    kind, sep, dims = str(name).partition(":")
    if not sep or kind not in CHIPS:
        raise TopologyError(
            f"--topology {name!r}: expected GENERATION:AxBxC with a generation of {', '.join(sorted(CHIPS))} "
            "(for example v5p:4x4x4 or v5e:16x16)"
        )
    try:
        shape = tuple(int(d) for d in dims.split("x"))
    except ValueError:
        shape = ()
    want = 3 if kind == "v5p" else 2
    if len(shape) != want or any(d < 1 for d in shape):
        raise TopologyError(
            f"--topology {name!r}: a {kind} slice is {'AxBxC' if want == 3 else 'AxB'} chips "
            f"(for example {'v5p:4x4x4' if want == 3 else kind + ':16x16'})"
        )
    return CHIPS[kind], shape
