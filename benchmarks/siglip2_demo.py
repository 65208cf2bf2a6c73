"""SigLIP 2's image-side losses on the embedded shapes data: with and without them, two seeds.

    python benchmarks/siglip2_demo.py                 # 4 runs, about 30 minutes on 2 CPU cores
    python benchmarks/siglip2_demo.py --markdown      # also rewrite the tables in docs/siglip2.md
    python benchmarks/siglip2_demo.py --runs "with image losses/seed 0"   # retrain only these

Trains `configs/siglip2_demo.py` (sigmoid loss + LocCa decoder, self-distillation and masked
prediction for the last 20% of the steps) and `configs/siglip2_demo.py:no_image_losses` (the same
model, data and steps without the two losses), each with seeds 0 and 1, from scratch in fresh
workdirs, and prints what their evaluations report: the dense probe (object/background mIoU and
patch colour accuracy), zero-shot per attribute, retrieval, and the decoder's captions and
referring boxes. Results go to benchmarks/results/siglip2_demo.json (with each run's wall time).
"""

from __future__ import annotations

import os
import sys

import demo_runs
from demo_runs import ROOT

RESULTS = os.path.join(ROOT, "benchmarks", "results", "siglip2_demo.json")
DOC = os.path.join(ROOT, "docs", "siglip2.md")
BEGIN, END = "<!-- siglip2:demo:begin -->", "<!-- siglip2:demo:end -->"
SEEDS = (0, 1)
MODES = {"with image losses": "configs/siglip2_demo.py", "without": "configs/siglip2_demo.py:no_image_losses"}
RUNS = {
    f"{mode}/seed {seed}": (config, (f"--config.seed={seed}",))
    for mode, config in MODES.items()
    for seed in SEEDS
}


def summary(report: dict) -> dict:
    captioning = report.get("captioning", {})
    return {
        "zero_shot": {k: v["top1"] for k, v in report["zero_shot"].items() if isinstance(v, dict)},
        "zero_shot_mean": report["zero_shot"]["mean_top1"],
        "image_to_text_R@1": report["retrieval"]["image_to_text"]["R@1"],
        "dense_probe": report["dense_probe"],
        "caption_accuracy": captioning.get("attributes", {}).get("all", {}).get("accuracy"),
        "referring_iou": captioning.get("referring", {}).get("mean_iou"),
    }


def markdown(results: dict) -> str:
    runs = results["runs"]
    lines = [
        "| run | seed | dense mIoU | patch colour | zero-shot mean | image->text R@1 | caption attributes correct "
        "| referring IoU | train + eval wall time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in runs.items():
        mode, seed = name.split("/seed ")
        lines.append(
            f"| {mode} | {seed} | {r['dense_probe']['miou']:.3f} | {100 * r['dense_probe']['color_accuracy']:.2f}% "
            f"| {100 * r['zero_shot_mean']:.2f} | {r['image_to_text_R@1']:.3f} | {100 * r['caption_accuracy']:.2f}% "
            f"| {r['referring_iou']:.3f} | {r['wall_s'] / 60:.1f} min |"
        )
    means = {}
    for mode in MODES:
        found = [runs[f"{mode}/seed {s}"] for s in SEEDS if f"{mode}/seed {s}" in runs]
        if found:
            means[mode] = {
                "miou": sum(r["dense_probe"]["miou"] for r in found) / len(found),
                "color": sum(r["dense_probe"]["color_accuracy"] for r in found) / len(found),
                "zero_shot": sum(r["zero_shot_mean"] for r in found) / len(found),
                "seeds": len(found),
            }
    if len(means) == 2:
        a, b = means["with image losses"], means["without"]
        lines += [
            "",
            f"Mean over {a['seeds']} seeds, with minus without the image-side losses: dense mIoU "
            f"{a['miou'] - b['miou']:+.3f}, patch colour {100 * (a['color'] - b['color']):+.2f} points, "
            f"zero-shot {100 * (a['zero_shot'] - b['zero_shot']):+.2f} points.",
        ]
    return "\n".join(lines)


def main() -> None:
    demo_runs.main(__doc__.splitlines()[0], RUNS, RESULTS, summary, markdown, (DOC, BEGIN, END))


if __name__ == "__main__":
    sys.exit(main())
