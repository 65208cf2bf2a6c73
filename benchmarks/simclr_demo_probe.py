"""configs/simclr_demo.py against the same tower untrained: the probes that say SimCLR learned.

    python benchmarks/simclr_demo_probe.py [--workdir runs/simclr_demo] [--steps N]

Trains `configs/simclr_demo.py` into the workdir (or resumes / re-reads it if it is finished),
then runs the config's evaluators (linear probe and kNN on the tower's features, per label
field) on the trained parameters and on the parameters the same config initialises (step 0),
and prints both side by side: semantic labels (shape, color, size, position) and nuisance ones
(light, gradient, texture, noise, vignette).

    python benchmarks/simclr_demo_probe.py --variant NAME --workdir runs/NAME

runs one of the `VARIANTS` of the demo instead: the rows of the variant table in
docs/false_negatives.md (one run each, stored in benchmarks/results/simclr_demo_variants.jsonl).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from false_negatives import ROOT, load_config, untrained_report  # noqa: E402  (this folder)

from clipjax.data.sources.shapes import procedural as shapes  # noqa: E402


_MEAN_POOL = {"model.image.pool": "mean", "model.image.widths": (32, 64, 128)}
_NO_NUISANCE = {
    "data.shapes_nuisance": False,
    "evals.linear_probe.fields": shapes.ATTRIBUTE_NAMES,
    "evals.knn.fields": shapes.ATTRIBUTE_NAMES,
}
# The default without its illumination: SimCLR's ops only (the default before the illumination
# existed; the variants measured then are stated on top of it, so they still run what they ran).
_SIMCLR_OPS = {"augment.illumination": 0.0}
# name -> (config arg, overrides): what docs/false_negatives.md compares with the default.
VARIANTS = {
    "default": ("", {}),
    "keep_nuisance": ("keep_nuisance", {}),
    "mean_pool_crop_flip": ("keep_nuisance", _MEAN_POOL),
    "simclr_ops": ("", _SIMCLR_OPS),
    # SimCLR's jitter without its colour ops: brightness and contrast only, and the blur.
    "brightness_contrast_blur": ("", {**_SIMCLR_OPS, "augment.saturation": 0.0, "augment.hue": 0.0}),
    "grayscale": ("", {**_SIMCLR_OPS, "augment.grayscale": 0.2}),
    "temperature_0.1": ("", {**_SIMCLR_OPS, "model.logit_scale_init": math.log(1 / 0.1)}),
    "crop_0.2": ("", {**_SIMCLR_OPS, "augment.crop_scale": (0.2, 1.0)}),
    "residual_blocks": ("", {**_SIMCLR_OPS, "model.image.blocks_per_stage": 1}),
    "no_nuisance_data": ("", {**_SIMCLR_OPS, **_NO_NUISANCE}),
    "strong_illumination": ("", {"augment.illumination": 1.0, "augment.ramp": 0.3, "augment.falloff": 0.6}),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/simclr_demo")
    parser.add_argument("--steps", type=int, default=0, help="override config.steps (0: the config's)")
    parser.add_argument("--data_dir", default="", help="override data.data_dir")
    parser.add_argument("--variant", choices=tuple(VARIANTS), default="default")
    args = parser.parse_args()

    from clipjax.config import apply_overrides
    from clipjax.trainer.run import train

    config_arg, overrides = VARIANTS[args.variant]
    config = apply_overrides(load_config("simclr_demo", config_arg), overrides)
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
    record = {"variant": args.variant, "steps": int(config.steps), "train_s": t_train, "results": results}
    with open(os.path.join(args.workdir, "probe_vs_untrained.json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(ROOT, "benchmarks", "results", "simclr_demo_variants.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
