"""Evaluate a checkpoint on whatever devices are at hand, and write report.json and report.md.

    python -m clipjax.evaluate --workdir runs/demo [--step 900] [--out runs/demo/eval] \
        [--config.evals.max_examples=5000]

Only the parameters are restored (no optimizer state), directly into the shardings of this
machine's mesh, whatever mesh trained them. The config is the run's own (<workdir>/config.json);
`--config.key=value` overrides any field, for example the evaluation set size. Mistakes are
reported in one line (exit status 2); --verbose or CLIPJAX_VERBOSE=1 adds tracebacks.
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from clipjax.api import RestoreError, evaluate_workdir, load_run_config
from clipjax.cli import check_override_keys, fail, flag_value, flags_parser, run_reporting_errors, verbose
from clipjax.config import ConfigError, translate_legacy_flags
from clipjax.console import quiet_libraries
from clipjax.parallel.distributed import initialize_from_environment

PROG = "clipjax.evaluate"


def main():
    sys.argv = translate_legacy_flags(sys.argv)
    workdir = flag_value(sys.argv, "workdir")
    if workdir is None:
        fail(PROG, "--workdir is required")
    # Before anything touches a device: reading the run's checkpoints does.
    run_reporting_errors(PROG, initialize_from_environment)
    try:
        # The run's own config is the base, so `--config.key=value` overrides work as in training.
        base = load_run_config(workdir, log=lambda line: print(line, file=sys.stderr))
        check_override_keys(sys.argv, base)
    except (RestoreError, ConfigError) as e:
        fail(PROG, str(e))
    config_flags.DEFINE_config_dict("config", base)
    flags.DEFINE_string("workdir", None, "A training workdir (holds config.json and checkpoints/).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest readable).")
    flags.DEFINE_string("out", None, "Where report.json and report.md go (default: the workdir).")
    flags.DEFINE_bool("verbose", False, "Print tracebacks with errors.")

    def run(argv):
        del argv
        quiet_libraries(verbose())

        def body():
            lead = jax.process_index() == 0
            evaluate_workdir(
                flags.FLAGS.workdir,
                step=flags.FLAGS.step,
                out=flags.FLAGS.out,
                config=flags.FLAGS.config,
                log=print if lead else (lambda _: None),
            )

        run_reporting_errors(PROG, body)

    app.run(run, flags_parser=flags_parser(PROG))


if __name__ == "__main__":
    main()
