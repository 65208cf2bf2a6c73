"""Per-device XLA temporary memory of loss forward+backward: gather form vs ring, virtual CPU devices.

    python benchmarks/loss_memory.py [--dim 512] [--device-gib 80] [--devices 8] [--max-batch N]
    python benchmarks/loss_memory.py --devices 32 --min-batch 4194304   # the 4M row


Nothing is allocated: each value_and_grad is lowered from abstract sharded arguments and
compiled, and `memory_analysis().temp_size_in_bytes` is read. Inputs and outputs (the
embeddings and their gradients) are not temporaries and are not counted.
"""

import argparse
import os
import sys

# The device count is fixed when JAX starts: read it before importing jax.
_DEVICES = int(sys.argv[sys.argv.index("--devices") + 1]) if "--devices" in sys.argv else 8
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_DEVICES}"
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

BATCHES = [8_192, 16_384, 32_768, 65_536, 131_072, 262_144, 524_288, 1_048_576, 2_097_152, 4_194_304]
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
    parser.add_argument("--devices", type=int, default=8, help="virtual CPU devices (read before jax starts)")
    parser.add_argument("--min-batch", type=int, default=0, help="skip smaller global batches")
    parser.add_argument(
        "--gather-up-to", type=int, default=1_048_576, help="compile the gather form up to this batch only"
    )
    args = parser.parse_args()

    n = args.devices
    mesh = jax.make_mesh((n,), AXES, axis_types=(AxisType.Auto,))
    losses = _losses(mesh)
    columns = [("softmax", "gather"), ("softmax", "ring"), ("sigmoid", "gather"), ("sigmoid", "ring")]
    print(f"per-device temp memory, forward+backward, d={args.dim}, {n} devices (ring chunk = default)")
    header = f"{'global B':>10} {'chunk':>6} " + " ".join(f"{loss + ' ' + f:>26}" for loss, f in columns)
    print(header)
    print("-" * len(header))
    for batch in BATCHES:
        if batch < args.min_batch or batch % n:
            continue
        cells = []
        for column in columns:
            if column[1] == "gather" and batch > args.gather_up_to:
                cells.append("-")
                continue
            temp = grad_temp_bytes(losses[column], batch, args.dim, mesh=mesh, batch_axes=AXES)
            if column[1] == "gather" and temp > args.device_gib * 2**30:
                cells.append(f"n/a (B x B) {_fmt(temp)}")
            else:
                cells.append(_fmt(temp))
        chunk = default_chunk(batch // n, args.dim)
        print(f"{batch:>10,} {chunk:>6} " + " ".join(f"{c:>26}" for c in cells), flush=True)
    print(
        f"n/a (B x B): the gather form's b x B logits exceed {args.device_gib:g} GiB per device; "
        "the figure is what XLA would need."
    )


if __name__ == "__main__":
    main()
