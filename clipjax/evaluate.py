"""Evaluate a checkpoint on whatever devices are at hand, and write report.json and report.md.

    python -m clipjax.evaluate --workdir runs/demo [--step 900] [--out runs/demo/eval] \
        [--config.evals.max_examples=5000]

Only the parameters are restored (no optimizer state), directly into the shardings of this
machine's mesh, whatever mesh trained them. The config is the run's own (<workdir>/config.json);
`--config.key=value` overrides any field, for example the evaluation set size.
"""
from __future__ import annotations

import os
import sys

import jax

from clipjax.api import RestoreError, eval_mesh, load_run_config, restore_params
from clipjax.evals.report import summary_lines, write_report


def evaluate(workdir: str, *, step: int | None = None, out: str | None = None, config=None,
             devices=None, log=print) -> dict:
    from clipjax.train import build_tokenizer, run_evaluation

    config = load_run_config(workdir) if config is None else config
    mesh = eval_mesh(devices)
    tokenizer = build_tokenizer(config)
    graphdef, params, step = restore_params(workdir, config, tokenizer, mesh, step)
    report = run_evaluation(config, mesh, tokenizer, graphdef, params, step)
    out = out or workdir
    if jax.process_index() == 0:
        os.makedirs(out, exist_ok=True)
        write_report(report, os.path.join(out, "report.json"))
        write_markdown(report, out, workdir)
        for line in summary_lines(report):
            log(line)
    return report


def write_markdown(report: dict, out: str, workdir: str) -> str:
    """report.md: the same numbers as report.json, as tables, with the spectrum plots."""
    from clipjax.metrics.plot import plot_spectrum_history

    lines = [f"# Evaluation of {os.path.abspath(workdir)} at step {report['step']}", "",
             f"{report['num_examples']} held-out examples.", ""]
    zero_shot = {k: v for k, v in report.get("zero_shot", {}).items() if isinstance(v, dict)}
    if zero_shot:
        lines += ["## Zero-shot classification", "", "| attribute | top-1 | top-5 |", "| --- | --- | --- |"]
        for name, r in zero_shot.items():
            top5 = f"{r['top5']:.2%}" if "top5" in r else "-"
            lines.append(f"| {name} | {r['top1']:.2%} | {top5} |")
        lines.append(f"| mean | {report['zero_shot']['mean_top1']:.2%} | |")
        lines.append("")
    retrieval = report.get("retrieval")
    if retrieval:
        lines += ["## Retrieval", "", "| direction | R@1 | R@5 | R@10 | median rank |", "| --- | --- | --- | --- | --- |"]
        for label, r in (("image -> text (same concept)", retrieval["image_to_text"]),
                         ("text -> image (same concept)", retrieval["text_to_image"]),
                         ("image -> text (own caption)", retrieval["strict"]["image_to_text"]),
                         ("text -> image (own image)", retrieval["strict"]["text_to_image"])):
            lines.append(f"| {label} | {r['R@1']:.3f} | {r['R@5']:.3f} | {r['R@10']:.3f} | {r['median_rank']:.0f} |")
        lines.append("")
    embedding = report.get("embedding")
    if embedding:
        lines += ["## Embedding space (held-out probe set)", "", "| metric | value |", "| --- | --- |"]
        for key in sorted(k for k, v in embedding.items() if not isinstance(v, list)):
            lines.append(f"| {key} | {embedding[key]:.4g} |")
        probe = {"step": report["step"], **embedding}
        plot_spectrum_history([probe], os.path.join(out, "probe_spectrum.png"))
        lines += ["", "![probe-set spectrum](probe_spectrum.png)", ""]
        if os.path.exists(os.path.join(workdir, "spectrum.png")):
            rel = os.path.relpath(os.path.join(workdir, "spectrum.png"), out)
            lines += ["Spectrum over training:", "", f"![training spectrum]({rel})", ""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def _workdir_from_argv(argv) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--workdir="):
            return arg.split("=", 1)[1]
        if arg == "--workdir" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def main():
    from absl import app, flags, logging as absl_logging
    from ml_collections import config_flags

    from clipjax.parallel.distributed import initialize_from_environment

    workdir = _workdir_from_argv(sys.argv)
    if workdir is None:
        sys.exit("clipjax.evaluate: --workdir is required")
    try:
        # The run's own config is the base, so `--config.key=value` overrides work as in training.
        base = load_run_config(workdir)
    except RestoreError as e:
        sys.exit(f"clipjax.evaluate: {e}")
    config_flags.DEFINE_config_dict("config", base)
    flags.DEFINE_string("workdir", None, "A training workdir (holds config.json and checkpoints/).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("out", None, "Where report.json and report.md go (default: the workdir).")

    def run(argv):
        del argv
        absl_logging.set_verbosity(absl_logging.WARNING)
        initialize_from_environment()
        lead = jax.process_index() == 0
        try:
            evaluate(flags.FLAGS.workdir, step=flags.FLAGS.step, out=flags.FLAGS.out,
                     config=flags.FLAGS.config, log=print if lead else (lambda _: None))
        except RestoreError as e:
            sys.exit(f"clipjax.evaluate: {e}")

    app.run(run)


if __name__ == "__main__":
    main()
