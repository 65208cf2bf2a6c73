"""Check a run against a TPU pod before booking it: the TPU compiler, run on this host.

    python -m clipjax.plan --config configs/clip_vit_b16.py --topology v5p:4x4x4 [--config.x=y ...]
    python -m clipjax.plan --config configs/clip_vit_b16.py --topology v5p:4x4x4 --find_batch

Compiles the real train step, the metrics step and the evaluation encoders for the topology
(`jax.experimental.topologies`: no TPU needed, only libtpu: pip install -e '.[tpu]') and prints
memory per chip against HBM (and whether it fits), model FLOPs beside XLA's count, every
collective of the step, a roofline estimate of the step time with the MFU it implies, and the
decode rate each host's input pipeline must reach. `--find_batch` adds the largest global batch
that fits, with `loss.impl` as configured and switched (ring / gather). Mistakes are one line
(exit status 2); docs/scaling.md has the tables for the shipped configs.
"""

from __future__ import annotations

import copy
import os
import sys

# The host compiles for the TPU through libtpu's topology API; jax's own backend stays the CPU
# (read when jax is imported, so set before anything imports it).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags, logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from clipjax.cli import check_config_command_line, flag_value, flags_parser, run_reporting_errors  # noqa: E402
from clipjax.config import translate_legacy_flags  # noqa: E402
from clipjax.planning.report import IMAGES_PER_CORE  # noqa: E402

PROG = "clipjax.plan"


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.ERROR)
    from clipjax.planning.planner import build_plan, largest_batch
    from clipjax.planning.report import render

    def body():
        config = flags.FLAGS.config
        name = flag_value(sys.argv, "config") or ""
        topology = flags.FLAGS.topology
        log = lambda line: print(line, file=sys.stderr, flush=True)
        plan = build_plan(
            config,
            topology,
            config_name=name,
            vocab_size=flags.FLAGS.vocab_size,
            embed=not flags.FLAGS.skip_embed,
            images_per_core=flags.FLAGS.images_per_core,
            log=log,
        )
        print(render(plan), flush=True)
        if flags.FLAGS.find_batch:
            print("## Largest global batch that fits (train and metrics steps)\n")
            for impl in (config.loss.impl, "gather" if config.loss.impl == "ring" else "ring"):
                trial = copy.deepcopy(config)
                trial.loss.impl = impl
                if impl != "ring":
                    trial.loss.chunk = 0
                log(f"searching the largest batch with loss.impl={impl}...")
                batch = largest_batch(
                    trial,
                    topology,
                    vocab_size=flags.FLAGS.vocab_size,
                    micro_per_chip=flags.FLAGS.micro_batch_per_chip,
                    log=log,
                )
                print(
                    f"- loss.impl={impl}: {batch:,}"
                    if batch
                    else f"- loss.impl={impl}: not even one example per chip fits"
                )

    run_reporting_errors(PROG, body)


if __name__ == "__main__":
    sys.argv = translate_legacy_flags(sys.argv)
    check_config_command_line(PROG, sys.argv, {"topology": "for example v5p:4x4x4, v5e:16x16, v6e:16x16"})
    config_flags.DEFINE_config_file(
        "config", None, "A configs/*.py file (optionally file.py:arg).", lock_config=True
    )
    flags.DEFINE_string("topology", None, "A TPU slice: GENERATION:AxBxC (v5p) or GENERATION:AxB (v5e, v6e).")
    flags.DEFINE_bool("find_batch", False, "Also search the largest global batch that fits.")
    flags.DEFINE_integer(
        "micro_batch_per_chip",
        0,
        "With --find_batch: run every trial batch as micro-batches of this many examples per chip.",
    )
    flags.DEFINE_bool("skip_embed", False, "Do not compile the evaluation encoders.")
    flags.DEFINE_integer(
        "vocab_size", 0, "The tokenizer's vocabulary size, where its file is not readable here."
    )
    flags.DEFINE_float("images_per_core", IMAGES_PER_CORE, "Images/s one host core decodes (docs/data.md).")
    flags.DEFINE_bool("verbose", False, "Print tracebacks with errors.")
    app.run(main, flags_parser=flags_parser(PROG))
