"""Cost of the in-step embedding metrics on the demo configuration.

    python benchmarks/metrics_overhead.py [--steps 20] [--devices 1]

Times the jitted train step of configs/demo.py with and without the embedding metrics
(median over --steps calls after warm-up) and prints the overhead per metrics step and
amortised over `metrics.every` steps.
"""

import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--data-dir", default="data/tfds")
args = parser.parse_args()
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import importlib.util  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from clipjax.data.sources import make_source  # noqa: E402
from clipjax.parallel import host_batch_to_global, make_mesh  # noqa: E402
from clipjax.trainer.state import init_train_state  # noqa: E402
from clipjax.trainer.step import STEP_INPUTS, make_train_step  # noqa: E402


def main():
    spec = importlib.util.spec_from_file_location(
        "demo", os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")
    )
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    config = demo.get_config("")
    config.data.data_dir = args.data_dir
    source = make_source(config.data)
    source.prepare()
    tokenizer = source.tokenizer()
    mesh = make_mesh(config.mesh)
    setup = init_train_state(config, mesh, vocab_size=tokenizer.vocab_size)
    step_fn = make_train_step(config, mesh, setup.graphdef, setup.shardings, setup.tx, setup.schedule)
    iterator = source.train_iterator(tokenizer, seed=0)
    batch = host_batch_to_global({k: v for k, v in next(iterator).items() if k in STEP_INPUTS}, mesh)
    state = setup.state

    def timed(with_metrics):
        nonlocal state
        state, m = step_fn(state, batch, with_metrics)  # compile + warm-up
        jax.block_until_ready(m)
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            state, m = step_fn(state, batch, with_metrics)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    # Interleave so that load on the machine affects both alike.
    plain, with_metrics = [], []
    for _ in range(3):
        plain.append(timed(False))
        with_metrics.append(timed(True))
    t0, t1 = float(np.median(plain)), float(np.median(with_metrics))
    every = config.metrics.every
    print(f"devices {jax.device_count()}, batch {config.data.batch_size}, embed_dim {config.model.embed_dim}")
    print(f"train step without metrics : {t0 * 1e3:8.1f} ms (median)")
    print(f"train step with metrics    : {t1 * 1e3:8.1f} ms (median)")
    print(f"overhead on a metrics step : {100 * (t1 - t0) / t0:8.2f} %")
    print(f"overhead amortised, every {every} steps: {100 * (t1 - t0) / t0 / every:8.3f} %")


if __name__ == "__main__":
    main()
