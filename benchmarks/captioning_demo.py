"""CoCa and LocCa on the embedded shapes data beside the same model trained with the contrastive
loss alone.

    python benchmarks/captioning_demo.py                  # all four runs, about 15 minutes on 2 CPU cores
    python benchmarks/captioning_demo.py --runs locca     # retrain only these; the others stay as stored
    python benchmarks/captioning_demo.py --markdown       # also rewrite the tables in docs/captioning.md

Trains `configs/coca_demo.py` (InfoNCE + 2 x captioning) and `configs/locca_demo.py` (InfoNCE + 2
x LocCa's three tasks), and each with `:contrastive` (the same towers, data, steps and seed, no
decoder), each from scratch in a fresh workdir, and prints what their evaluations
report: zero-shot per attribute and retrieval of the contrastive head for all, and for the
decoders the captioning evaluator's held-out perplexity, the attributes their greedy captions
state and (LocCa) the IoU of the boxes written for held-out captions. Results go to
benchmarks/results/captioning_demo.json (with each run's wall time); --markdown writes the
generated section of docs/captioning.md.
"""

from __future__ import annotations

import os

import demo_runs
from demo_runs import ROOT

RESULTS = os.path.join(ROOT, "benchmarks", "results", "captioning_demo.json")
DOC = os.path.join(ROOT, "docs", "captioning.md")
BEGIN, END = "<!-- captioning:demo:begin -->", "<!-- captioning:demo:end -->"
RUNS = {
    "coca": "configs/coca_demo.py",
    "contrastive only": "configs/coca_demo.py:contrastive",
    "locca": "configs/locca_demo.py",
    "locca's contrastive only": "configs/locca_demo.py:contrastive",
}
# Each decoder run and the run without its decoder (same towers, data, steps and seed).
BASELINES = {"coca": ("CoCa", "contrastive only"), "locca": ("LocCa", "locca's contrastive only")}


def summary(report: dict) -> dict:
    zero_shot = {k: v["top1"] for k, v in report["zero_shot"].items() if isinstance(v, dict)}
    out = {
        "zero_shot": zero_shot,
        "zero_shot_mean": report["zero_shot"]["mean_top1"],
        "image_to_text_R@1": report["retrieval"]["image_to_text"]["R@1"],
        "text_to_image_R@1": report["retrieval"]["text_to_image"]["R@1"],
    }
    if "captioning" in report:
        out["captioning"] = report["captioning"]
    return out


def markdown(results: dict) -> str:
    runs = results["runs"]
    attributes = list(runs["coca"]["zero_shot"])
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    lines = [
        "| run | " + " | ".join(f"zero-shot {a}" for a in attributes) + " | mean | image->text R@1 "
        "| text->image R@1 | train + eval wall time |",
        "| --- | " + " | ".join("---:" for _ in attributes) + " | ---: | ---: | ---: | ---: |",
    ]
    for name, r in runs.items():
        lines.append(
            f"| {name} | "
            + " | ".join(pct(r["zero_shot"][a]) for a in attributes)
            + f" | {pct(r['zero_shot_mean'])} | {r['image_to_text_R@1']:.3f} | {r['text_to_image_R@1']:.3f} "
            f"| {r['wall_s'] / 60:.1f} min |"
        )
    for run, (label, _) in BASELINES.items():
        if run in runs:
            lines += captioning_lines(runs[run]["captioning"], label)
    lines.append("")
    for run, (label, baseline) in BASELINES.items():
        if run in runs and baseline in runs:
            difference = 100 * (runs[run]["zero_shot_mean"] - runs[baseline]["zero_shot_mean"])
            lines.append(
                f"Mean zero-shot, {label} minus the same model without its decoder: {difference:+.2f} points."
            )
    return "\n".join(lines)


def captioning_lines(captioning: dict, label: str) -> list[str]:
    lines = [
        "",
        f"Captioning ({label} run): held-out cross-entropy {captioning['cross_entropy']:.4f} per token "
        f"(perplexity {captioning['perplexity']:.3f}); greedy captions of {captioning['generated']} held-out "
        "images, each attribute as the caption states it:",
        "",
        "| attribute | stated | correct when stated |",
        "| --- | ---: | ---: |",
    ]
    for name, value in captioning["attributes"].items():
        lines.append(f"| {name} | {100 * value['stated']:.1f}% | {100 * value['accuracy']:.2f}% |")
    referring = captioning.get("referring")
    if referring:
        lines += [
            "",
            f"Referring expressions ({label} run): for the captions of {referring['boxes']} held-out images "
            f"the decoder writes a box with mean IoU {referring['mean_iou']:.3f} with the object's true box; "
            f"IoU >= 0.5 for {100 * referring['iou_50']:.1f}% of them.",
        ]
    lines += ["", "| generated | the image's own caption |", "| --- | --- |"]
    lines += [f"| {s['generated']} | {s['reference']} |" for s in captioning.get("samples", [])]
    return lines


def main() -> None:
    runs = {name: (config, ()) for name, config in RUNS.items()}
    demo_runs.main(__doc__.splitlines()[0], runs, RESULTS, summary, markdown, (DOC, BEGIN, END))


if __name__ == "__main__":
    main()
