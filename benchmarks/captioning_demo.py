"""CoCa on the embedded shapes data beside the same model trained with the contrastive loss alone.

    python benchmarks/captioning_demo.py                  # both runs, about 10 minutes on 2 CPU cores
    python benchmarks/captioning_demo.py --markdown       # also rewrite the table in docs/captioning.md

Trains `configs/coca_demo.py` (InfoNCE + 2 x captioning) and `configs/coca_demo.py:contrastive`
(the same towers, data, steps and seed, no decoder), each from scratch in a fresh workdir, and
prints what their evaluations report: zero-shot per attribute and retrieval of the contrastive
head for both, and for the CoCa run the captioning evaluator's held-out perplexity and the
attributes its greedy captions state. Results go to benchmarks/results/captioning_demo.json
(with each run's wall time); --markdown writes the generated section of docs/captioning.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
RESULTS = os.path.join(ROOT, "benchmarks", "results", "captioning_demo.json")
DOC = os.path.join(ROOT, "docs", "captioning.md")
BEGIN, END = "<!-- captioning:demo:begin -->", "<!-- captioning:demo:end -->"
RUNS = {"coca": "configs/coca_demo.py", "contrastive only": "configs/coca_demo.py:contrastive"}


def train(config: str, workdir: str) -> tuple[dict, float]:
    start = time.time()
    command = [sys.executable, "-m", "clipjax.train", "--config", config, "--workdir", workdir]
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    with open(os.path.join(workdir, "report.json")) as f:
        return json.load(f), time.time() - start


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
    captioning = runs["coca"]["captioning"]
    lines += [
        "",
        f"Captioning (CoCa run): held-out cross-entropy {captioning['cross_entropy']:.4f} per token "
        f"(perplexity {captioning['perplexity']:.3f}); greedy captions of {captioning['generated']} held-out "
        "images, each attribute as the caption states it:",
        "",
        "| attribute | stated | correct when stated |",
        "| --- | ---: | ---: |",
    ]
    for name, value in captioning["attributes"].items():
        lines.append(f"| {name} | {100 * value['stated']:.1f}% | {100 * value['accuracy']:.2f}% |")
    lines += ["", "| generated | the image's own caption |", "| --- | --- |"]
    lines += [f"| {s['generated']} | {s['reference']} |" for s in captioning.get("samples", [])]
    difference = 100 * (runs["coca"]["zero_shot_mean"] - runs["contrastive only"]["zero_shot_mean"])
    lines += ["", f"Mean zero-shot, CoCa minus contrastive only: {difference:+.2f} points."]
    return "\n".join(lines)


def write_markdown(results: dict) -> None:
    with open(DOC) as f:
        doc = f.read()
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(DOC, "w") as f:
        f.write(f"{head}{BEGIN}\n{markdown(results)}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="rewrite docs/captioning.md's table")
    parser.add_argument("--reuse", action="store_true", help="use the stored results, train nothing")
    args = parser.parse_args()
    if args.reuse:
        with open(RESULTS) as f:
            results = json.load(f)
    else:
        results = {"runs": {}}
        scratch = tempfile.mkdtemp(prefix="captioning_demo_")
        try:
            for name, config in RUNS.items():
                report, wall = train(config, os.path.join(scratch, name.replace(" ", "_")))
                results["runs"][name] = {"config": config, "wall_s": wall, **summary(report)}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        with open(RESULTS, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
    print(markdown(results))
    if args.markdown:
        write_markdown(results)


if __name__ == "__main__":
    main()
