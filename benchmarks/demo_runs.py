"""What the demo benchmarks share: train configs in fresh workdirs, keep each run's summary as it
finishes, and write the generated section of a doc page (captioning_demo.py, siglip2_demo.py)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def train(config: str, workdir: str, flags: tuple = ()) -> tuple[dict, float]:
    """(the run's report, its wall seconds) of `python -m clipjax.train` with extra `flags`."""
    start = time.time()
    command = [sys.executable, "-m", "clipjax.train", "--config", config, "--workdir", workdir, *flags]
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    with open(os.path.join(workdir, "report.json")) as f:
        return json.load(f), time.time() - start


def replace_section(path: str, begin: str, end: str, text: str) -> None:
    """Rewrite what lies between the `begin` and `end` markers of the file at `path`."""
    with open(path) as f:
        doc = f.read()
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(f"{head}{begin}\n{text}\n{end}{tail}")


def main(
    description: str,
    runs: dict[str, tuple[str, tuple]],
    results_path: str,
    summary: Callable[[dict], dict],
    markdown: Callable[[dict], str],
    doc: tuple[str, str, str],
) -> None:
    """The command line of a demo benchmark: `runs` {name: (config, extra flags)}, each run's
    `summary(report)` stored in `results_path`, `markdown(results)` printed and, with
    --markdown, written into `doc` = (path, begin marker, end marker)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--markdown", action="store_true", help=f"rewrite the tables of {os.path.basename(doc[0])}"
    )
    parser.add_argument("--reuse", action="store_true", help="use the stored results, train nothing")
    parser.add_argument(
        "--runs", default=",".join(runs), help=f"comma-separated runs to train (of {', '.join(runs)})"
    )
    args = parser.parse_args()
    results = {"runs": {}}
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
    if not args.reuse:
        names = [n.strip() for n in args.runs.split(",") if n.strip()]
        unknown = sorted(set(names) - set(runs))
        if unknown:
            parser.error(f"--runs: unknown {', '.join(unknown)} (expected some of {', '.join(runs)})")
        scratch = tempfile.mkdtemp(prefix="demo_runs_")
        try:
            for name in names:
                config, flags = runs[name]
                workdir = os.path.join(scratch, name.replace(" ", "_").replace("/", "_"))
                report, wall = train(config, workdir, flags)
                results["runs"][name] = {
                    "config": config,
                    "flags": list(flags),
                    "wall_s": wall,
                    **summary(report),
                }
                with open(results_path, "w") as f:  # each run as it finishes
                    json.dump(results, f, indent=1, sort_keys=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    results["runs"] = {name: results["runs"][name] for name in runs if name in results["runs"]}
    print(markdown(results))
    if args.markdown:
        replace_section(*doc, markdown(results))
