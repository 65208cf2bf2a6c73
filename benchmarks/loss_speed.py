"""Forward+backward time of the gather and ring losses, 8 CPU devices, against a plain matmul.

    python benchmarks/loss_speed.py [--batch 8192] [--dim 256] [--repeats 5]

Each variant is compiled, run once to warm up, then timed `--repeats` times; the median is
printed. FLOP/s counts the matmul FLOPs each variant actually executes (2 B^2 d per B x B x d
matmul, summed over devices): the gather form does 2 logits matmuls and 4 gradient matmuls
for InfoNCE (1 and 2 for SigLIP); the ring does 1 forward matmul and, in the backward pass,
two laps of 1 recomputation and 1 gradient matmul each, for either loss. The reference is the same-size matmul
[B, d] @ [d, B] with rows sharded over the devices, i.e. the peak the loss could approach.
"""

import argparse
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from clipjax.losses import (  # noqa: E402
    global_infonce_loss,
    global_sigmoid_loss,
    ring_infonce_loss,
    ring_sigmoid_loss,
)
from clipjax.losses.blockwise import default_chunk  # noqa: E402

AXES = ("data",)


def _median_seconds(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _variants(mesh, block, dim):
    kw = dict(mesh=mesh, batch_axes=AXES)
    chunk = default_chunk(block, dim)
    # (name, loss, matmuls of B x B x d executed in forward+backward)
    narrow = min(64, block)
    return [
        ("softmax gather", lambda i, t, s, b: global_infonce_loss(i, t, s, **kw), 6),
        (
            f"softmax ring chunk={narrow}",
            lambda i, t, s, b: ring_infonce_loss(i, t, s, chunk=narrow, **kw),
            5,
        ),
        (f"softmax ring chunk={chunk} (default)", lambda i, t, s, b: ring_infonce_loss(i, t, s, **kw), 5),
        ("sigmoid gather", lambda i, t, s, b: global_sigmoid_loss(i, t, s, b, **kw), 3),
        (
            f"sigmoid ring chunk={narrow}",
            lambda i, t, s, b: ring_sigmoid_loss(i, t, s, b, chunk=narrow, **kw),
            5,
        ),
        (f"sigmoid ring chunk={chunk} (default)", lambda i, t, s, b: ring_sigmoid_loss(i, t, s, b, **kw), 5),
    ]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    batch, dim = args.batch, args.dim

    mesh = jax.make_mesh((8,), AXES, axis_types=(AxisType.Auto,))
    rows = NamedSharding(mesh, P(AXES))
    k1, k2 = jax.random.split(jax.random.key(0))
    img = jax.device_put(jax.random.normal(k1, (batch, dim)) / dim**0.5, rows)
    txt = jax.device_put(jax.random.normal(k2, (batch, dim)) / dim**0.5, rows)
    scale, bias = jnp.float32(2.7), jnp.float32(-6.3)
    matmul_flops = 2 * batch * batch * dim

    matmul = jax.jit(lambda i, t: i @ t.T, in_shardings=(rows, NamedSharding(mesh, P())), out_shardings=rows)
    t_matmul = _median_seconds(matmul, (img, jax.device_put(txt, NamedSharding(mesh, P()))), args.repeats)
    peak = matmul_flops / t_matmul

    print(f"forward+backward at B={batch:,}, d={dim}, 8 CPU devices, median of {args.repeats}")
    print(f"{'variant':<26} {'time':>9} {'matmuls':>8} {'GFLOP/s':>9} {'vs matmul':>10}")
    print(f"{'plain matmul B x d x B':<26} {t_matmul * 1e3:>7.1f}ms {1:>8} {peak / 1e9:>9.1f} {1:>9.0%}")
    for name, loss, matmuls in _variants(mesh, batch // 8, dim):
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
        seconds = _median_seconds(step, (img, txt, scale, bias), args.repeats)
        flops = matmuls * matmul_flops / seconds
        print(
            f"{name:<26} {seconds * 1e3:>7.1f}ms {matmuls:>8} {flops / 1e9:>9.1f} {flops / peak:>9.0%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
