"""configs/simclr_demo.py against the same tower untrained: the probes that say SimCLR learned.

    python benchmarks/simclr_demo_probe.py [--workdir runs/simclr_demo] [--steps N]

Trains `configs/simclr_demo.py` into the workdir (or resumes / re-reads it if it is finished),
then runs the config's evaluators (linear probe and kNN on the tower's features, per label
field) on the trained parameters and on the parameters the same config initialises (step 0),
and prints both side by side: semantic labels (shape, color, size, position) and nuisance ones
(light, gradient, texture, noise, vignette).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from false_negatives import load_config, untrained_report  # noqa: E402  (this folder)

from clipjax.data import shapes  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/simclr_demo")
    parser.add_argument("--steps", type=int, default=0, help="override config.steps (0: the config's)")
    parser.add_argument("--data_dir", default="", help="override data.data_dir")
    args = parser.parse_args()

    from clipjax.trainer.run import train

    config = load_config("simclr_demo")
    if args.steps:
        config.steps = args.steps
    if args.data_dir:
        config.data.data_dir = args.data_dir
    t0 = time.perf_counter()
    trained = train(config, args.workdir)
    t_train = time.perf_counter() - t0

    untrained = untrained_report(config)

    fields = tuple(config.evals.linear_probe.fields)
    rows = [("concept (label)", "linear_probe", "top1"), ("concept kNN@20", "knn", "top1@k20")]
    print(
        f"\nconfigs/simclr_demo.py, {config.steps} steps of batch {config.data.batch_size} ({t_train:.0f} s)"
    )
    print("| probe | untrained tower | trained |")
    print("| --- | --- | --- |")
    results = {}
    for name, section, key in rows:
        a, b = untrained[section][key], trained[section][key]
        results[name] = (a, b)
        print(f"| {name} | {100 * a:.1f} | {100 * b:.1f} |")
    for field in fields:
        a, b = untrained["linear_probe"]["fields"][field], trained["linear_probe"]["fields"][field]
        kind = "nuisance" if field in shapes.NUISANCE_NAMES else "semantic"
        results[field] = (a, b)
        print(f"| {field} ({kind}), linear probe | {100 * a:.1f} | {100 * b:.1f} |")
    with open(os.path.join(args.workdir, "probe_vs_untrained.json"), "w") as f:
        json.dump({"steps": int(config.steps), "train_s": t_train, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
