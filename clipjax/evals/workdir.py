"""A workdir's checkpoint evaluated: `python -m clipjax.evaluate` and `clipjax.api.evaluate_workdir`."""

from __future__ import annotations

import jax

from clipjax import paths
from clipjax.data.sources import make_source
from clipjax.evals.report import summary_lines, write_markdown, write_report
from clipjax.evals.runner import EvalRunner
from clipjax.parallel import eval_mesh
from clipjax.run_store import layout
from clipjax.run_store.record import read_run, restore_params, run_tokenizer


def evaluate_workdir(
    workdir: str, *, step: int | None = None, out: str | None = None, config=None, devices=None, log=print
) -> dict:
    """Run the config's evaluators on a checkpoint; write report.json and report.md to `out`
    (default: the workdir). `config` defaults to the run's own."""
    stored, meta = read_run(workdir, log=log)
    config = stored if config is None else config
    mesh = eval_mesh(devices)
    # The data source is read only by the evaluators that need held-out data (and, for
    # first-release checkpoints, to rebuild the tokenizer).
    source = make_source(config.data)
    tokenizer = run_tokenizer(meta, source)
    graphdef, params, step = restore_params(workdir, config, tokenizer, mesh, step, log=log)
    report = EvalRunner(config, source, tokenizer, log=log).run(graphdef, params, mesh, step)
    out = out or workdir
    if jax.process_index() == 0:
        paths.makedirs(out)
        write_report(report, paths.join(out, layout.REPORT))
        write_markdown(report, out, workdir)
        for line in summary_lines(report):
            log(line)
    return report
