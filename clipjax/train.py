"""Train a dual encoder (the command line over `clipjax.trainer.train`).

    python -m clipjax.train --config configs/demo.py --workdir runs/demo [--config.steps=500]

A restart with the same --workdir resumes from the latest checkpoint, data iterator included.
At the end the held-out split is evaluated and written to <workdir>/report.json. Mistakes are
reported in one line (exit status 2); --verbose or CLIPJAX_VERBOSE=1 adds tracebacks.
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from clipjax.cli import check_config_command_line, flags_parser, run_reporting_errors, verbose
from clipjax.config import translate_legacy_flags
from clipjax.console import quiet_libraries
from clipjax.parallel.distributed import initialize_from_environment
from clipjax.trainer import train

PROG = "clipjax.train"


def main(argv):
    del argv
    # Orbax and tfds log every checkpoint operation at INFO, Orbax each failure from each thread.
    quiet_libraries(verbose())

    def body():
        initialize_from_environment()
        lead = jax.process_index() == 0
        train(flags.FLAGS.config, flags.FLAGS.workdir, log=print if lead else (lambda _: None))

    run_reporting_errors(PROG, body)


if __name__ == "__main__":
    sys.argv = translate_legacy_flags(sys.argv)
    check_config_command_line(PROG, sys.argv)
    config_flags.DEFINE_config_file(
        "config", None, "A configs/*.py file (optionally file.py:arg).", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Where checkpoints, logs and report.json go.")
    flags.DEFINE_bool("verbose", False, "Print tracebacks with errors.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=flags_parser(PROG))
