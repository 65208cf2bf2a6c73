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
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def load_config():
    path = os.path.join(ROOT, "configs", "simclr_demo.py")
    spec = importlib.util.spec_from_file_location("simclr_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/simclr_demo")
    parser.add_argument("--steps", type=int, default=0, help="override config.steps (0: the config's)")
    parser.add_argument("--data_dir", default="", help="override data.data_dir")
    args = parser.parse_args()

    from clipjax.data.sources import make_source
    from clipjax.evals.runner import EvalRunner
    from clipjax.parallel import make_mesh
    from clipjax.trainer.run import train
    from clipjax.trainer.state import init_train_state

    module = load_config()
    config = module.get_config()
    if args.steps:
        config.steps = args.steps
    if args.data_dir:
        config.data.data_dir = args.data_dir
    t0 = time.perf_counter()
    trained = train(config, args.workdir)
    t_train = time.perf_counter() - t0

    source = make_source(config.data)
    source.prepare()
    tokenizer = source.tokenizer()
    mesh = make_mesh(config.mesh)
    setup = init_train_state(config, mesh, vocab_size=tokenizer.vocab_size)
    untrained = EvalRunner(config, source, tokenizer).run(setup.graphdef, setup.state["params"], mesh, 0)

    fields = tuple(module.SEMANTIC) + tuple(module.NUISANCE)
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
        kind = "semantic" if field in module.SEMANTIC else "nuisance"
        results[field] = (a, b)
        print(f"| {field} ({kind}), linear probe | {100 * a:.1f} | {100 * b:.1f} |")
    with open(os.path.join(args.workdir, "probe_vs_untrained.json"), "w") as f:
        json.dump({"steps": int(config.steps), "train_s": t_train, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
