"""What a LiT step costs next to a full step: the demo's train step with every parameter
trainable, with the image tower frozen, and with the image tower and its projection frozen
(configs/lit_demo.py), on the same batch.

    python benchmarks/lit_step_cost.py [--steps 20] [--rounds 3] [--devices 1] [--config configs/demo.py]

For each variant: `clipjax.trainer.step.make_train_step` on the state of `init_train_state`
(exactly the step `clipjax.train` runs between embedding-metrics steps), compiled first (the
compile time is printed), then `--rounds` rounds of `--steps` timed steps each, the variants
interleaved round by round so that load on the machine affects them alike; the median of all
timed steps is reported. FLOPs come from XLA's cost analysis of the compiled step
(`compiled.cost_analysis()["flops"]`; XLA counts the body of a `scan` once, so a tower whose
layers are scanned is under-counted alike in all variants), and from the matmuls and
convolutions of the traced gradient (a jaxpr walk, every scan iteration counted). The batch is
synthetic (uniform uint8 images, random token ids), so no input pipeline is timed.
"""

import argparse
import os
import sys

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--config", default="configs/demo.py", help="a configs/*.py file (file.py:arg)")
parser.add_argument("--steps", type=int, default=20, help="timed steps per round and variant")
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--devices", type=int, default=1, help="virtual CPU devices (ignored on accelerators)")
args = parser.parse_args()
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from clipjax.cli import load_config_file  # noqa: E402
from clipjax.config import apply_overrides  # noqa: E402
from clipjax.parallel import host_batch_to_global, make_mesh  # noqa: E402
from clipjax.trainer.state import init_train_state  # noqa: E402
from clipjax.trainer.step import STEP_INPUTS, make_grad_fn, make_train_step  # noqa: E402

# The jaxpr walk the FLOP tests check clipjax.flops against.
from tests.test_flops import traced_matmul_flops as matmul_flops  # noqa: E402

VARIANTS = {
    "all trainable": (),
    "image tower frozen": ("image_tower",),
    "image tower + projection frozen (LiT)": ("image_tower", "image_proj"),
}


def synthetic_batch(config, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    b, size, length = config.data.batch_size, config.data.image_size, config.data.tokenizer.max_len
    return {
        "image": rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
        "text": rng.integers(1, vocab, (b, length), dtype=np.int32),
        "text_id": np.arange(b, dtype=np.int32),
        "label": np.zeros(b, np.int32),
    }


class Variant:
    def __init__(self, config, mesh, vocab, batch):
        setup = init_train_state(config, mesh, vocab_size=vocab)
        step_fn = make_train_step(config, mesh, setup.graphdef, setup.shardings, setup.tx, setup.schedule)
        self.state, self.batch = setup.state, batch
        t = time.perf_counter()
        compiled = step_fn.lower(self.state, batch, False).compile()
        self.compile_s = time.perf_counter() - t
        self.call = compiled  # the static with_metrics=False is part of it
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.xla_flops = float(cost.get("flops", float("nan")))
        self.traced_flops = matmul_flops(
            jax.make_jaxpr(make_grad_fn(config, setup.graphdef, mesh))(self.state["params"], batch).jaxpr
        )
        self.opt_state = sum(x.size for x in jax.tree.leaves(self.state["opt_state"]))
        self.times: list[float] = []
        self.run(1)  # the first call (executable cache lookup, buffers) is not timed

    def run(self, steps: int, timed: bool = False) -> None:
        for _ in range(steps):
            t = time.perf_counter()
            self.state, metrics = self.call(self.state, self.batch)
            jax.block_until_ready((self.state, metrics))
            if timed:
                self.times.append(time.perf_counter() - t)


def main():
    base = load_config_file(args.config)
    mesh = make_mesh(base.mesh)
    vocab = int(base.data.tokenizer.vocab_size or 512)
    batch = host_batch_to_global(
        {k: v for k, v in synthetic_batch(base, vocab).items() if k in STEP_INPUTS}, mesh
    )
    variants = {}
    for name, frozen in VARIANTS.items():
        config = apply_overrides(base.copy_and_resolve_references(), {"optim.frozen": frozen})
        variants[name] = Variant(config, mesh, vocab, batch)
    for _ in range(args.rounds):
        for variant in variants.values():
            variant.run(args.steps, timed=True)

    full = variants["all trainable"]
    t_full = float(np.median(full.times))
    print(
        f"{args.config}: batch {base.data.batch_size}, {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s), median of {args.rounds} x {args.steps} steps"
    )
    header = (
        f"{'variant':40s} {'step ms':>9s} {'vs all':>7s} {'XLA GFLOP':>10s} {'vs all':>7s} "
        f"{'matmul GFLOP':>13s} {'vs all':>7s} {'opt state':>10s} {'compile s':>10s}"
    )
    print(header)
    for name, v in variants.items():
        t = float(np.median(v.times))
        print(
            f"{name:40s} {t * 1e3:9.1f} {t / t_full:7.2f} {v.xla_flops / 1e9:10.2f} "
            f"{v.xla_flops / full.xla_flops:7.2f} {v.traced_flops / 1e9:13.2f} "
            f"{v.traced_flops / full.traced_flops:7.2f} {v.opt_state:10,d} {v.compile_s:10.1f}"
        )


if __name__ == "__main__":
    main()
