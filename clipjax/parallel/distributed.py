"""Multi-process start-up: join the other processes before JAX touches any device.

The launchers in launch/ pass the coordinator through the environment:
  CLIPJAX_COORDINATOR=host:port  CLIPJAX_NUM_PROCESSES=N  CLIPJAX_PROCESS_ID=i
  CLIPJAX_LOCAL_DEVICES=D   (CPU only: D virtual devices per process, for tests and workstations)
On a multi-host TPU VM the TPU runtime describes the slice itself, and
`jax.distributed.initialize()` needs no arguments.
"""

from __future__ import annotations

import os

import jax

_initialized = False


def initialize_from_environment(environ=os.environ) -> bool:
    """Call `jax.distributed.initialize` when launched as one of several processes.

    Returns True when this process joined a multi-process run. Safe to call more than once.
    """
    global _initialized
    if _initialized:
        return True
    local_devices = environ.get("CLIPJAX_LOCAL_DEVICES")
    if local_devices:
        jax.config.update("jax_num_cpu_devices", int(local_devices))
    coordinator = environ.get("CLIPJAX_COORDINATOR")
    if coordinator:
        missing = [k for k in ("CLIPJAX_NUM_PROCESSES", "CLIPJAX_PROCESS_ID") if not environ.get(k)]
        if missing:
            raise ValueError(f"CLIPJAX_COORDINATOR is set but {missing[0]} is not")
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(environ["CLIPJAX_NUM_PROCESSES"]),
            process_id=int(environ["CLIPJAX_PROCESS_ID"]),
        )
        _initialized = True
    elif len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        jax.distributed.initialize()
        _initialized = True
    return _initialized
