"""Per-device XLA temporary memory of loss forward+backward: gather form vs ring, 8 CPU devices.

    python benchmarks/loss_memory.py [--dim 512] [--device-gib 80]

Nothing is allocated: each value_and_grad is lowered from abstract sharded arguments and
compiled, and `memory_analysis().temp_size_in_bytes` is read. Inputs and outputs (the
embeddings and their gradients) are not temporaries and are not counted.
"""

import argparse
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

from clipjax.losses import (  # noqa: E402
    global_infonce_loss,
    global_sigmoid_loss,
    ring_infonce_loss,
    ring_sigmoid_loss,
)
from clipjax.losses.blockwise import default_chunk, grad_temp_bytes  # noqa: E402

BATCHES = [8_192, 16_384, 32_768, 65_536, 131_072, 262_144, 524_288, 1_048_576]
AXES = ("data",)


def _losses(mesh):
    kw = dict(mesh=mesh, batch_axes=AXES)
    return {
        ("softmax", "gather"): lambda i, t, s, b: global_infonce_loss(i, t, s, **kw),
        ("softmax", "ring"): lambda i, t, s, b: ring_infonce_loss(i, t, s, **kw),
        ("sigmoid", "gather"): lambda i, t, s, b: global_sigmoid_loss(i, t, s, b, **kw),
        ("sigmoid", "ring"): lambda i, t, s, b: ring_sigmoid_loss(i, t, s, b, **kw),
    }


def _fmt(nbytes):
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument(
        "--device-gib",
        type=float,
        default=80.0,
        help="gather entries above this are marked n/a: b x B logits would not fit",
    )
    args = parser.parse_args()

    mesh = jax.make_mesh((8,), AXES, axis_types=(AxisType.Auto,))
    losses = _losses(mesh)
    columns = [("softmax", "gather"), ("softmax", "ring"), ("sigmoid", "gather"), ("sigmoid", "ring")]
    print(f"per-device temp memory, forward+backward, d={args.dim}, 8 devices (ring chunk = default)")
    header = f"{'global B':>10} {'chunk':>6} " + " ".join(f"{loss + ' ' + f:>26}" for loss, f in columns)
    print(header)
    print("-" * len(header))
    for batch in BATCHES:
        cells = []
        for column in columns:
            temp = grad_temp_bytes(losses[column], batch, args.dim, mesh=mesh, batch_axes=AXES)
            if column[1] == "gather" and temp > args.device_gib * 2**30:
                cells.append(f"n/a (B x B) {_fmt(temp)}")
            else:
                cells.append(_fmt(temp))
        chunk = default_chunk(batch // 8, args.dim)
        print(f"{batch:>10,} {chunk:>6} " + " ".join(f"{c:>26}" for c in cells), flush=True)
    print(
        f"n/a (B x B): the gather form's b x B logits exceed {args.device_gib:g} GiB per device; "
        "the figure is what XLA would need."
    )


if __name__ == "__main__":
    main()
