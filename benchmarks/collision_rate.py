"""False-negative collisions measured in a run against the balanced-class expectation.

    python benchmarks/collision_rate.py runs/demo [--classes 320]

Reads <workdir>/metrics.jsonl (the in-step embedding metrics) and prints, per measured step
and on average, the fraction of anchors with at least one same-concept negative in the batch,
the mean number of such negatives, and the softmax probability mass the loss puts on them,
next to 1 - (1 - 1/K)^(B-1) and (B-1)/K for K balanced concepts.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from clipjax.metrics import expected_collision_count, expected_collision_rate  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--classes", type=int, default=320, help="concepts K (shapes: 5*8*2*4 = 320)")
    args = parser.parse_args()
    config = json.load(open(os.path.join(args.workdir, "config.json")))
    batch = int(config["data"]["batch_size"])
    rows = [
        r
        for r in map(json.loads, open(os.path.join(args.workdir, "metrics.jsonl")))
        if "label_collision_frac" in r
    ]
    if not rows:
        sys.exit(f"{args.workdir}/metrics.jsonl has no embedding metrics (config.metrics.every = 0?)")
    print(f"batch {batch}, {args.classes} concepts, {len(rows)} measured steps")
    print(
        f"{'step':>6} {'concept frac':>13} {'concept count':>14} {'concept p-mass':>15} {'caption frac':>13}"
    )
    for r in rows:
        print(
            f"{r['step']:>6} {r['label_collision_frac']:>13.3f} {r['label_collision_count_mean']:>14.3f} "
            f"{r['label_collision_prob_mass']:>15.3f} {r['collision_frac']:>13.3f}"
        )
    mean = lambda key: sum(r[key] for r in rows) / len(rows)
    print(
        f"{'mean':>6} {mean('label_collision_frac'):>13.3f} {mean('label_collision_count_mean'):>14.3f} "
        f"{mean('label_collision_prob_mass'):>15.3f} {mean('collision_frac'):>13.3f}"
    )
    print(
        f"expected (balanced): fraction {expected_collision_rate(batch, args.classes):.3f}, "
        f"count {expected_collision_count(batch, args.classes):.3f}"
    )


if __name__ == "__main__":
    main()
